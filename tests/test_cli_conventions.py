"""CLI conventions shared with nnU-Net, TotalSegmentator and pyradiomics (issue 11, section 2):
-h, described arguments, shown defaults, -o/--out, --device/--threads/--batch-size, one typo hint,
`patches --model`, and the printed Classifier / results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel  # noqa: F401  (imported at collection: its log handler must not bind to a test's captured stderr)
import pytest
import typer.main

from helpers import make_ct_array, make_tiny_checkpoint, torch_threads
from liverlesion.cli import app, main
from liverlesion.io import write_volume


def _commands():
    """(name, click command) for every leaf command, `import ircadb` included."""
    root = typer.main.get_command(app)
    out = []
    for name, cmd in root.commands.items():
        if hasattr(cmd, "commands"):
            out += [(f"{name} {sub}", c) for sub, c in cmd.commands.items()]
        else:
            out.append((name, cmd))
    return out


COMMANDS = [name for name, _ in _commands()]


def _run(args, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("liverlesion: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_dash_h_is_help(command, capsys):
    rc, out, _ = _run([*command.split(), "-h"], capsys)
    assert rc == 0 and "Usage:" in out and "--help" in out


def test_every_argument_described_and_every_default_shown():
    missing = []
    for name, cmd in _commands():
        for p in cmd.params:
            if p.name == "help":
                continue
            if p.param_type_name == "argument":
                if not (p.help or "").strip():
                    missing.append(f"{name} {p.name}: no description")
                continue
            if p.required:
                continue
            shown = isinstance(p.show_default, str) or (
                p.show_default is not False
                and p.default is not None
                and (not p.is_flag or p.secondary_opts or p.default)
            )
            if not shown:
                missing.append(f"{name} {p.opts[0]}: default not shown")
    assert not missing, missing


def test_defaults_appear_in_rendered_help(capsys):
    _, out, _ = _run(["predict", "-h"], capsys)
    for text in ("[default: auto]", "free cores", "NIfTI", "NRRD", "MetaImage", "zip", "DICOM"):
        assert text in out, text


def test_typo_suggests_once():
    r = subprocess.run([sys.executable, "-m", "liverlesion", "predcit"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("Did you mean") == 1 and "'predict'" in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["predict", "serve", "cv", "train"])
@pytest.mark.parametrize(
    ("option", "value"),
    [("--device", "gpu"), ("--device", "cuda:x"), ("--threads", "0"), ("--batch-size", "-2")],
)
def test_resource_options_are_checked_first(command, option, value, tmp_path, capsys):
    args = {
        "predict": [
            "predict",
            "--model",
            tmp_path / "m.pt",
            "-o",
            tmp_path / "o",
            "--image",
            tmp_path / "x.nii",
        ],
        "serve": ["serve", "--model", tmp_path / "m.pt"],
        "cv": ["cv", tmp_path / "m.csv", "-o", tmp_path / "o"],
        "train": ["train", tmp_path / "m.csv", "-o", tmp_path / "o"],
    }[command]
    rc, _, err = _run([*args, option, value], capsys)
    line = _one_error_line(err)
    assert rc == 2 and f"{option} {value}" in line.replace("'", ""), line
    assert not (tmp_path / "o").exists()


def test_device_error_names_the_choices(tmp_path, capsys):
    rc, _, err = _run(["train", tmp_path / "m.csv", "-o", tmp_path / "o", "--device", "tpu"], capsys)
    assert rc == 2 and "use cpu, cuda or cuda:N" in _one_error_line(err)


# --------------------------------------------------------------------------- output placement


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    with torch_threads(1):
        return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", 0, size_px=32)


def test_out_option_and_old_positional_both_work(tiny_ckpt, tmp_path, capsys):
    rc, _, err = _run(["export", "--model", tiny_ckpt, "-o", tmp_path / "a.onnx"], capsys)
    assert rc == 0 and (tmp_path / "a.onnx").is_file() and "deprecated" not in err, err
    rc, _, err = _run(["export", "--model", tiny_ckpt, "--format", "onnx", tmp_path / "b.onnx"], capsys)
    assert rc == 0 and (tmp_path / "b.onnx").is_file()
    assert "positional argument is deprecated" in err and "-o " in err
    rc, _, err = _run(
        ["export", "--model", tiny_ckpt, tmp_path / "c.onnx", "-o", tmp_path / "d.onnx"], capsys
    )
    assert rc == 2 and "give the output file once" in _one_error_line(err)
    assert not (tmp_path / "c.onnx").exists() and not (tmp_path / "d.onnx").exists()


def test_missing_out_is_one_line(tmp_path, capsys):
    rc, _, err = _run(["cv", tmp_path / "m.csv"], capsys)
    assert rc == 2 and "missing -o/--out" in _one_error_line(err)


def test_export_defaults_next_to_the_checkpoint(tmp_path, capsys):
    with torch_threads(1):
        ckpt = make_tiny_checkpoint(tmp_path / "run" / "model.pt", 0, size_px=32)
    rc, out, err = _run(["export", "--model", ckpt], capsys)
    assert rc == 0, err
    assert (tmp_path / "run" / "model.onnx").is_file() and (tmp_path / "run" / "model.onnx.json").is_file()


# --------------------------------------------------------------------------- patches --model


@pytest.fixture
def manifest(tmp_path) -> Path:
    image, mask = make_ct_array()
    write_volume(image, tmp_path / "data" / "ct.nii.gz")
    write_volume(mask, tmp_path / "data" / "mask.nii.gz")
    m = tmp_path / "data" / "manifest.csv"
    m.write_text("patient_id,image,mask,label,lesion_class\np1,ct.nii.gz,mask.nii.gz,,cyst\n")
    return m


def test_patches_with_a_checkpoints_settings(manifest, tmp_path, capsys):
    with torch_threads(1):
        ckpt = make_tiny_checkpoint(tmp_path / "model.pt", 0, size_px=24, mode="2d")
    rc, out, err = _run(["patches", manifest, "-o", tmp_path / "p", "--model", ckpt], capsys)
    assert rc == 0, err
    (settings,) = list((tmp_path / "p").glob("*/settings.json"))
    patch = json.loads(settings.read_text())
    patch = patch.get("patch", patch)
    assert patch["size_px"] == 24 and patch["mode"] == "2d", patch


def test_patches_model_refuses_config_options(manifest, tmp_path, capsys):
    rc, _, err = _run(
        ["patches", manifest, "-o", tmp_path / "p", "--model", tmp_path / "m.pt", "--preset", "quick"], capsys
    )
    assert rc == 2
    line = _one_error_line(err)
    assert "--preset" in line and "drop" in line
    rc, _, err = _run(["patches", manifest, "-o", tmp_path / "p", "--model", tmp_path / "nope.pt"], capsys)
    assert rc == 2 and "nope.pt" in _one_error_line(err)
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- free cores


def test_default_threads_are_the_free_cores(monkeypatch):
    from liverlesion import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(runtime, "runnable_elsewhere", lambda: None)  # no instant reading: the load average
    monkeypatch.setattr(os, "getloadavg", lambda: (2.4, 0.0, 0.0))
    assert runtime.free_cores() == 6
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert runtime.free_cores() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert runtime.free_cores() == 8
    assert runtime.resolve_threads(3) == 3


def test_run_json_records_the_cpu_threads_training_used():
    """run.json's hardware (and the report's table) says how many CPU threads torch had: runs compare by it."""
    import torch

    from liverlesion.cv import _hardware

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _hardware()["threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert _hardware()["threads"] == before


def test_free_cores_read_the_work_running_now_not_the_lagging_load_average(monkeypatch, tmp_path):
    """Just after another run ended the 1-minute load average still says 2 busy cores; the instant count says 0."""
    from pathlib import Path

    from liverlesion import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 1.5, 1.0))
    reads = iter(["2.00 1.50 1.00 1/113 999\n", "2.00 1.50 1.00 2/113 999\n", "2.00 1.50 1.00 1/113 999\n"])
    real_read = Path.read_text
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda self, *a, **k: next(reads) if str(self) == "/proc/loadavg" else real_read(self, *a, **k),
    )
    assert (
        runtime.runnable_elsewhere(interval_s=0) == 0.0
    )  # the caller itself is the 1 running; median of 0, 1, 0
    reads = iter(["9.0 9.0 9.0 3/113 999\n"] * 3)
    assert runtime.free_cores() == 1  # two other threads running now on 2 cores
    reads = iter(["0.1 0.1 0.1 1/113 999\n"] * 3)
    assert runtime.free_cores() == 2  # the load average (2.0) lags; nothing else runs now
    if Path("/proc/loadavg").is_file():  # the real file, where there is one
        monkeypatch.setattr(Path, "read_text", real_read)
        n = runtime.runnable_elsewhere(interval_s=0)
        assert n is not None and n >= 0


def test_root_dash_h(capsys):
    rc, out, _ = _run(["-h"], capsys)
    assert rc == 0 and "predict" in out and "Usage:" in out


def test_training_resource_options_become_settings(monkeypatch):
    from liverlesion.cli_common import config_from, training_overrides

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cfg = config_from(None, None, None, **training_overrides("cpu", 3, 8))
    assert (cfg.train.accelerator, cfg.train.max_threads, cfg.train.batch_size) == ("cpu", 3, 8)
    cfg = config_from(None, None, None, **training_overrides("cuda:1", None, None))
    assert (cfg.train.accelerator, str(cfg.train.devices)) == ("gpu", "1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # that GPU only
    default = config_from(None, None, None)
    cfg = config_from(None, None, None, **training_overrides("auto", None, None))
    assert cfg.train == default.train
