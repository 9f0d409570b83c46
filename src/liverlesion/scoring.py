"""Scoring one method's out-of-fold predictions: pooled, per fold and per size stratum.

:func:`summarize_predictions` ties the parts together for one method (network or baseline):
per-fold thresholds (:mod:`liverlesion.thresholds`) and temperatures
(:mod:`liverlesion.calibration`) fitted on inner validation, point metrics
(:mod:`liverlesion.metrics`) with patient-bootstrap CIs (:mod:`liverlesion.bootstrap`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, __version__
from liverlesion.bootstrap import bootstrap_ci, curves, point_only
from liverlesion.calibration import calibration_report, fold_temperatures
from liverlesion.decision import parse_threshold_method
from liverlesion.errors import UserError
from liverlesion.metrics import binary_metrics, multiclass_metrics, roc_auc
from liverlesion.predictions import (
    PredictionArrays,
    check_positive_class,
    fold_sort_key,
    prediction_arrays,
    validate_predictions,
)
from liverlesion.thresholds import fold_thresholds, predict_classes, stored_per_fold, stored_thresholds

# Size strata of the maximal axial diameter (mm): <10, 10 to 20 inclusive, >20 (see size_bin).
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("<10 mm", -math.inf, 10.0),
    ("10–20 mm", 10.0, 20.0),
    (">20 mm", 20.0, math.inf),
)
MIN_LESIONS_FOR_CI = 10  # smaller strata get point estimates only
MIN_PATIENTS_FOR_CI = 3


def metric_fn(
    data: PredictionArrays, pred: np.ndarray, n_bins: int
) -> Callable[[np.ndarray], dict[str, float]]:
    """Row indices -> the metrics of those rows, with the given predicted classes."""

    def fn(idx: np.ndarray) -> dict[str, float]:
        y, probs = data.y[idx], data.probs[idx]
        if data.binary:
            return binary_metrics(
                y == data.pos, probs[:, data.pos], y_pred=pred[idx] == data.pos, n_bins=n_bins
            )
        return multiclass_metrics(y, probs, data.classes, y_pred=pred[idx], n_bins=n_bins)

    return fn


def size_bin(d: np.ndarray) -> np.ndarray:
    """Size stratum per lesion: <10 mm, 10-20 mm (both ends inclusive), >20 mm, or unknown."""
    labels = np.full(len(d), "unknown", dtype=object)
    finite = np.isfinite(d)
    (small, _, lo), (mid, _, hi), (large, _, _) = SIZE_BINS
    labels[finite & (d < lo)] = small
    labels[finite & (d >= lo) & (d <= hi)] = mid
    labels[finite & (d > hi)] = large
    return labels


def class_counts(data: PredictionArrays) -> dict[str, int]:
    """Lesions per true class."""
    return {c: int(np.sum(data.y == i)) for i, c in enumerate(data.classes)}


def summarize_predictions(
    df: pd.DataFrame,
    positive_class: str,
    class_names: Sequence[str] | None = None,
    val_df: pd.DataFrame | None = None,
    *,
    n_bootstrap: int = 1000,
    threshold: str | float = "youden",
    n_bins: int = 10,
    seed: int = 0,
    detail: bool = True,
    name: str = "predictions",
) -> dict[str, Any]:
    """Metrics of one method's out-of-fold predictions, with patient-bootstrap CIs.

    Args:
        df: Predictions frame (``predictions.csv`` contract).
        positive_class: Class treated as positive for binary metrics and curves.
        class_names: Class order (default: the ``prob_`` columns).
        val_df: Inner-validation predictions (same columns) for per-fold thresholds and
            temperatures; without it the threshold is 0.5 and no temperature is fitted.
        n_bootstrap: Patient-level resamples (0: no CIs).
        threshold: ``"youden"`` or a fixed probability.
        n_bins: Calibration bins.
        seed: Bootstrap seed (the same seed gives the same resampled patients for every method).
        detail: Also bootstrap per fold and per size stratum (otherwise point values there).
        name: Label used in messages.

    Returns:
        A JSON-ready dict: counts, ``threshold``/``temperature`` per fold, ``metrics`` (pooled,
        ``{value, ci_low, ci_high, n_undefined}``), ``per_fold``, ``fold_mean``, ``size``,
        ``confusion_matrix``, ``calibration``, ``curves``, ``notes``.
    """
    classes = validate_predictions(df, name, class_names)
    check_positive_class(positive_class, classes, name)
    if n_bootstrap < 0:
        raise UserError(f"--n-bootstrap {n_bootstrap}: must be 0 (no CIs) or a positive number, e.g. 1000")
    method = parse_threshold_method(threshold)
    data = prediction_arrays(df, classes, positive_class)
    dup = pd.Series(data.lesions).duplicated()
    if dup.any():
        raise UserError(
            f"{name}: lesion_id {data.lesions[dup.to_numpy()][0]!r} appears more than once; "
            "out-of-fold predictions need one row per lesion"
        )
    val = None
    if val_df is not None:
        validate_predictions(val_df, f"{name} (inner validation)", classes)
        val = prediction_arrays(val_df, classes, positive_class)
    val_where = f"inner-validation predictions for {name}"
    thresholds = fold_thresholds(data, val, method, val_where, stored_thresholds(df))
    temps = fold_temperatures(data, val, val_where, stored_per_fold(df, "temperature"))
    weights = stored_per_fold(df, "network_weight")  # fusion models only
    pred = predict_classes(data, thresholds)
    notes: list[str] = []
    if data.binary and val is None and method == "youden":
        notes.append("no inner-validation predictions: threshold 0.5 in every fold (not tuned)")

    fn = metric_fn(data, pred, n_bins)
    metrics = bootstrap_ci(fn, data.patients, n_bootstrap, seed, desc=f"{name}: bootstrap")
    network_half = _network_half(df, data, classes, n_bootstrap, seed, name)

    per_fold: dict[str, Any] = {}
    for f in sorted(set(data.folds), key=fold_sort_key):
        idx = np.flatnonzero(data.folds == f)
        sub, fn_f = data.take(idx), metric_fn(data.take(idx), pred[idx], n_bins)
        ci = detail and len(idx) >= MIN_LESIONS_FOR_CI
        per_fold[f] = {
            "n_patients": int(len(set(sub.patients))),
            "n_lesions": int(len(idx)),
            "n_per_class": class_counts(sub),
            "threshold": thresholds[f]["threshold"],
            "temperature": temps[f]["temperature"],
            **({"network_weight": weights.get(f)} if weights else {}),
            "metrics": (
                bootstrap_ci(fn_f, sub.patients, n_bootstrap, seed, desc=f"{name}: fold {f}")
                if ci
                else point_only(fn_f, len(idx))
            ),
        }
    fold_mean = {}
    for k in metrics:
        vals = np.array([v["metrics"][k]["value"] for v in per_fold.values()], dtype=float)
        vals = vals[np.isfinite(vals)]
        fold_mean[k] = {
            "mean": float(vals.mean()) if len(vals) else None,
            "sd": float(vals.std(ddof=1)) if len(vals) > 1 else None,
            "n_folds": int(len(vals)),
        }

    size = []
    bins = size_bin(data.diameter)
    for label in [b[0] for b in SIZE_BINS] + ["unknown"]:
        idx = np.flatnonzero(bins == label)
        if label == "unknown" and not len(idx):
            continue
        entry: dict[str, Any] = {"bin": label, "n_lesions": int(len(idx))}
        if len(idx):
            sub = data.take(idx)
            fn_s = metric_fn(sub, pred[idx], n_bins)
            entry["n_patients"] = int(len(set(sub.patients)))
            entry["n_per_class"] = class_counts(sub)
            enough = len(idx) >= MIN_LESIONS_FOR_CI and entry["n_patients"] >= MIN_PATIENTS_FOR_CI
            entry["metrics"] = (
                bootstrap_ci(fn_s, sub.patients, n_bootstrap, seed, desc=f"{name}: {label}")
                if detail and enough
                else point_only(fn_s, len(idx))
            )
            if detail and not enough:
                entry["note"] = (
                    f"fewer than {MIN_LESIONS_FOR_CI} lesions or {MIN_PATIENTS_FOR_CI} patients: no CI"
                )
        size.append(entry)
    if np.isnan(data.diameter).all():
        notes.append("no max_axial_diameter_mm column: no size breakdown")

    k = len(classes)
    cm = np.bincount(data.y * k + pred, minlength=k * k).reshape(k, k)
    return {
        "name": name,
        "task": "binary" if data.binary else "multiclass",
        "class_names": classes,
        "positive_class": positive_class,
        "n_patients": int(len(set(data.patients))),
        "n_lesions": int(len(data.y)),
        "n_per_class": class_counts(data),
        "n_folds": len(per_fold),
        "has_validation": val is not None,
        "threshold": {"method": method if method == "youden" else float(method), "per_fold": thresholds},
        "temperature": {"per_fold": temps},
        "metrics": metrics,
        "per_fold": per_fold,
        "fold_mean": fold_mean,
        "size": size,
        "confusion_matrix": {
            "labels": classes,
            "counts": cm.tolist(),
            "rows": "true",
            "columns": "predicted",
        },
        "calibration": calibration_report(data, temps, n_bins),
        "curves": curves(data, n_bootstrap, seed),
        "notes": notes,
        **({"network_half": network_half} if network_half else {}),
    }


def _network_half(
    df: pd.DataFrame,
    data: PredictionArrays,
    classes: list[str],
    n_bootstrap: int,
    seed: int,
    name: str,
) -> dict[str, Any] | None:
    """ROC AUC of a fusion model's network half alone (``network_prob_<class>``), on the same
    lesions and patient resamples; None for other models. It shows whether the trained network
    adds anything, next to the ``frozen_lr`` floor, whatever weight the fusion gave it."""
    cols = [f"network_prob_{c}" for c in classes]
    if not all(c in df.columns for c in cols):
        return None
    probs = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    if not np.isfinite(probs).all():
        return None
    half = dataclasses.replace(data, probs=probs / probs.sum(1, keepdims=True), logits=None)
    if half.binary:  # the AUC alone in the bootstrap loop, not every metric
        y_pos, score = half.y == half.pos, half.probs[:, half.pos]

        def fn(idx: np.ndarray) -> dict[str, float]:
            return {"roc_auc": roc_auc(y_pos[idx], score[idx])}
    else:
        every = metric_fn(half, np.zeros(len(half.y), dtype=int), n_bins=10)

        def fn(idx: np.ndarray) -> dict[str, float]:
            return {"roc_auc": every(idx)["roc_auc"]}

    auc = bootstrap_ci(
        fn,
        data.patients,
        n_bootstrap,
        seed,
        desc=f"{name}: network half",
    )
    return {"metrics": auc}


def diameter_summary(df: pd.DataFrame, diam: pd.Series, classes: list[str]) -> dict[str, Any]:
    """Per true class: median, quartiles, range and count of the lesion diameters (mm)."""
    out: dict[str, Any] = {}
    if diam.empty or diam.isna().all():
        return out
    for c in classes:
        d = diam[df["true_class"] == c].dropna()
        if len(d):
            q1, med, q3 = np.percentile(d, [25, 50, 75])
            out[c] = {
                "median": float(med),
                "q1": float(q1),
                "q3": float(q3),
                "min": float(d.min()),
                "max": float(d.max()),
                "n": int(len(d)),
            }
    return out


def metrics_head(
    run_dir: Path,
    classes: list[str],
    positive: str | None,
    network: dict[str, Any],
    coverage: dict[str, Any],
    validation: str | None = None,
) -> dict[str, Any]:
    """The first fields of ``metrics.json`` (its one owner), for a cv run or an external validation."""
    head: dict[str, Any] = {"format": "liverlesion.metrics", "format_version": 1}
    if validation is not None:
        head["validation"] = validation
    return head | {
        "disclaimer": DISCLAIMER,
        "liverlesion_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(Path(run_dir).resolve()),
        "class_names": classes,
        "positive_class": positive,
        "task": network["task"],
        "n_patients": network["n_patients"],
        "n_lesions": network["n_lesions"],
        "n_per_class": network["n_per_class"],
        "coverage": coverage,
    }
