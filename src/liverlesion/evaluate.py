"""Evaluation: out-of-fold predictions -> metrics with patient-bootstrap CIs -> ``metrics.json``.

Reads the run folder's files (``predictions.csv``, ``val_predictions.csv``, ``config.yaml``,
``run.json``, ``baselines/*/predictions.csv``), writes ``metrics.json`` and hands over to
:mod:`liverlesion.report` for the plots and ``report.html``.

Nothing is tuned on test data: each fold's decision threshold and softmax temperature
are fitted on that fold's inner-validation predictions only and then applied to the
fold's test predictions. Confidence intervals come from resampling *patients* (all
their lesions come along), because lesions of one patient are not independent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, __version__
from liverlesion.decision import (
    CLASSIFIED,
    choose_threshold,
    parse_threshold_method,
    threshold_with_note,
)
from liverlesion.errors import UserError
from liverlesion.fileio import write_json
from liverlesion.inference import _nll_at, apply_temperature, fit_temperature
from liverlesion.progress import progress_bar

__all__ = ["CLASSIFIED", "apply_temperature", "choose_threshold", "fit_temperature", "parse_threshold_method"]

CI_LEVEL = 0.95
# Size strata of the maximal axial diameter (mm): <10, 10 to 20 inclusive, >20 (see _size_bin).
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("<10 mm", -math.inf, 10.0),
    ("10–20 mm", 10.0, 20.0),
    (">20 mm", 20.0, math.inf),
)
MIN_LESIONS_FOR_CI = 10  # smaller strata get point estimates only
MIN_PATIENTS_FOR_CI = 3
MIN_DEFINED_FRACTION = 0.5
MIN_VAL_FOR_TEMPERATURE = 30  # fewer inner-validation lesions: the fitted T is flagged as unstable  # a CI needs at least half of the resamples to define the metric
CURVE_GRID = np.linspace(0.0, 1.0, 101)

BINARY_METRICS = (
    "accuracy",
    "f1",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "balanced_accuracy",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
    "nll",
)
MULTICLASS_METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc", "brier", "ece", "nll")
PER_CLASS_METRICS = ("sensitivity", "specificity", "ppv", "f1", "roc_auc")
METRIC_LABELS = {
    "accuracy": "Accuracy",
    "f1": "F1",
    "macro_f1": "Macro F1",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "balanced_accuracy": "Balanced accuracy",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (AP)",
    "brier": "Brier score",
    "ece": "ECE",
    "nll": "NLL (log loss)",
}
SUMMARY_METRICS = ("accuracy", "f1", "macro_f1", "sensitivity", "specificity", "roc_auc")


def metric_label(name: str) -> str:
    """Human-readable name of a metric key (``sensitivity_cyst`` -> ``Sensitivity (cyst)``)."""
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    for base in PER_CLASS_METRICS:
        if name.startswith(base + "_"):
            return f"{METRIC_LABELS[base]} ({name[len(base) + 1 :]})"
    return name


# --------------------------------------------------------------------------- metric functions
def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else math.nan


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


def _nll(y: np.ndarray, probs: np.ndarray) -> float:
    # Same formula and clipping as sklearn.metrics.log_loss (tested against it); written out
    # because log_loss's input checks dominate the bootstrap's run time.
    p = np.clip(probs[np.arange(len(y)), y], np.finfo(float).eps, 1.0)
    return float(-np.mean(np.log(p))) if len(y) else math.nan


def _clf_curve(y_pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (false positives, true positives) at each distinct score, highest first.

    The same counting as scikit-learn's ROC/PR curves; written out once here because the
    bootstrap calls it thousands of times and sklearn's input checks cost ~30x the
    arithmetic. ``roc_auc`` and ``average_precision`` are tested equal to sklearn's.
    """
    order = np.argsort(-np.asarray(score, dtype=float), kind="mergesort")
    s, y = np.asarray(score, dtype=float)[order], np.asarray(y_pos, dtype=float)[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of tied scores
    tps = np.cumsum(y)[ends]
    return (ends + 1) - tps, tps


def roc_auc(y_pos: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """ROC AUC (as ``sklearn.metrics.roc_auc_score``; ties count half); NaN with one class."""
    y = np.asarray(y_pos).astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        return math.nan
    fps, tps = _clf_curve(y, score)
    return float(np.trapezoid(np.r_[0.0, tps] / n_pos, np.r_[0.0, fps] / (len(y) - n_pos)))


def average_precision(y_pos: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """Average precision = PR AUC (as ``sklearn.metrics.average_precision_score``); NaN without positives."""
    y = np.asarray(y_pos).astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    fps, tps = _clf_curve(y, score)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_metrics(
    y_true: Sequence[int] | np.ndarray,
    p_pos: Sequence[float] | np.ndarray,
    threshold: float = 0.5,
    *,
    y_pred: Sequence[int] | np.ndarray | None = None,
    n_bins: int = 10,
) -> dict[str, float]:
    """Binary metrics for the positive class.

    Args:
        y_true: 1 where the lesion belongs to the positive class, else 0.
        p_pos: Predicted probability of the positive class.
        threshold: Predict positive where ``p_pos >= threshold`` (ignored when ``y_pred`` is given).
        y_pred: Predicted 0/1 labels, e.g. after per-fold thresholds.
        n_bins: Equal-width bins for the ECE (on the positive-class probability).

    Returns:
        accuracy, f1, sensitivity, specificity, ppv, npv, balanced_accuracy, roc_auc, pr_auc
        (average precision), brier, ece, nll. Undefined values (e.g. AUC with one class) are NaN.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=float)
    yp = (p >= threshold) if y_pred is None else np.asarray(y_pred).astype(bool)
    yb = y.astype(bool)
    tp = int(np.sum(yb & yp))
    fp = int(np.sum(~yb & yp))
    tn = int(np.sum(~yb & ~yp))
    fn = int(np.sum(yb & ~yp))
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    out = {
        "accuracy": _div(tp + tn, len(y)),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "balanced_accuracy": (sens + spec) / 2.0,
        "roc_auc": roc_auc(y, p),
        "pr_auc": average_precision(y, p),
        "brier": float(np.mean((p - y) ** 2)) if len(y) else math.nan,
        "ece": expected_calibration_error(y, p, n_bins),
        "nll": _nll(y, np.stack([1.0 - p, p], axis=1)),
    }
    return out


def multiclass_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    y_pred: Sequence[int] | np.ndarray | None = None,
    n_bins: int = 10,
) -> dict[str, float]:
    """Multi-class metrics plus a one-vs-rest breakdown per class.

    Args:
        y_true: True class index per lesion.
        probs: ``(N, K)`` class probabilities.
        class_names: The K class names (used in the per-class keys).
        y_pred: Predicted class index (default: argmax of ``probs``).
        n_bins: Equal-width bins for the ECE (on the top-class confidence).

    Returns:
        accuracy, macro_f1, balanced_accuracy, roc_auc (one-vs-rest macro), brier (sum over
        classes, range [0, 2]), ece, nll, and ``<metric>_<class>`` for sensitivity,
        specificity, ppv, f1 and roc_auc of each class.
    """
    y = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=float)
    k = probs.shape[1]
    # One-vs-rest AUC per class; the macro mean is sklearn's roc_auc_score(multi_class="ovr").
    aucs = np.array([roc_auc(y == c, probs[:, c]) for c in range(k)])
    pred = probs.argmax(1) if y_pred is None else np.asarray(y_pred).astype(int)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    present_true = support > 0
    # Like sklearn's macro averages: classes that occur in y_true or y_pred.
    present = present_true | (predicted > 0)
    f1 = np.array([_div(2 * tp[c], support[c] + predicted[c]) for c in range(k)])
    recall = np.array([_div(tp[c], support[c]) for c in range(k)])
    out: dict[str, float] = {
        "accuracy": _div(tp.sum(), len(y)),
        "macro_f1": float(np.mean(f1[present])) if present.any() else math.nan,
        "balanced_accuracy": float(np.mean(recall[present_true])) if present_true.any() else math.nan,
        "roc_auc": float(np.mean(aucs)) if np.isfinite(aucs).all() else math.nan,
        "brier": float(np.mean(np.sum((probs - np.eye(k)[y]) ** 2, axis=1))) if len(y) else math.nan,
        "ece": expected_calibration_error(pred == y, probs.max(1), n_bins),
        "nll": _nll(y, probs),
    }
    n = len(y)
    for c, name in enumerate(class_names):
        fp = predicted[c] - tp[c]
        tn = n - support[c] - fp
        out[f"sensitivity_{name}"] = recall[c]
        out[f"specificity_{name}"] = _div(tn, n - support[c])
        out[f"ppv_{name}"] = _div(tp[c], predicted[c])
        out[f"f1_{name}"] = f1[c]
        out[f"roc_auc_{name}"] = float(aucs[c])
    return out


# --------------------------------------------------------------------------- threshold and temperature
# --------------------------------------------------------------------------- bootstrap
def patient_bootstrap(
    groups: Sequence[str] | np.ndarray, n_bootstrap: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield row indices of patient-level bootstrap resamples.

    Patients are drawn with replacement; each drawn patient brings all of their rows.

    Args:
        groups: Patient id per row.
        n_bootstrap: Number of resamples.
        seed: Seed of ``numpy.random.default_rng``.
    """
    groups = np.asarray(groups)
    if len(groups) == 0:
        return
    _, inv = np.unique(groups, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inv))[:-1])
    rng = np.random.default_rng(seed)
    n = len(members)
    for _ in range(n_bootstrap):
        yield np.concatenate([members[i] for i in rng.integers(0, n, n)])


def _ci_entry(point: float, samples: Sequence[float], n_total: int) -> dict[str, Any]:
    arr = np.asarray(samples, dtype=float)
    ok = arr[np.isfinite(arr)]
    n_undef = int(n_total - len(ok))
    entry: dict[str, Any] = {"value": point, "ci_low": None, "ci_high": None, "n_undefined": n_undef}
    if n_total and len(ok) >= max(10, MIN_DEFINED_FRACTION * n_total) and np.isfinite(point):
        a = (1.0 - CI_LEVEL) / 2.0 * 100.0
        lo, hi = np.percentile(ok, [a, 100.0 - a])
        entry["ci_low"], entry["ci_high"] = float(lo), float(hi)
    return entry


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray], dict[str, float]],
    groups: Sequence[str] | np.ndarray,
    n_bootstrap: int,
    seed: int = 0,
    desc: str = "bootstrap",
    on_resample: Callable[[np.ndarray], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Point estimates and 95% patient-bootstrap percentile CIs of several metrics.

    Args:
        metric_fn: Maps row indices to ``{metric: value}``; called once on all rows for the point.
        groups: Patient id per row.
        n_bootstrap: Resamples (0: point estimates only).
        seed: Random seed.
        desc: Progress-bar label.
        on_resample: Also called with each resample's indices (e.g. to collect curves).

    Returns:
        ``{metric: {"value", "ci_low", "ci_high", "n_undefined"}}``; ``n_undefined`` counts
        resamples where the metric was undefined (e.g. one class only, so no AUC); those are
        skipped, and no CI is given if fewer than half of the resamples define the metric.
    """
    groups = np.asarray(groups)
    point = metric_fn(np.arange(len(groups)))
    samples: dict[str, list[float]] = {k: [] for k in point}
    it = patient_bootstrap(groups, n_bootstrap, seed)
    for idx in progress_bar(it, desc, total=n_bootstrap, enabled=n_bootstrap >= 50, log=False):
        values = metric_fn(idx)
        for k in samples:
            samples[k].append(values.get(k, math.nan))
        if on_resample is not None:
            on_resample(idx)
    return {k: _ci_entry(point[k], samples[k], n_bootstrap) for k in point}


# --------------------------------------------------------------------------- reading predictions
_TEXT = {"patient_id": str, "lesion_id": str, "true_class": str, "pred_class": str, "fold": str}


def read_predictions(
    path: str | Path, class_names: Sequence[str] | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Read and validate a predictions CSV (``predictions.csv`` contract in ARCHITECTURE.md).

    Args:
        path: The CSV.
        class_names: Expected classes (from ``run.json``); default: the ``prob_<class>`` columns in order.

    Returns:
        (frame with ids as text, class names).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=_TEXT, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: not a readable CSV ({str(e).splitlines()[0]}); re-run the step that wrote it"
        ) from e
    classes = _validate_predictions(df, str(path), class_names)
    return df, classes


def _validate_predictions(df: pd.DataFrame, where: str, class_names: Sequence[str] | None) -> list[str]:
    required = ["patient_id", "lesion_id", "true_class", "fold"]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(
            f"{where}: missing column(s) {', '.join(missing)}; expected patient_id, lesion_id, true_class, "
            "prob_<class>..., fold (see docs/ARCHITECTURE.md)"
        )
    prob_cols = [c[5:] for c in df.columns if c.startswith("prob_")]
    classes = list(class_names) if class_names else prob_cols
    absent = [c for c in classes if f"prob_{c}" not in df.columns]
    if len(classes) < 2 or absent:
        raise UserError(
            f"{where}: need a prob_<class> column for each class {list(classes) or '(none found)'}; "
            f"missing {', '.join('prob_' + c for c in absent) or 'at least two prob_ columns'}"
        )
    if df.empty:
        raise UserError(f"{where}: no rows; re-run the step that wrote it")
    for c in ("patient_id", "lesion_id", "true_class"):
        if df[c].isna().any():
            raise UserError(f"{where}: empty {c} in row(s) {_rows(df[c].isna())}; every row needs one")
    unknown = sorted(set(df["true_class"]) - set(classes))
    if unknown:
        raise UserError(f"{where}: true_class value(s) {unknown} are not among the classes {list(classes)}")
    probs = df[[f"prob_{c}" for c in classes]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    bad = ~np.isfinite(probs).all(1) | (probs < -1e-6).any(1) | (probs > 1 + 1e-6).any(1)
    if "status" in df.columns:  # lesions the size rule left unclassified carry no probabilities
        bad &= (df["status"].astype(str) == CLASSIFIED).to_numpy()
    if bad.any():
        raise UserError(f"{where}: probabilities missing or outside [0, 1] in row(s) {_rows(bad)}")
    return classes


def _rows(mask: Any) -> str:
    idx = np.flatnonzero(np.asarray(mask)) + 2  # +2: header line and 1-based numbering, as in a spreadsheet
    return ", ".join(str(i) for i in idx[:5]) + (" ..." if len(idx) > 5 else "")


@dataclass
class _Arrays:
    classes: list[str]
    pos: int
    y: np.ndarray
    probs: np.ndarray
    logits: np.ndarray | None
    patients: np.ndarray
    lesions: np.ndarray
    folds: np.ndarray
    diameter: np.ndarray

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def take(self, idx: np.ndarray) -> _Arrays:
        return _Arrays(
            self.classes,
            self.pos,
            self.y[idx],
            self.probs[idx],
            None if self.logits is None else self.logits[idx],
            self.patients[idx],
            self.lesions[idx],
            self.folds[idx],
            self.diameter[idx],
        )


def _arrays(df: pd.DataFrame, classes: Sequence[str], positive_class: str) -> _Arrays:
    classes = list(classes)
    probs = df[[f"prob_{c}" for c in classes]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    probs = np.clip(probs, 0.0, 1.0)
    s = probs.sum(1, keepdims=True)
    probs = np.where(s > 0, probs / np.where(s > 0, s, 1.0), 1.0 / len(classes))  # CSV rounding
    logit_cols = [f"logit_{c}" for c in classes]
    logits = None
    if all(c in df.columns for c in logit_cols):
        lg = df[logit_cols].apply(pd.to_numeric, errors="coerce").to_numpy(float)
        logits = lg if np.isfinite(lg).all() else None
    diam = (
        pd.to_numeric(df["max_axial_diameter_mm"], errors="coerce").to_numpy(float)
        if "max_axial_diameter_mm" in df.columns
        else np.full(len(df), np.nan)
    )
    index = {c: i for i, c in enumerate(classes)}
    return _Arrays(
        classes=classes,
        pos=index[positive_class],
        y=df["true_class"].map(index).to_numpy(int),
        probs=probs,
        logits=logits,
        patients=df["patient_id"].astype(str).to_numpy(),
        lesions=df["lesion_id"].astype(str).to_numpy(),
        folds=df["fold"].astype(str).to_numpy(),
        diameter=diam,
    )


def _fold_sort_key(f: str) -> tuple[int, Any]:
    return (0, int(f)) if str(f).lstrip("-").isdigit() else (1, str(f))


def _check_positive(positive_class: str, classes: Sequence[str], where: str) -> None:
    if positive_class not in classes:
        raise UserError(
            f"--positive-class {positive_class!r} is not among the classes in {where} "
            f"({', '.join(classes)}); pass --positive-class with one of them"
        )


# --------------------------------------------------------------------------- per-fold settings
def classified_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows the size rule let through (as ``predict`` would classify them), and the coverage."""
    n = len(df)
    if "status" not in df.columns:
        return df, {"n_lesions": n, "n_classified": n, "fraction": 1.0}
    keep = (df["status"].astype(str) == CLASSIFIED).to_numpy()
    out = df[keep].reset_index(drop=True)
    return out, {
        "n_lesions": n,
        "n_classified": int(keep.sum()),
        "n_too_small": int(n - keep.sum()),
        "fraction": float(keep.mean()) if n else 0.0,
    }


def _stored_thresholds(df: pd.DataFrame) -> dict[str, float]:
    """Per-fold thresholds recorded with the predictions (taken from each fold's checkpoint)."""
    if "threshold" not in df.columns:
        return {}
    t = pd.to_numeric(df["threshold"], errors="coerce")
    out = {}
    for f, v in zip(df["fold"].astype(str), t, strict=True):
        if np.isfinite(v):
            out.setdefault(f, float(v))
    return out


def _fold_thresholds(
    data: _Arrays,
    val: _Arrays | None,
    method: str | float,
    val_where: str,
    stored: dict[str, float] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in sorted(set(data.folds), key=_fold_sort_key):
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


def _fold_temperatures(data: _Arrays, val: _Arrays | None, val_where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in sorted(set(data.folds), key=_fold_sort_key):
        if data.logits is None:
            out[f] = {"temperature": 1.0, "fitted": False, "note": "no logit_<class> columns; not calibrated"}
            continue
        m = None if val is None else (val.folds == f)
        if val is None or val.logits is None or not m.any():
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


def _predict(data: _Arrays, thresholds: dict[str, Any]) -> np.ndarray:
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
    data = _arrays(df, classes, positive_class)
    out = df.copy()
    if data.binary:
        missing = sorted(set(data.folds) - set(map(str, thresholds)))
        if missing:
            raise UserError(
                f"metrics.json has no threshold for fold(s) {missing}; re-run `liverlesion evaluate`"
            )
    pred = _predict(data, {str(k): v for k, v in thresholds.items()}) if data.binary else data.probs.argmax(1)
    out["pred_class"] = [data.classes[i] for i in pred]
    return out


# --------------------------------------------------------------------------- summaries
def _metric_fn(data: _Arrays, pred: np.ndarray, n_bins: int) -> Callable[[np.ndarray], dict[str, float]]:
    def fn(idx: np.ndarray) -> dict[str, float]:
        y, probs = data.y[idx], data.probs[idx]
        if data.binary:
            return binary_metrics(
                y == data.pos, probs[:, data.pos], y_pred=pred[idx] == data.pos, n_bins=n_bins
            )
        return multiclass_metrics(y, probs, data.classes, y_pred=pred[idx], n_bins=n_bins)

    return fn


def _point_only(fn: Callable[[np.ndarray], dict[str, float]], n: int) -> dict[str, dict[str, Any]]:
    return {
        k: {"value": v, "ci_low": None, "ci_high": None, "n_undefined": None}
        for k, v in fn(np.arange(n)).items()
    }


def _roc_step(y_pos: np.ndarray, score: np.ndarray) -> np.ndarray | None:
    """TPR on CURVE_GRID of FPR (the ROC staircase), or None with one class."""
    n_pos = int(y_pos.sum())
    if n_pos == 0 or n_pos == len(y_pos):
        return None
    fps, tps = _clf_curve(y_pos, score)
    fpr, tpr = np.r_[0.0, fps] / (len(y_pos) - n_pos), np.r_[0.0, tps] / n_pos
    i = np.searchsorted(fpr, CURVE_GRID + 1e-12, side="right") - 1  # tolerance: 0.7 vs 0.7000000000000001
    return np.maximum.accumulate(tpr)[np.clip(i, 0, None)]


def _pr_interp(y_pos: np.ndarray, score: np.ndarray) -> np.ndarray | None:
    """Interpolated precision (max precision at recall >= r) on CURVE_GRID, or None without positives."""
    n_pos = int(y_pos.sum())
    if n_pos == 0:
        return None
    fps, tps = _clf_curve(y_pos, score)
    rec = np.r_[0.0, tps / n_pos]  # recall rises as the threshold falls; (0, 1) as in sklearn's curve
    prec = np.r_[1.0, tps / (tps + fps)]
    best_right = np.maximum.accumulate(prec[::-1])[::-1]
    i = np.searchsorted(rec, CURVE_GRID - 1e-12, side="left")
    return best_right[np.clip(i, 0, len(rec) - 1)]


def _curves(data: _Arrays, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """ROC and PR curves of the positive class (one-vs-rest) with bootstrap bands."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = (data.y == data.pos).astype(int)
    s = data.probs[:, data.pos]
    out: dict[str, Any] = {"positive_class": data.classes[data.pos], "grid": CURVE_GRID.round(4).tolist()}
    if y.min() == y.max():
        out["note"] = "one class only; no curves"
        return out
    fpr, tpr, _ = roc_curve(y, s)
    prec, rec, _ = precision_recall_curve(y, s)
    out["roc"] = {"fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}
    out["pr"] = {
        "recall": rec.round(5).tolist(),
        "precision": prec.round(5).tolist(),
        "prevalence": float(y.mean()),
    }
    rocs, prs = [], []
    for idx in patient_bootstrap(data.patients, n_bootstrap, seed):
        r, p = _roc_step(y[idx], s[idx]), _pr_interp(y[idx], s[idx])
        if r is not None:
            rocs.append(r)
        if p is not None:
            prs.append(p)
    a = (1.0 - CI_LEVEL) / 2.0 * 100.0
    for key, arrs in (("roc", rocs), ("pr", prs)):
        if len(arrs) >= 10:
            lo, hi = np.percentile(np.array(arrs), [a, 100.0 - a], axis=0)
            out[key]["band_low"], out[key]["band_high"] = lo.round(4).tolist(), hi.round(4).tolist()
    return out


def _calibration(data: _Arrays, temps: dict[str, Any], n_bins: int) -> dict[str, Any]:
    if data.logits is None:
        return {"available": False, "note": "no logit_<class> columns; temperature scaling not possible"}
    t = np.array([temps[f]["temperature"] for f in data.folds], dtype=float)[:, None]
    before = apply_temperature(data.logits, 1.0)
    after = apply_temperature(data.logits / t, 1.0)
    fitted = any(v.get("fitted") for v in temps.values())

    def block(probs: np.ndarray) -> dict[str, Any]:
        if data.binary:
            target, conf = (data.y == data.pos).astype(float), probs[:, data.pos]
            brier = float(np.mean((conf - target) ** 2))
        else:
            target, conf = (probs.argmax(1) == data.y).astype(float), probs.max(1)
            brier = float(np.mean(np.sum((probs - np.eye(len(data.classes))[data.y]) ** 2, axis=1)))
        return {
            "brier": brier,
            "ece": expected_calibration_error(target, conf, n_bins),
            "nll": _nll(data.y, probs),
            "bins": reliability_bins(target, conf, n_bins),
        }

    return {
        "available": True,
        "fitted": fitted,
        "target": (
            f"probability of {data.classes[data.pos]!r}"
            if data.binary
            else "top-class confidence vs accuracy"
        ),
        "note": (
            "before = softmax(logits); after = softmax(logits / T) with each fold's T from its inner validation"
            if fitted
            else "no fold could be fitted (see temperatures); after = before"
        ),
        "n_bins": n_bins,
        "before": block(before),
        "after": block(after),
    }


def _size_bin(d: np.ndarray) -> np.ndarray:
    """Size stratum per lesion: <10 mm, 10-20 mm (both ends inclusive), >20 mm, or unknown."""
    labels = np.full(len(d), "unknown", dtype=object)
    finite = np.isfinite(d)
    (small, _, lo), (mid, _, hi), (large, _, _) = SIZE_BINS
    labels[finite & (d < lo)] = small
    labels[finite & (d >= lo) & (d <= hi)] = mid
    labels[finite & (d > hi)] = large
    return labels


def _counts(data: _Arrays) -> dict[str, int]:
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
    classes = _validate_predictions(df, name, class_names)
    _check_positive(positive_class, classes, name)
    if n_bootstrap < 0:
        raise UserError(f"--n-bootstrap {n_bootstrap}: must be 0 (no CIs) or a positive number, e.g. 1000")
    method = parse_threshold_method(threshold)
    data = _arrays(df, classes, positive_class)
    dup = pd.Series(data.lesions).duplicated()
    if dup.any():
        raise UserError(
            f"{name}: lesion_id {data.lesions[dup.to_numpy()][0]!r} appears more than once; "
            "out-of-fold predictions need one row per lesion"
        )
    val = None
    if val_df is not None:
        _validate_predictions(val_df, f"{name} (inner validation)", classes)
        val = _arrays(val_df, classes, positive_class)
    val_where = f"inner-validation predictions for {name}"
    thresholds = _fold_thresholds(data, val, method, val_where, _stored_thresholds(df))
    temps = _fold_temperatures(data, val, val_where)
    pred = _predict(data, thresholds)
    notes: list[str] = []
    if data.binary and val is None and method == "youden":
        notes.append("no inner-validation predictions: threshold 0.5 in every fold (not tuned)")

    fn = _metric_fn(data, pred, n_bins)
    metrics = bootstrap_ci(fn, data.patients, n_bootstrap, seed, desc=f"{name}: bootstrap")

    per_fold: dict[str, Any] = {}
    for f in sorted(set(data.folds), key=_fold_sort_key):
        idx = np.flatnonzero(data.folds == f)
        sub, fn_f = data.take(idx), _metric_fn(data.take(idx), pred[idx], n_bins)
        ci = detail and len(idx) >= MIN_LESIONS_FOR_CI
        per_fold[f] = {
            "n_patients": int(len(set(sub.patients))),
            "n_lesions": int(len(idx)),
            "n_per_class": _counts(sub),
            "threshold": thresholds[f]["threshold"],
            "temperature": temps[f]["temperature"],
            "metrics": (
                bootstrap_ci(fn_f, sub.patients, n_bootstrap, seed, desc=f"{name}: fold {f}")
                if ci
                else _point_only(fn_f, len(idx))
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
    bins = _size_bin(data.diameter)
    for label in [b[0] for b in SIZE_BINS] + ["unknown"]:
        idx = np.flatnonzero(bins == label)
        if label == "unknown" and not len(idx):
            continue
        entry: dict[str, Any] = {"bin": label, "n_lesions": int(len(idx))}
        if len(idx):
            sub = data.take(idx)
            fn_s = _metric_fn(sub, pred[idx], n_bins)
            entry["n_patients"] = int(len(set(sub.patients)))
            entry["n_per_class"] = _counts(sub)
            enough = len(idx) >= MIN_LESIONS_FOR_CI and entry["n_patients"] >= MIN_PATIENTS_FOR_CI
            entry["metrics"] = (
                bootstrap_ci(fn_s, sub.patients, n_bootstrap, seed, desc=f"{name}: {label}")
                if detail and enough
                else _point_only(fn_s, len(idx))
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
        "n_per_class": _counts(data),
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
        "calibration": _calibration(data, temps, n_bins),
        "curves": _curves(data, n_bootstrap, seed),
        "notes": notes,
    }


# --------------------------------------------------------------------------- paired test
def _auc(y: np.ndarray, probs: np.ndarray, pos: int) -> float:
    """Binary AUC of the positive class, or one-vs-rest macro AUC for K > 2."""
    k = probs.shape[1]
    if k == 2:
        return roc_auc(y == pos, probs[:, pos])
    aucs = [roc_auc(y == c, probs[:, c]) for c in range(k)]
    return float(np.mean(aucs)) if np.isfinite(aucs).all() else math.nan


def paired_auc_test(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    positive_index: int = 1,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired patient-bootstrap test of the ROC AUC difference A - B on the same lesions.

    Both methods are scored on the same resampled patients in every resample. The
    two-sided p-value is twice the smaller fraction of resampled differences on either side
    of zero (with the +1 correction), capped at 1.

    Args:
        y_true: True class index per lesion.
        probs_a: ``(N, K)`` probabilities of method A.
        probs_b: ``(N, K)`` probabilities of method B (same lesion order).
        groups: Patient id per lesion.
        positive_index: Positive class index (binary AUC); K > 2 uses one-vs-rest macro AUC.
        n_bootstrap: Resamples.
        seed: Random seed.
    """
    y = np.asarray(y_true).astype(int)
    a, b = np.asarray(probs_a, dtype=float), np.asarray(probs_b, dtype=float)
    auc_a, auc_b = _auc(y, a, positive_index), _auc(y, b, positive_index)
    diffs = []
    for idx in progress_bar(
        patient_bootstrap(groups, n_bootstrap, seed),
        "paired test",
        total=n_bootstrap,
        enabled=n_bootstrap >= 50,
        log=False,
    ):
        d = _auc(y[idx], a[idx], positive_index) - _auc(y[idx], b[idx], positive_index)
        if np.isfinite(d):
            diffs.append(d)
    d = np.array(diffs)
    out: dict[str, Any] = {
        "metric": "roc_auc",
        "auc_a": auc_a,
        "auc_b": auc_b,
        "difference": auc_a - auc_b,
        "ci_low": None,
        "ci_high": None,
        "p_value": None,
        "n_bootstrap": int(n_bootstrap),
        "n_undefined": int(n_bootstrap - len(d)),
        "n_lesions": int(len(y)),
        "n_patients": int(len(set(np.asarray(groups).tolist()))),
    }
    if len(d) >= 10:
        alpha = (1.0 - CI_LEVEL) / 2.0 * 100.0
        lo, hi = np.percentile(d, [alpha, 100.0 - alpha])
        m = len(d)
        p = 2.0 * min((np.sum(d <= 0) + 1) / (m + 1), (np.sum(d >= 0) + 1) / (m + 1))
        out.update(ci_low=float(lo), ci_high=float(hi), p_value=float(min(1.0, p)))
    return out


def _compare(
    net_df: pd.DataFrame,
    baseline_dfs: dict[str, pd.DataFrame],
    baselines: dict[str, dict[str, Any]],
    classes: list[str],
    positive_class: str,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any] | None:
    aucs = {n: s["metrics"]["roc_auc"]["value"] for n, s in baselines.items()}
    aucs = {n: v for n, v in aucs.items() if v is not None and np.isfinite(v)}
    if not aucs:
        return None
    best = max(aucs, key=lambda n: aucs[n])
    bdf = baseline_dfs[best]
    merged = net_df.merge(bdf, on="lesion_id", suffixes=("", "__b"))
    if merged.empty:
        return {
            "a": "network",
            "b": best,
            "p_value": None,
            "difference": None,
            "note": f"baselines/{best}/predictions.csv shares no lesion_id with predictions.csv; no paired test",
        }
    wrong = merged["true_class"] != merged["true_class__b"]
    if wrong.any():
        lid = merged.loc[wrong, "lesion_id"].iloc[0]
        raise UserError(
            f"baselines/{best}/predictions.csv: lesion {lid!r} has a different true_class than predictions.csv; "
            "re-run the baselines on the same lesion table"
        )
    net = _arrays(merged, classes, positive_class)
    b = merged[["lesion_id", "patient_id", "true_class", "fold"] + [f"prob_{c}__b" for c in classes]].rename(
        columns={f"prob_{c}__b": f"prob_{c}" for c in classes}
    )
    base = _arrays(b, classes, positive_class)
    res = paired_auc_test(
        net.y, net.probs, base.probs, net.patients, positive_index=net.pos, n_bootstrap=n_bootstrap, seed=seed
    )
    res.update(a="network", b=best, selection="baseline with the highest pooled ROC AUC")
    if len(merged) != len(net_df) or len(merged) != len(bdf):
        res["note"] = (
            f"compared on the {len(merged)} lesions present in both ({len(net_df)} network, {len(bdf)} {best})"
        )
    return res


# --------------------------------------------------------------------------- formatting
def fmt_ci(entry: dict[str, Any] | None, digits: int = 2) -> str:
    """``0.93 [0.88–0.97]`` (or ``0.93`` without a CI, ``n/a`` when undefined)."""
    if not entry or entry.get("value") is None or not np.isfinite(entry["value"]):
        return "n/a"
    s = f"{entry['value']:.{digits}f}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        s += f" [{entry['ci_low']:.{digits}f}–{entry['ci_high']:.{digits}f}]"
    return s


def side_by_side_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (metric, network, baselines...) of the side-by-side comparison."""
    methods = {"network": metrics["network"], **metrics.get("baselines", {})}
    keys = list(metrics["network"]["metrics"])
    header = ["metric", *methods]
    rows = [[metric_label(k), *(fmt_ci(m["metrics"].get(k)) for m in methods.values())] for k in keys]
    return header, rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def format_comparison(cmp: dict[str, Any] | None) -> str:
    """One line describing the paired AUC test."""
    if not cmp:
        return "Paired test: no baseline with a defined ROC AUC."
    if cmp.get("difference") is None:
        return f"Paired test: {cmp.get('note', 'not possible')}"
    if cmp.get("p_value") is None:
        return (
            f"Paired test ROC AUC network − {cmp['b']}: {cmp['difference']:+.3f} (too few resamples for a CI)"
        )
    return (
        f"Paired patient-bootstrap test, ROC AUC network − {cmp['b']}: {cmp['difference']:+.3f} "
        f"[{cmp['ci_low']:+.3f} to {cmp['ci_high']:+.3f}], two-sided p = {cmp['p_value']:.3g}"
    )


def format_summary(metrics: dict[str, Any]) -> str:
    """The terminal summary printed by ``liverlesion evaluate``."""
    net = metrics["network"]
    lines = [
        f"liverlesion evaluate: {DISCLAIMER}",
        f"{metrics['n_lesions']} lesions, {metrics['n_patients']} patients, {net['n_folds']} folds; "
        f"classes {', '.join(metrics['class_names'])}; positive class {metrics['positive_class']!r}; "
        f"95% CIs from {metrics['settings']['n_bootstrap']} patient-level bootstrap resamples",
    ]
    thr = [v["threshold"] for v in net["threshold"]["per_fold"].values() if v["threshold"] is not None]
    if thr:
        lines.append(
            f"Threshold ({net['threshold']['method']}, chosen per fold on inner validation): "
            + ", ".join(f"{t:.3f}" for t in thr)
        )
    for k in SUMMARY_METRICS:
        if k in net["metrics"]:
            lines.append(f"  {metric_label(k):<14} {fmt_ci(net['metrics'][k])}")
    cal = net["calibration"]
    if cal.get("available") and "after" not in cal:
        b = cal["before"]
        lines.append(
            f"Calibration ({cal.get('label_before', 'before')}): ECE {b['ece']:.3f}, Brier {b['brier']:.3f}, "
            f"NLL {b['nll']:.3f}"
        )
    elif cal.get("available"):
        b, a = cal["before"], cal["after"]
        lines.append(
            f"Calibration (temperature scaling): ECE {b['ece']:.3f} -> {a['ece']:.3f}, "
            f"Brier {b['brier']:.3f} -> {a['brier']:.3f}, NLL {b['nll']:.3f} -> {a['nll']:.3f}"
        )
    lines.append("")
    lines.append(format_table(*side_by_side_rows(metrics)))
    if metrics.get("baselines"):
        lines.append(format_comparison(metrics.get("comparison")))
    for n in metrics.get("notes", []):
        lines.append(f"Note: {n}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- run folder
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-run `liverlesion cv` or repair the file") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; re-run `liverlesion cv`")
    return data


def _run_config(run_dir: Path):
    from liverlesion.config import Config, load_config

    path = run_dir / "config.yaml"
    return (
        (load_config(path), None)
        if path.is_file()
        else (Config(), "no config.yaml in the run folder: defaults used")
    )


def evaluate_run(
    run_dir: str | Path,
    positive_class: str | None = None,
    n_bootstrap: int | None = None,
    gradcam: bool = True,
) -> dict[str, Any]:
    """Evaluate a run folder: ``metrics.json``, ``plots/*.png`` and ``report.html``.

    Args:
        run_dir: Folder written by ``liverlesion cv`` (holding ``predictions.csv``), or the output
            of ``liverlesion predict --manifest`` on a labelled manifest (folder or its ``results.csv``):
            external validation, see :mod:`liverlesion.external`.
        positive_class: Positive class (default: ``eval.positive_class`` of the run's config).
        n_bootstrap: Patient-level bootstrap resamples (default: ``eval.n_bootstrap``).
        gradcam: Draw the Grad-CAM gallery (needs the fold models and the patch cache).

    Returns:
        The content of ``metrics.json``.
    """
    from liverlesion.external import evaluate_external, is_predict_output

    run_dir = Path(run_dir)
    if is_predict_output(run_dir):  # external validation: the output of predict on a labelled manifest
        return evaluate_external(run_dir, positive_class=positive_class, n_bootstrap=n_bootstrap)
    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir}: run folder not found; give the folder written by `liverlesion cv`, or the "
            "output folder of `liverlesion predict --manifest` for external validation"
        )
    pred_path = run_dir / "predictions.csv"
    if not pred_path.is_file():
        raise UserError(
            f"{pred_path}: not found; run `liverlesion cv MANIFEST {run_dir}` first to write out-of-fold predictions"
        )
    cfg, cfg_note = _run_config(run_dir)
    run_info = _read_json(run_dir / "run.json")
    pos = positive_class if positive_class is not None else cfg.eval.positive_class
    nb = cfg.eval.n_bootstrap if n_bootstrap is None else int(n_bootstrap)
    if nb < 0:
        raise UserError(f"--n-bootstrap {nb}: must be 0 (no CIs) or a positive number, e.g. 1000")
    method = parse_threshold_method(cfg.eval.threshold)
    n_bins = int(cfg.eval.n_calibration_bins)
    if n_bins < 2:
        raise UserError(f"eval.n_calibration_bins={n_bins}: use at least 2 bins, e.g. 10")
    seed = int(cfg.cv.seed)

    df, classes = read_predictions(pred_path, run_info.get("class_names"))
    _check_positive(pos, classes, str(pred_path))
    df, coverage = classified_rows(df)
    covered = set(df["lesion_id"].astype(str))
    val_path = run_dir / "val_predictions.csv"
    val_df = classified_rows(read_predictions(val_path, classes)[0])[0] if val_path.is_file() else None
    notes = [n for n in [cfg_note] if n]
    if val_df is None:
        notes.append(f"{val_path.name} not found: threshold 0.5 and no temperature scaling")

    common = {"n_bootstrap": nb, "threshold": method, "n_bins": n_bins, "seed": seed}
    network = summarize_predictions(df, pos, classes, val_df, detail=True, name="network", **common)

    baselines: dict[str, dict[str, Any]] = {}
    baseline_dfs: dict[str, pd.DataFrame] = {}
    for bpath in sorted((run_dir / "baselines").glob("*/predictions.csv")):
        bname = bpath.parent.name
        bdf, _ = read_predictions(bpath, classes)
        bdf = bdf[bdf["lesion_id"].astype(str).isin(covered)].reset_index(drop=True)  # same lesions
        bval_path = bpath.parent / "val_predictions.csv"
        bval = read_predictions(bval_path, classes)[0] if bval_path.is_file() else None
        # Without its own inner-validation predictions a baseline is scored at 0.5.
        b_common = dict(common, threshold=method if bval is not None else 0.5)
        baselines[bname] = summarize_predictions(
            bdf, pos, classes, bval, detail=False, name=bname, **b_common
        )
        baseline_dfs[bname] = bdf
    comparison = _compare(df, baseline_dfs, baselines, classes, pos, nb, seed) if baselines else None

    diam = pd.to_numeric(df.get("max_axial_diameter_mm", pd.Series(dtype=float)), errors="coerce")
    metrics: dict[str, Any] = {
        "format": "liverlesion.metrics",
        "format_version": 1,
        "disclaimer": DISCLAIMER,
        "liverlesion_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir.resolve()),
        "class_names": classes,
        "positive_class": pos,
        "task": network["task"],
        "n_patients": network["n_patients"],
        "n_lesions": network["n_lesions"],
        "n_per_class": network["n_per_class"],
        "coverage": coverage,
        "settings": {
            "n_bootstrap": nb,
            "ci_level": CI_LEVEL,
            "bootstrap_unit": "patient",
            "threshold_method": method,
            "threshold_fitted_on": "each fold's inner-validation predictions (val_predictions.csv)",
            "temperature_fitted_on": "each fold's inner-validation logits (val_predictions.csv)",
            "n_calibration_bins": n_bins,
            "ece_on": network["calibration"].get("target", "positive-class probability"),
            "seed": seed,
            "size_bins_mm": [b[0] for b in SIZE_BINS],
            "gradcam_max": int(cfg.eval.gradcam_max),
            "gradcam_target": "predicted class",
            "pooled": "out-of-fold predictions of all folds, each thresholded with its own fold's threshold",
        },
        "thresholds": {f: v["threshold"] for f, v in network["threshold"]["per_fold"].items()},
        "temperatures": {f: v["temperature"] for f, v in network["temperature"]["per_fold"].items()},
        "dataset": {
            "n_patients": network["n_patients"],
            "n_lesions": network["n_lesions"],
            "n_per_class": network["n_per_class"],
            "diameter_mm": _diameter_summary(df, diam, classes),
        },
        "run": {
            k: run_info.get(k) for k in ("kind", "manifest", "patch_dir", "backbone", "init") if k in run_info
        },
        "network": network,
        "baselines": baselines,
        "comparison": comparison,
        "notes": notes + network["notes"],
    }
    if coverage["n_classified"] < coverage["n_lesions"]:
        metrics["notes"].append(
            f"metrics cover the {coverage['n_classified']} of {coverage['n_lesions']} lesions that predict "
            f"classifies; {coverage['n_lesions'] - coverage['n_classified']} are too small to characterise "
            f"(smallest axis < eval.min_size_mm = {cfg.eval.min_size_mm:g} mm), for every method alike"
        )
    write_json(run_dir / "metrics.json", metrics)

    from liverlesion.report import render_report

    # Drawn from the files just written, exactly as a later `liverlesion evaluate` redraw would.
    html = render_report(run_dir, gradcam=gradcam)
    print(format_summary(metrics))
    print(f"Wrote {run_dir / 'metrics.json'} and {html}")
    return metrics


def _diameter_summary(df: pd.DataFrame, diam: pd.Series, classes: list[str]) -> dict[str, Any]:
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
