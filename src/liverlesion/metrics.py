"""Point metrics of lesion classification: binary, multi-class, per class, and their names.

``roc_auc`` and ``average_precision`` give scikit-learn's numbers (tested against it) without
its input checks, because the patient bootstrap calls them thousands of times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from liverlesion.calibration import expected_calibration_error, nll

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
PER_CLASS_METRICS = ("sensitivity", "specificity", "ppv", "f1", "roc_auc", "pr_auc")
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


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else math.nan


def clf_curve(y_pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    fps, tps = clf_curve(y, score)
    return float(np.trapezoid(np.r_[0.0, tps] / n_pos, np.r_[0.0, fps] / (len(y) - n_pos)))


def average_precision(y_pos: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """Average precision = PR AUC (as ``sklearn.metrics.average_precision_score``); NaN without positives."""
    y = np.asarray(y_pos).astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    fps, tps = clf_curve(y, score)
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
        "nll": nll(y, np.stack([1.0 - p, p], axis=1)),
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
        specificity, ppv, f1, roc_auc and pr_auc (average precision) of each class, one vs rest.
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
        "nll": nll(y, probs),
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
        out[f"pr_auc_{name}"] = average_precision(y == c, probs[:, c])
    return out


def auc_score(y: np.ndarray, probs: np.ndarray, pos: int) -> float:
    """Binary AUC of the positive class, or one-vs-rest macro AUC for K > 2."""
    k = probs.shape[1]
    if k == 2:
        return roc_auc(y == pos, probs[:, pos])
    aucs = [roc_auc(y == c, probs[:, c]) for c in range(k)]
    return float(np.mean(aucs)) if np.isfinite(aucs).all() else math.nan
