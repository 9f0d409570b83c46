"""Calibration: ECE, reliability bins, NLL, and the per-fold temperature-scaling report.

Each fold's softmax temperature is the one its checkpoint recorded with the predictions (fitted at
training on that fold's inner-validation logits only; 1 for a fusion fold that keeps one calibrated
half alone), else fitted here on the same inner-validation logits
(:func:`liverlesion.inference.fit_temperature`); the report compares the calibration before and after.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from liverlesion.inference import _nll_at, apply_temperature, fit_temperature
from liverlesion.predictions import PredictionArrays, fold_sort_key

MIN_VAL_FOR_TEMPERATURE = 30  # fewer inner-validation lesions: the fitted T is flagged as unstable


def _calibration_bins(correct: np.ndarray, conf: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Equal-width bins on [0, 1]: (count, mean confidence, observed frequency) per bin."""
    conf = np.asarray(conf, dtype=float)
    b = np.minimum((conf * n_bins).astype(int), n_bins - 1)  # p == 1.0 falls into the last bin
    b = np.maximum(b, 0)
    count = np.bincount(b, minlength=n_bins).astype(float)
    sum_conf = np.bincount(b, weights=conf, minlength=n_bins)
    sum_obs = np.bincount(b, weights=np.asarray(correct, dtype=float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, sum_conf / count, sum_obs / count


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-width bins: sum over bins of (n_bin / n) * |observed - mean predicted|.

    Args:
        y_true: 0/1 outcome per sample (the positive class, or "prediction was correct").
        prob: Predicted probability of that outcome.
        n_bins: Number of equal-width bins on [0, 1].
    """
    y_true = np.asarray(y_true, dtype=float)
    if len(y_true) == 0:
        return math.nan
    count, mean_conf, obs = _calibration_bins(y_true, prob, n_bins)
    used = count > 0
    return float(np.sum(count[used] / count.sum() * np.abs(obs[used] - mean_conf[used])))


def reliability_bins(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> list[dict[str, Any]]:
    """Per-bin table for a reliability diagram (lower/upper edge, count, mean predicted, observed)."""
    count, mean_conf, obs = _calibration_bins(np.asarray(y_true, dtype=float), prob, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return [
        {
            "lower": float(edges[i]),
            "upper": float(edges[i + 1]),
            "count": int(count[i]),
            "mean_predicted": float(mean_conf[i]) if count[i] else None,
            "observed": float(obs[i]) if count[i] else None,
        }
        for i in range(n_bins)
    ]


def nll(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (``y``: class index, ``probs``: ``(N, K)``)."""
    # Same formula and clipping as sklearn.metrics.log_loss (tested against it); written out
    # because log_loss's input checks dominate the bootstrap's run time.
    p = np.clip(probs[np.arange(len(y)), y], np.finfo(float).eps, 1.0)
    return float(-np.mean(np.log(p))) if len(y) else math.nan


def fold_temperatures(
    data: PredictionArrays,
    val: PredictionArrays | None,
    val_where: str,
    stored: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per fold of ``data``: the temperature its probabilities were made with, else one fitted here.

    Args:
        data: Test predictions.
        val: Inner-validation predictions (None: nothing fitted).
        val_where: Name of the inner-validation predictions, for notes.
        stored: Per-fold temperatures recorded with the predictions (``temperature`` column: each
            fold's checkpoint, as ``predict`` applies it); they take precedence over a refit.
    """
    out: dict[str, Any] = {}
    stored = stored or {}
    for f in sorted(set(data.folds), key=fold_sort_key):
        if data.logits is None:
            out[f] = {"temperature": 1.0, "fitted": False, "note": "no logit_<class> columns; not calibrated"}
            continue
        m = None if val is None else (val.folds == f)
        have_val = val is not None and val.logits is not None and bool(m.any())
        if f in stored:
            t = stored[f]
            out[f] = {
                "temperature": t,
                "fitted": t != 1.0,
                "source": "checkpoint",
                "note": "the checkpoint's, fitted on inner validation at training"
                if t != 1.0
                else "1 in the checkpoint (a fusion fold that keeps one calibrated half alone)",
            }
            if have_val:
                lg, y = val.logits[m], val.y[m]
                out[f] |= {
                    "val_nll_before": _nll_at(lg, y, 1.0),
                    "val_nll_after": _nll_at(lg, y, t),
                    "n_val_lesions": int(m.sum()),
                }
            continue
        if not have_val:
            why = (
                f"no {val_where}"
                if val is None
                else (
                    f"no logits in {val_where}" if val.logits is None else f"fold {f} absent from {val_where}"
                )
            )
            out[f] = {"temperature": 1.0, "fitted": False, "note": f"{why}; T = 1"}
            continue
        lg, y = val.logits[m], val.y[m]
        t = fit_temperature(lg, y)
        fitted = len(np.unique(y)) > 1
        note = "fitted on inner validation" if fitted else "inner validation has one class only; T = 1"
        if fitted and m.sum() < MIN_VAL_FOR_TEMPERATURE:
            note += f" (only {int(m.sum())} lesions: unstable)"
        out[f] = {
            "temperature": t,
            "fitted": fitted,
            "note": note,
            "val_nll_before": _nll_at(lg, y, 1.0),
            "val_nll_after": _nll_at(lg, y, t),
            "n_val_lesions": int(m.sum()),
        }
    return out


def calibration_block(data: PredictionArrays, probs: np.ndarray, n_bins: int) -> dict[str, Any]:
    """Brier score, ECE, NLL and reliability bins of ``probs`` against ``data``'s truth.

    Binary: on the positive-class probability; more classes: top-class confidence vs accuracy.
    """
    if data.binary:
        target, conf = (data.y == data.pos).astype(float), probs[:, data.pos]
        brier = float(np.mean((conf - target) ** 2))
    else:
        target, conf = (probs.argmax(1) == data.y).astype(float), probs.max(1)
        brier = float(np.mean(np.sum((probs - np.eye(len(data.classes))[data.y]) ** 2, axis=1)))
    return {
        "brier": brier,
        "ece": expected_calibration_error(target, conf, n_bins),
        "nll": nll(data.y, probs),
        "bins": reliability_bins(target, conf, n_bins),
    }


def calibration_report(data: PredictionArrays, temps: dict[str, Any], n_bins: int) -> dict[str, Any]:
    """Calibration before and after each fold's temperature (``calibration`` of metrics.json)."""
    if data.logits is None:
        return {"available": False, "note": "no logit_<class> columns; temperature scaling not possible"}
    t = np.array([temps[f]["temperature"] for f in data.folds], dtype=float)[:, None]
    before = apply_temperature(data.logits, 1.0)
    after = apply_temperature(data.logits / t, 1.0)
    fitted = any(v.get("fitted") for v in temps.values())

    return {
        "available": True,
        "fitted": fitted,
        "target": (
            f"probability of {data.classes[data.pos]!r}"
            if data.binary
            else "top-class confidence vs accuracy"
        ),
        "note": (
            "before = softmax(logits); after = softmax(logits / T) with each fold's T (from its checkpoint, "
            "else fitted on its inner validation)"
            if fitted
            else "no fold could be fitted (see temperatures); after = before"
        ),
        "n_bins": n_bins,
        "before": calibration_block(data, before, n_bins),
        "after": calibration_block(data, after, n_bins),
    }
