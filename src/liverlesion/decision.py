"""The decision rule: calibrated lesion probabilities -> a class, and how its threshold is fitted.

The only place a class is chosen from probabilities. ``train`` fits the threshold on the inner-
validation probabilities that :mod:`liverlesion.inference` computes (temperature and test-time
augmentation included) and stores it once, in the checkpoint; ``cv``'s predictions, ``evaluate``,
``predict``, ``serve`` and exported models then apply it with :func:`decide`.

Two classes with a positive class: predict positive where ``P(positive) >= threshold``. More classes
(or no threshold): the class with the highest probability. Lesions whose smallest axis is under
``min_size_mm`` are not classified at all (:data:`TOO_SMALL`), in ``cv`` as in ``predict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from liverlesion.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

TOO_SMALL = "too small to characterise"
CLASSIFIED = "classified"


def parse_threshold_method(value: str | float) -> str | float:
    """``"youden"`` or a fixed probability in (0, 1) from ``eval.threshold``."""
    text = str(value).strip().lower()
    if text == "youden":
        return "youden"
    try:
        t = float(text)
    except ValueError:
        t = math.nan
    if not 0.0 < t < 1.0:
        raise UserError(
            f"eval.threshold={value!r}: expected 'youden' or a probability between 0 and 1, e.g. 0.5"
        )
    return t


def threshold_with_note(y_pos: np.ndarray, p_pos: np.ndarray, method: str | float) -> tuple[float, str]:
    """Threshold for the positive class and a note saying how it was chosen."""
    from sklearn.metrics import roc_curve

    if method != "youden":
        return float(method), f"fixed threshold {float(method):g}"
    y_pos = np.asarray(y_pos).astype(int)
    if len(y_pos) == 0 or y_pos.min() == y_pos.max():
        return 0.5, "inner validation has one class only; threshold 0.5"
    fpr, tpr, thr = roc_curve(y_pos, p_pos, drop_intermediate=False)
    j = tpr - fpr
    i = int(np.argmax(j))  # first maximum = the highest such threshold
    if j[i] <= 0:
        return 0.5, "uninformative on inner validation (Youden J <= 0); threshold 0.5"
    # Midway to the next lower validation score: the same validation decisions, but not
    # sitting exactly on a validation sample's score.
    t = (thr[i] + thr[i + 1]) / 2.0 if i + 1 < len(thr) else thr[i]
    return float(min(max(t, 1e-6), 1.0)), f"Youden J = {j[i]:.3f} on inner validation"


def choose_threshold(
    y_true: Sequence[int] | np.ndarray, p_pos: Sequence[float] | np.ndarray, method: str | float = "youden"
) -> float:
    """Decision threshold for the positive class, to be fitted on inner-validation data only.

    Args:
        y_true: 1 for positive-class lesions, else 0.
        p_pos: Calibrated positive-class probability (as :mod:`liverlesion.inference` computes it).
        method: ``"youden"`` (maximise sensitivity + specificity - 1) or a fixed probability.

    Returns:
        Threshold t: predict positive where ``p >= t``. 0.5 when validation has one class only.
    """
    return threshold_with_note(
        np.asarray(y_true), np.asarray(p_pos, dtype=float), parse_threshold_method(method)
    )[0]


def decide(
    probs: np.ndarray,
    class_names: Sequence[str],
    positive_class: str | None = None,
    threshold: float | None = None,
) -> list[str]:
    """Classes for ``(N, K)`` probabilities (threshold rule with two classes, else argmax)."""
    probs = np.atleast_2d(np.asarray(probs, dtype=float))
    names = list(class_names)
    if threshold is not None and positive_class in names and len(names) == 2:
        j = names.index(positive_class)
        other = names[1 - j]
        return [positive_class if p >= threshold else other for p in probs[:, j]]
    return [names[int(i)] for i in probs.argmax(1)]


def too_small(min_axis_mm: float, min_size_mm: float) -> bool:
    """The size rule: a lesion whose smallest axis is under ``min_size_mm`` is not classified."""
    return not (float(min_axis_mm) >= float(min_size_mm))


def too_small_rows(index: pd.DataFrame, min_size_mm: float) -> np.ndarray:
    """:func:`too_small` for every row of a lesion table (no ``min_axis_mm`` column: none is)."""
    if "min_axis_mm" not in index:
        return np.zeros(len(index), dtype=bool)
    return np.array([too_small(v, min_size_mm) for v in index["min_axis_mm"]], dtype=bool)


def check_some_classified(index: pd.DataFrame, min_size_mm: float) -> None:
    """Refuse a size rule that leaves no lesion of a run to classify or score (before any training).

    Raises:
        UserError: Naming ``eval.min_size_mm``, the lesion count and the largest smallest axis.
    """
    small = too_small_rows(index, min_size_mm)
    if len(small) and small.all():
        largest = float(np.nanmax(np.asarray(index["min_axis_mm"], dtype=float)))
        raise UserError(
            f"config eval.min_size_mm={min_size_mm:g}: all {len(small)} lesions are smaller (the largest smallest "
            f"axis is {largest:.1f} mm), so none would be classified or scored; lower eval.min_size_mm (default 5)"
        )
