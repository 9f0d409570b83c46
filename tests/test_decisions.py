"""One path from logits to a decision: `predict` reproduces every row of a CV's predictions.csv.

A small CV (tiny backbone, the lpft recipe, radiomics fusion, flip TTA) is run on a synthetic
cohort; then each fold's test patients are classified by `liverlesion predict` with that fold's
checkpoint, from the images and masks, in a fresh process. Probability (to 1e-5), class and status
must agree, too-small lesions included; evaluate's metrics must cover only the classified lesions.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from liverlesion.config import load_config
from liverlesion.decision import CLASSIFIED, TOO_SMALL, choose_threshold, decide

# every test here reads one small CV run (Lightning, 30-50 s on 2 cores): the slow job (.ci/run-slow)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    from liverlesion.cv import run_cv
    from liverlesion.synth import generate_cohort

    root = tmp_path_factory.mktemp("decisions")
    generate_cohort(root / "cohort", patients=10, lesions=30, seed=5, matrix=192)
    cfg = load_config(
        overrides={
            "model": {"backbone": "resnet10t", "weights": "none", "fusion": "radiomics", "tta": "flips"},
            "patch": {"size_px": 48},
            "train": {"recipe": "lpft", "epochs": 2, "probe_epochs": 3, "aug_views": 1, "batch_size": 16},
            "cv": {"folds": 2},
            "eval": {"n_bootstrap": 0, "gradcam_max": 2, "min_size_mm": 6.0},
        }
    )
    run = run_cv(root / "cohort" / "manifest.csv", root / "run", cfg, baselines=False)
    return root, run


def test_predict_reproduces_cv_predictions(cv_run):
    root, run = cv_run
    preds = pd.read_csv(run / "predictions.csv", dtype={"lesion_id": str, "patient_id": str})
    manifest = pd.read_csv(root / "cohort" / "manifest.csv", dtype=str)
    splits = json.loads((run / "splits.json").read_text())
    assert set(preds["status"]) <= {CLASSIFIED, TOO_SMALL}
    assert (preds["status"] == TOO_SMALL).any() and (preds["status"] == CLASSIFIED).any()
    for s in splits["splits"]:
        k = s["fold"]
        sub = root / f"m{k}.csv"
        manifest[manifest["patient_id"].isin(s["test_patients"])].to_csv(sub, index=False)
        # manifest image paths are relative to the manifest's folder
        sub.rename(root / "cohort" / sub.name)
        out = root / f"pred{k}"
        r = subprocess.run(
            [
                sys.executable, "-m", "liverlesion", "predict",
                "--model", str(run / f"fold_{k}" / "model.pt"),
                "--manifest", str(root / "cohort" / sub.name),
                "--min-size-mm", "6",
                "--out", str(out),
            ],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = pd.read_csv(out / "results.csv", dtype={"lesion_id": str}).set_index("lesion_id")
        want = preds[preds["fold"] == k].set_index("lesion_id")
        assert sorted(got.index) == sorted(want.index)
        got = got.loc[want.index]
        assert list(got["status"]) == list(want["status"])
        assert list(got["pred_class"]) == list(want["pred_class"])
        for c in ("prob_cyst", "prob_metastasis"):
            np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), atol=1e-5, equal_nan=True)


def test_threshold_fitted_on_the_calibrated_probabilities_it_is_applied_to(cv_run):
    import torch

    _, run = cv_run
    val = pd.read_csv(run / "val_predictions.csv")
    for k, part in val.groupby("fold"):
        ckpt = torch.load(run / f"fold_{k}" / "model.pt", map_location="cpu", weights_only=True)
        ok = part[part["status"] == CLASSIFIED]
        y = (ok["true_class"] == "metastasis").astype(int).to_numpy()
        assert ckpt["threshold"] == pytest.approx(
            choose_threshold(y, ok["prob_metastasis"].to_numpy()), abs=1e-9
        )
        # predictions.csv's classes are that threshold applied to those probabilities
        pred = decide(
            ok[["prob_cyst", "prob_metastasis"]].to_numpy(),
            ["cyst", "metastasis"],
            "metastasis",
            ckpt["threshold"],
        )
        assert pred == list(ok["pred_class"])


def test_metrics_cover_only_classified_lesions(cv_run):
    _, run = cv_run
    metrics = json.loads((run / "metrics.json").read_text())
    preds = pd.read_csv(run / "predictions.csv")
    n_ok = int((preds["status"] == CLASSIFIED).sum())
    assert metrics["coverage"] == {
        "n_lesions": len(preds),
        "n_classified": n_ok,
        "n_too_small": len(preds) - n_ok,
        "fraction": pytest.approx(n_ok / len(preds)),
    }
    assert metrics["n_lesions"] == n_ok
    assert any("too small to characterise" in n for n in metrics["notes"])
