"""A user's workflow through the CLI: synth -> inspect -> train -> predict -> export, on a tiny cohort."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from liverlesion.cli import main

TINY = [
    "--set", "model.backbone=resnet10t",
    "--set", "model.weights=none",
    "--set", "patch.size_px=48",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from liverlesion.synth import generate_cohort

    out = tmp_path_factory.mktemp("wf") / "cohort"
    generate_cohort(out, patients=6, lesions=14, seed=5)
    return out


def test_train_predict_export(cohort, tmp_path, capsys):
    manifest = cohort / "manifest.csv"
    assert main(["inspect", str(manifest), "--out", str(tmp_path / "lesions.csv")]) == 0
    table = pd.read_csv(tmp_path / "lesions.csv")
    assert len(table) == 14

    run = tmp_path / "run"
    assert main(["train", str(manifest), str(run), *TINY]) == 0
    assert (run / "model.pt").exists() and (run / "config.yaml").exists()
    info = json.loads((run / "run.json").read_text())
    assert info["init"] == "random init" or "random" in info["init"].lower()
    # train again into the same folder without --resume: refused, nothing changed
    before = (run / "model.pt").stat().st_mtime_ns
    assert main(["train", str(manifest), str(run), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "model.pt").stat().st_mtime_ns == before

    row = pd.read_csv(manifest).iloc[0]
    out = tmp_path / "pred"
    rc = main(
        [
            "predict", "--model", str(run / "model.pt"),
            "--image", str(cohort / row["image"]), "--mask", str(cohort / row["mask"]),
            "--label", str(int(row["label"])), "--out", str(out), "--no-gradcam",
        ]
    )  # fmt: skip
    assert rc == 0
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 1
    assert "research use, not for diagnosis" in (out / "results.json").read_text().lower()

    onnx = tmp_path / "model.onnx"
    assert main(["export", "--model", str(run / "model.pt"), "--format", "onnx", str(onnx)]) == 0
    assert onnx.stat().st_size > 0


def test_cv_refuses_single_class_manifest(cohort, tmp_path, capsys):
    df = pd.read_csv(cohort / "manifest.csv")
    one = df[df["lesion_class"] == df["lesion_class"].iloc[0]].copy()
    one["image"] = [str(cohort / p) for p in one["image"]]
    one["mask"] = [str(cohort / p) for p in one["mask"]]
    one.to_csv(tmp_path / "m.csv", index=False)
    rc = main(["cv", str(tmp_path / "m.csv"), str(tmp_path / "run"), *TINY])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least two" in err[0]


@pytest.mark.slow  # a Lightning run of 15-50 s on 2 cores: the slow job (.ci/run-slow)
def test_cv_resume_reuses_finished_folds(cohort, tmp_path, capsys):
    manifest = cohort / "manifest.csv"
    run = tmp_path / "run"
    args = [
        "cv",
        str(manifest),
        str(run),
        "--folds",
        "2",
        "--no-baselines",
        *TINY,
        "--set",
        "eval.n_bootstrap=20",
    ]
    args += ["--set", "eval.gradcam_max=2"]
    assert main(args) == 0
    preds = pd.read_csv(run / "predictions.csv")
    assert set(preds["fold"]) == {0, 1} and (preds.groupby("patient_id")["fold"].nunique() == 1).all()
    fold0 = (run / "fold_0" / "model.pt").stat().st_mtime_ns
    # simulate an interruption during fold 1
    (run / "fold_1" / "model.pt").unlink()
    (run / "predictions.csv").unlink()
    assert main(args) == 2  # an existing run needs --resume
    assert main([*args, "--resume"]) == 0
    assert (run / "fold_0" / "model.pt").stat().st_mtime_ns == fold0  # finished fold reused
    assert (run / "fold_1" / "model.pt").exists()
    assert "already trained" in capsys.readouterr().out
    again = pd.read_csv(run / "predictions.csv")
    assert sorted(again["lesion_id"]) == sorted(preds["lesion_id"])
    # a finished fold whose kept predictions were cut short (a copy of the run) is not silently reused
    kept = run / "fold_0" / "test_predictions.csv"
    kept.write_bytes(kept.read_bytes()[:-12])
    (run / "predictions.csv").unlink()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "test_predictions.csv: looks truncated" in err and "fold_0 and run again" in err
    assert not (run / "predictions.csv").exists()


def test_deterministic_mode_repeats_exactly(tmp_path):
    import numpy as np

    from liverlesion.config import load_config
    from liverlesion.train import FoldData, train_fold

    rng = np.random.default_rng(0)
    arrays = [rng.random((1, 3, 48, 48), dtype=np.float32) for _ in range(16)]
    index = pd.DataFrame(
        {
            "patient_id": [f"P{i // 2}" for i in range(16)],
            "lesion_id": [f"L{i}" for i in range(16)],
            "lesion_class": ["cyst", "metastasis"] * 8,
        }
    )
    data = FoldData(index, arrays, np.array([0, 1] * 8))
    cfg = load_config(
        overrides=[a for a in TINY if a != "--set"]
        + ["train.deterministic=true", "train.seed=7", "train.recipe=end_to_end", "model.fusion=none"]
    )
    classes = ["cyst", "metastasis"]
    a = train_fold(tmp_path / "a", data, data, {"test": data}, classes, cfg, 0, {})
    b = train_fold(tmp_path / "b", data, data, {"test": data}, classes, cfg, 0, {})
    np.testing.assert_array_equal(a["test"]["prob_metastasis"], b["test"]["prob_metastasis"])
