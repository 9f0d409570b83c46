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
