"""Faults: `liverlesion cv` killed with SIGKILL in the middle of a fold, then `--resume`.

In deterministic mode the resumed run must give a ``predictions.csv`` byte-identical to an
uninterrupted run. end_to_end resumes the interrupted fold from its ``last.ckpt`` (written after
every epoch, so at most the epoch in progress is lost: checked on the resumed fold's training log);
lpft keeps no checkpoint and retrains the interrupted fold from its start (its stages are short
and run on cached features), which must still give the same numbers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch


def _settings(recipe: str) -> list[str]:
    sets = [
        "model.backbone=resnet10t",
        "model.weights=none",
        "model.fusion=none",
        "patch.size_px=32",
        f"train.recipe={recipe}",
        "train.epochs=8",
        "train.probe_epochs=8",
        "train.patience=20",
        "train.aug_views=1",
        "train.batch_size=8",
        "train.deterministic=true",
        "train.max_threads=1",
        "cv.folds=2",
        "eval.n_bootstrap=0",
        "eval.gradcam_max=0",
    ]
    return [a for s in sets for a in ("--set", s)]


def _cv(manifest: Path, out: Path, recipe: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "liverlesion", "cv", str(manifest), str(out), "--no-baselines"] + (
        _settings(recipe) + list(extra)
    )


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from liverlesion.synth import generate_cohort

    root = tmp_path_factory.mktemp("resume")
    generate_cohort(root / "cohort", patients=8, lesions=20, seed=11, matrix=192, workers=1)
    return root / "cohort" / "manifest.csv"


def _kill_mid_fold(cmd: list[str], ready, timeout: float = 400.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    t0 = time.time()
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.time() - t0 < timeout, "timed out waiting for the fold to start"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["end_to_end", "lpft"])
def test_cv_killed_mid_fold_resumes_to_identical_predictions(cohort, tmp_path, recipe):
    full = tmp_path / "full"
    r = subprocess.run(_cv(cohort, full, recipe), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "killed"
    fold = run / "fold_1"
    last = fold / "checkpoints" / "last.ckpt"
    if recipe == "end_to_end":
        # fold 0 done, fold 1 has finished at least one epoch: its last.ckpt exists (and is loadable)
        def ready() -> bool:
            if not last.exists():
                return False
            try:
                torch.load(last, map_location="cpu", weights_only=False)
            except Exception:
                return False
            return True
    else:

        def ready() -> bool:  # fold 1's probe stage has started logging
            return (fold / "logs").exists()

    _kill_mid_fold(_cv(cohort, run, recipe), ready)
    assert (run / "fold_0" / "model.pt").exists()  # fold 0 finished ...
    assert not (fold / "model.pt").exists() and not (run / "predictions.csv").exists()  # ... fold 1 did not
    saved_epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"] if last.exists() else None

    r = subprocess.run(
        _cv(cohort, run, recipe, "--resume"), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Fold 1/2: already trained" in r.stdout  # fold 0 was not retrained
    assert (run / "predictions.csv").read_bytes() == (full / "predictions.csv").read_bytes()
    assert (run / "val_predictions.csv").read_bytes() == (full / "val_predictions.csv").read_bytes()

    if recipe == "end_to_end":
        # Resumed at the epoch after the last checkpoint: at most the epoch in progress was lost.
        assert saved_epoch is not None and saved_epoch < 7
        log = pd.read_csv(fold / "logs" / "csv" / "metrics.csv")
        resumed = sorted(log["epoch"].dropna().astype(int).unique())
        assert resumed[0] == saved_epoch + 1  # (Lightning's CSV log restarts with the resumed epochs)
        ckpt = torch.load(fold / "model.pt", map_location="cpu", weights_only=False)
        want = torch.load(full / "fold_1" / "model.pt", map_location="cpu", weights_only=False)
        assert ckpt["epochs_trained"] == want["epochs_trained"]
        for k, v in want["state_dict"].items():
            assert torch.equal(ckpt["state_dict"][k], v), k
