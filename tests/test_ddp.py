"""The distributed path: ``torchrun --nproc_per_node=2`` + Lightning DDP on CPU (gloo) trains to the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow

SETTINGS = [
    "model.backbone=test_resnet",
    "model.weights=none",
    "model.fusion=none",
    "patch.size_px=48",
    "train.epochs=2",
    "train.accelerator=cpu",
    "train.batch_size=4",
    "train.max_threads=1",
]


def _liverlesion() -> str:
    exe = Path(sys.executable).with_name("liverlesion")
    return str(exe) if exe.exists() else shutil.which("liverlesion")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIVERLESION_PROGRESS": "0"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("recipe", ["end_to_end", "lpft", "lpft:finetune_views=1"])
def test_torchrun_two_processes_match_one(tmp_path, recipe):
    """``lpft:finetune_views=1``: the quick preset's sampler of one cached view per lesion stack per epoch."""
    recipe, _, views = recipe.partition(":finetune_views=")
    from liverlesion.synth import generate_cohort

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    generate_cohort(tmp_path / "cohort", patients=6, lesions=14, seed=2, matrix=192, workers=1)
    extra = [f"train.finetune_views={views}"] if views else []
    sets = [a for s in [*SETTINGS, f"train.recipe={recipe}", *extra] for a in ("--set", s)]
    manifest = str(tmp_path / "cohort" / "manifest.csv")
    one = _run([_liverlesion(), "train", manifest, "-o", "one", *sets, "--set", "train.devices=1"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            _liverlesion(),
            "train",
            manifest,
            "-o",
            "two",
            *sets,
            "--set",
            "train.devices=2",
        ],
        tmp_path,
    )
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])
    assert "already exists" not in two.stderr  # the second rank did not trip over the first one's folder

    def files(run: Path) -> set[str]:
        return {p.name for p in run.iterdir() if p.name not in ("logs", "checkpoints")}

    assert files(tmp_path / "two") == files(tmp_path / "one")
    a = torch.load(tmp_path / "one" / "model.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "two" / "model.pt", map_location="cpu", weights_only=False)
    assert set(a["state_dict"]) == set(b["state_dict"])
    assert a["class_names"] == b["class_names"] and b["threshold"] is not None
    pa = pd.read_csv(tmp_path / "one" / "val_predictions.csv")
    pb = pd.read_csv(tmp_path / "two" / "val_predictions.csv")
    assert list(pa.columns) == list(pb.columns)
    assert sorted(pa["lesion_id"]) == sorted(pb["lesion_id"])  # every lesion once, not per rank
    assert pb["prob_metastasis"].between(0, 1).all()
    # the model from two processes is usable by predict like any other
    pred = _run(
        [_liverlesion(), "predict", "--model", "two/model.pt", "--manifest", manifest, "--out", "pred"],
        tmp_path,
    )
    assert pred.returncode == 0, pred.stderr[-2000:]
