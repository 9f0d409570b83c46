"""Per-fold decision thresholds of out-of-fold predictions, and their application.

The rule that picks a threshold (Youden on inner validation, a fixed value, 0.5) is
:mod:`liverlesion.decision`'s; this module applies it fold by fold: each fold's threshold
comes from the checkpoint (recorded in the predictions), the config, or that fold's
inner-validation predictions, never from its test predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from liverlesion.decision import threshold_with_note
from liverlesion.errors import UserError
from liverlesion.predictions import PredictionArrays, fold_sort_key, prediction_arrays


def stored_thresholds(df: pd.DataFrame) -> dict[str, float]:
    """Per-fold thresholds recorded with the predictions (taken from each fold's checkpoint)."""
    return stored_per_fold(df, "threshold")


def stored_per_fold(df: pd.DataFrame, column: str) -> dict[str, float]:
    """Per fold, the first finite value of ``column`` (a decision recorded with the predictions)."""
    if column not in df.columns:
        return {}
    t = pd.to_numeric(df[column], errors="coerce")
    out = {}
    for f, v in zip(df["fold"].astype(str), t, strict=True):
        if np.isfinite(v):
            out.setdefault(f, float(v))
    return out


def fold_thresholds(
    data: PredictionArrays,
    val: PredictionArrays | None,
    method: str | float,
    val_where: str,
    stored: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Each fold's threshold with its source and a note (``threshold.per_fold`` of metrics.json).

    Args:
        data: Test predictions.
        val: Inner-validation predictions (None: threshold 0.5 unless fixed or stored).
        method: ``"youden"`` or a fixed probability.
        val_where: Name of the inner-validation predictions, for notes.
        stored: Per-fold thresholds recorded with the predictions (they take precedence).
    """
    out: dict[str, Any] = {}
    for f in sorted(set(data.folds), key=fold_sort_key):
        if data.binary and stored and f in stored:
            out[f] = {
                "threshold": stored[f],
                "source": "checkpoint",
                "note": "fitted at training on the fold's calibrated inner-validation probabilities",
            }
            continue
        if not data.binary:
            out[f] = {
                "threshold": None,
                "source": "argmax",
                "note": "more than two classes: predicted class = argmax",
            }
            continue
        if method != "youden":
            out[f] = {
                "threshold": float(method),
                "source": "config",
                "note": f"fixed threshold {float(method):g}",
            }
            continue
        if val is None:
            out[f] = {"threshold": 0.5, "source": "default", "note": f"no {val_where}; threshold 0.5"}
            continue
        m = val.folds == f
        if not m.any():
            out[f] = {
                "threshold": 0.5,
                "source": "default",
                "note": f"fold {f} absent from {val_where}; threshold 0.5",
            }
            continue
        t, note = threshold_with_note((val.y[m] == val.pos).astype(int), val.probs[m, val.pos], "youden")
        source = "inner-validation" if note.startswith("Youden") else "default"
        out[f] = {"threshold": t, "source": source, "note": note, "n_val_lesions": int(m.sum())}
    return out


def predict_classes(data: PredictionArrays, thresholds: dict[str, Any]) -> np.ndarray:
    """Predicted class index per row: each fold's threshold (binary) or argmax."""
    if not data.binary:
        return data.probs.argmax(1)
    t = np.array([thresholds[f]["threshold"] for f in data.folds], dtype=float)
    return np.where(data.probs[:, data.pos] >= t, data.pos, 1 - data.pos)


def apply_thresholds(
    df: pd.DataFrame, classes: Sequence[str], positive_class: str, thresholds: dict[str, Any]
) -> pd.DataFrame:
    """Copy of ``df`` whose ``pred_class`` uses each fold's threshold (as recorded in metrics.json).

    Args:
        df: Predictions frame.
        classes: Class names.
        positive_class: Positive class.
        thresholds: ``{fold: {"threshold": t, ...}}`` (``per_fold`` of a summary's ``threshold``).
    """
    data = prediction_arrays(df, classes, positive_class)
    out = df.copy()
    if data.binary:
        missing = sorted(set(data.folds) - set(map(str, thresholds)))
        if missing:
            raise UserError(
                f"metrics.json has no threshold for fold(s) {missing}; re-run `liverlesion evaluate`"
            )
    pred = (
        predict_classes(data, {str(k): v for k, v in thresholds.items()})
        if data.binary
        else data.probs.argmax(1)
    )
    out["pred_class"] = [data.classes[i] for i in pred]
    return out
