"""runs.py: the run-folder layout (paths cv writes and evaluate/report read) and run.json reading."""

from __future__ import annotations

import json

import pytest

from liverlesion import runs
from liverlesion.errors import UserError


def test_layout_paths(tmp_path):
    assert runs.predictions_path(tmp_path) == tmp_path / "predictions.csv"
    assert runs.val_predictions_path(tmp_path) == tmp_path / "val_predictions.csv"
    assert runs.model_path(tmp_path, 2) == tmp_path / "fold_2" / "model.pt"
    assert (
        runs.fold_predictions_path(runs.fold_dir(tmp_path, 0), "test")
        == tmp_path / "fold_0" / "test_predictions.csv"
    )
    assert runs.gradcam_gallery_path(tmp_path) == tmp_path / "plots" / "gradcam_gallery.png"
    for name in ("b", "a"):
        (tmp_path / "baselines" / name).mkdir(parents=True)
        (tmp_path / "baselines" / name / "predictions.csv").write_text("x\n")
    (tmp_path / "baselines" / "summary.json").write_text("{}")
    assert [p.parent.name for p in runs.baseline_predictions(tmp_path)] == ["a", "b"]
    log = tmp_path / "fold_1" / "logs" / "csv_probe" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch\n")
    assert runs.loss_log_files(tmp_path) == [log]


def test_read_run_info(tmp_path):
    assert runs.read_run_info(tmp_path) == {}
    (tmp_path / "run.json").write_text('{"kind": "cv"}')
    assert runs.read_run_info(tmp_path) == {"kind": "cv"}
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(UserError, match=r"run.json: not valid JSON"):
        runs.read_run_info(tmp_path)
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        runs.read_run_info(tmp_path)
    # entries of the wrong type (evaluate split a text into letters, or failed on ints with a traceback)
    for entry in (
        '"class_names": "cyst,metastasis"',
        '"class_names": [1, 2]',
        '"class_names": ["a", "a"]',
        '"patch_dir": 5',
        '"train_seconds": "12"',
        '"hardware": []',
    ):
        (tmp_path / "run.json").write_text(f'{{"kind": "cv", {entry}}}')
        with pytest.raises(UserError, match=f"{entry.split(':')[0].strip(chr(34))} is .*expected") as e:
            runs.read_run_info(tmp_path)
        assert "\n" not in str(e.value)
    (tmp_path / "run.json").write_text('{"class_names": ["cyst", "metastasis"], "patch_dir": null}')
    assert runs.read_run_info(tmp_path)["class_names"] == ["cyst", "metastasis"]


def test_run_patch_dir_relative_recorded_and_moved(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert runs.run_patch_dir(run, {}) is None  # nothing recorded
    (run / "cache").mkdir()
    (run / "run.json").write_text(json.dumps({"patch_dir": "cache"}))
    assert runs.run_patch_dir(run, {}) == run / "cache"  # relative to the run folder
    (run / "run.json").write_text(json.dumps({"patch_dir": str(tmp_path / "gone" / "p123")}))
    (run / "patches" / "p123").mkdir(parents=True)
    assert runs.run_patch_dir(run, {}) == run / "patches" / "p123"  # the run folder was moved
    (run / "run.json").unlink()
    assert runs.run_patch_dir(run, {"run": {"patch_dir": "cache"}}) == run / "cache"  # from metrics.json


def test_model_paths_a_file_a_folder_or_a_cv_run_stand_for(tmp_path, capsys):
    from liverlesion.cli import main

    run = tmp_path / "run"
    for k in (0, 1, 10, 2):  # fold order is numeric: fold_10 comes last
        (run / f"fold_{k}").mkdir(parents=True)
        (run / f"fold_{k}" / "model.pt").write_bytes(b"")
    (run / "fold_x").mkdir()
    (run / "fold_x" / "model.pt").write_bytes(b"")  # not a fold
    (tmp_path / "empty").mkdir()
    assert runs.model_files(run) == [run / f"fold_{k}" / "model.pt" for k in (0, 1, 2, 10)]
    assert runs.model_files(run / "fold_1") == [run / "fold_1" / "model.pt"]
    assert runs.model_files(run / "fold_2" / "model.pt") == [run / "fold_2" / "model.pt"]
    with pytest.raises(UserError, match="file not found"):
        runs.model_files(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="folder without a model.pt"):
        runs.model_files(tmp_path / "empty")
    # an unfinished run (its splits.json has a fold without a model) is not a smaller ensemble
    (run / "splits.json").write_text(json.dumps({"splits": [{"fold": k} for k in (0, 1, 2, 3, 10)]}))
    with pytest.raises(UserError, match=r"4 of its 5 fold models exist \(no fold_3/model.pt\).*--resume"):
        runs.model_files(run)
    (run / "splits.json").write_text(json.dumps({"splits": [{"fold": k} for k in (0, 1, 2, 10)]}))
    assert len(runs.model_files(run)) == 4
    msg = runs.not_a_model_file(run, "checkpoint")  # what loading one checkpoint from it says
    assert msg.startswith(f"checkpoint {run}: is a cv run folder") and "one of its 4 fold models" in msg
    # export writes each fold's export next to it (where predict looks): one -o cannot hold them
    assert main(["export", "--model", str(run), "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4 fold models" in err and "leave out -o" in err
    assert not (tmp_path / "x.onnx").exists()


def test_a_cv_run_folder_as_model_is_the_ensemble_of_its_folds(tmp_path):
    from helpers import make_tiny_checkpoint
    from liverlesion.classifier import Classifier

    run = tmp_path / "run"
    for k in range(3):
        make_tiny_checkpoint(run / f"fold_{k}" / "model.pt", seed=k)
    clf = Classifier.load(run, device="cpu", backend="torch")
    one = Classifier.load(run / "fold_1", device="cpu", backend="torch")
    assert [m.path for m in clf.members] == [run / f"fold_{k}" / "model.pt" for k in range(3)]
    assert [m.path for m in one.members] == [run / "fold_1" / "model.pt"]
    from liverlesion.cli import main

    assert main(["export", "--model", str(run)]) == 0
    assert all((run / f"fold_{k}" / "model.onnx").is_file() for k in range(3))
    onnx = Classifier.load(run, device="cpu", backend="onnx")  # the exports of every fold are used
    assert [m.path for m in onnx.members] == [m.path for m in clf.members]


@pytest.mark.parametrize(
    "name, make",
    [(n, "dir") for n in runs._FILE_SLOTS] + [(n, "file") for n in runs._FOLDER_SLOTS],
)
def test_a_run_entry_of_the_wrong_kind_is_refused_by_every_reader(tmp_path, name, make):
    from liverlesion.baselines import check_run_folder
    from liverlesion.config import Config
    from liverlesion.evaluate import evaluate_run
    from liverlesion.report import render_report
    from liverlesion.run_checks import check_resume

    run = tmp_path / "run"
    run.mkdir()
    (run / name).mkdir() if make == "dir" else (run / name).write_text("x\n")
    want = f"{run / name}: a {'folder' if make == 'dir' else 'file'} where the run's {name}"
    for call in (
        lambda: evaluate_run(run),
        lambda: render_report(run),
        lambda: check_resume(run, Config()),
        lambda: check_run_folder(run),
    ):
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value).startswith(want) and "move it out of the run folder" in str(e.value)
    runs.check_run_slots(tmp_path / "new")  # a run folder not made yet: nothing to refuse
