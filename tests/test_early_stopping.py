"""lpft early stopping: what it watches on inner validation (``train.stop_on``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from liverlesion.config import load_config
from liverlesion.errors import UserError
from liverlesion.lightning_modules import calibrated_loss
from liverlesion.lpft import _fit_stage, _Views


def _logits(n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    s = 1.2 * (2 * y - 1) + rng.normal(size=n)
    return torch.from_numpy(np.c_[-s / 2, s / 2]), torch.from_numpy(y)


def test_calibrated_loss_ignores_how_confident_the_logits_are():
    cfg = load_config()
    z, y = _logits()
    # raw cross-entropy depends on the scale of the logits; after the fitted temperature it does not
    raw = [float(F.cross_entropy(c * z, y)) for c in (0.3, 1.0, 8.0)]
    assert max(raw) - min(raw) > 0.2
    cal = [calibrated_loss(c * z, y, None, cfg) for c in (0.3, 1.0, 8.0)]
    assert cal == pytest.approx([cal[1]] * 3, rel=1e-3) and cal[1] <= min(raw) + 1e-6
    # but it still tells a better ranking from a worse one
    noisy = z + torch.from_numpy(np.random.default_rng(1).normal(scale=2.0, size=z.shape))
    assert calibrated_loss(noisy, y, None, cfg) > calibrated_loss(z, y, None, cfg)
    w = torch.tensor([2.0, 0.5])  # class weights weight it as the raw loss does
    assert calibrated_loss(z, y, w, cfg) != pytest.approx(calibrated_loss(z, y, None, cfg))


def test_stop_on_is_checked():
    assert load_config(overrides=["train.stop_on=calibrated_loss"]).train.stop_on == "calibrated_loss"
    with pytest.raises(UserError, match="stop_on"):
        load_config(overrides=["train.stop_on=auc"])


@pytest.mark.parametrize("stop_on,logged", [("loss", "val_loss"), ("calibrated_loss", "val_loss_calibrated")])
def test_a_stage_keeps_the_epoch_best_in_what_it_watches(tmp_path, stop_on, logged):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 30)
    feats = [(rng.normal(size=(2, 1, 8)) + 0.8 * lab).astype(np.float32) for lab in y]  # 2 views, 1 sample
    cfg = load_config(overrides=[f"train.stop_on={stop_on}", "train.patience=50", "train.batch_size=16"])
    net = torch.nn.Linear(8, 2)
    info = _fit_stage(
        net, list(net.parameters()), 0.05, 6,
        _Views(feats[:40], y[:40], 2, True), _Views(feats[40:], y[40:], 2, False),
        cfg, None, tmp_path, "probe", False,
    )  # fmt: skip
    log = pd.read_csv(next(tmp_path.rglob("csv_probe/metrics.csv")))
    watched = log[logged].dropna().to_numpy()
    assert len(watched) == 6
    assert info["best_val_loss"] == pytest.approx(min(info["start_val_loss"], watched.min()), rel=1e-5)
    assert info["best_epochs"] == (
        int(np.argmin(watched)) + 1 if watched.min() < info["start_val_loss"] else 0
    )
