"""CLI plumbing: fast --help, version, one-line errors without traceback, atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from liverlesion.cli import main
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_dir, write_text


def test_help_is_fast_and_lists_commands():
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "liverlesion", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in (
        "demo",
        "synth",
        "inspect",
        "cv",
        "train",
        "evaluate",
        "predict",
        "export",
        "weights",
        "import",
    ):
        assert cmd in r.stdout
    # --help must not import torch; generous bound for a loaded 2-core CI machine
    assert time.time() - t0 < 30
    r = subprocess.run(
        [sys.executable, "-c", "import sys, liverlesion.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "False"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert "liverlesion" in capsys.readouterr().out


def test_user_error_is_one_line_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  nope: 1\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "liverlesion",
            "patches",
            str(tmp_path / "m.csv"),
            str(tmp_path / "o"),
            "--config",
            str(bad),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("liverlesion: error:")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_usage_error_nonzero(capsys):
    assert main(["synth"]) != 0


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_non_empty(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        with atomic_dir(tmp_path / "out"):
            pass


def test_output_folder_given_as_a_symbolic_link(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "missing" / "x")
    with pytest.raises(UserError, match="broken symbolic link"):
        with atomic_dir(broken):
            pass
    rc = main(["synth", "-o", str(broken), "--patients", "2", "--lesions", "4"])
    err = capsys.readouterr().err
    assert rc != 0 and "broken symbolic link" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # nothing half-written beside it
    # a link to a folder: the folder is filled and the link still leads to it
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    for overwrite in (False, True):
        with atomic_dir(link, overwrite=overwrite) as tmp:
            (tmp / "f.txt").write_text(str(overwrite))
        assert link.is_symlink() and (link / "f.txt").read_text() == str(overwrite)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, a folder nobody can write in")
@pytest.mark.parametrize("args", [["synth", "--patients", "2", "--lesions", "4"], ["inspect", "MANIFEST"]])
def test_output_in_a_folder_nobody_can_write_is_refused_before_any_work(args, tmp_path, capsys):
    # os.access says yes to root there (and on read-only mounts); only a real write tells
    from liverlesion.fileio import check_output_dir, check_output_file

    for check in (check_output_dir, check_output_file):
        with pytest.raises(UserError, match="/proc is not writable"):
            check("/proc/liverlesion-out")
    (tmp_path / "m.csv").write_text("patient_id,image,lesion_class,mask\n")
    args = [str(tmp_path / "m.csv") if a == "MANIFEST" else a for a in args]
    rc = main([*args, "-o", "/proc/liverlesion-out"])
    err = capsys.readouterr().err
    assert rc != 0 and "/proc is not writable" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_atomic_file_write_keeps_old_on_error(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", boom)
    with pytest.raises(OSError):
        write_text(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]
