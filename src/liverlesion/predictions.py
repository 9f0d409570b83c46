"""The predictions CSV contract (``predictions.csv``, ``val_predictions.csv``, baselines' too).

The only reader, validator and writer of predictions files: columns ``patient_id``,
``lesion_id``, ``true_class``, ``prob_<class>``..., ``fold`` (and optionally ``pred_class``,
``logit_<class>``, ``status``, ``threshold``, ``max_axial_diameter_mm``, ...; see
docs/ARCHITECTURE.md). Also turns a validated frame into arrays for the metrics code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion.csv_check import check_csv_complete
from liverlesion.decision import CLASSIFIED, TOO_SMALL
from liverlesion.errors import UserError
from liverlesion.fileio import write_csv

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
    check_csv_complete(path, "re-run the step that wrote it, or copy the file again")
    try:
        df = pd.read_csv(path, dtype=_TEXT, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: not a readable CSV ({str(e).splitlines()[0]}); re-run the step that wrote it"
        ) from e
    classes = validate_predictions(df, str(path), class_names)
    return df, classes


def validate_predictions(df: pd.DataFrame, where: str, class_names: Sequence[str] | None) -> list[str]:
    """Check a predictions frame against the contract; return its class names.

    Args:
        df: The frame (ids as text).
        where: Name of the file or method, for messages.
        class_names: Expected classes; default: the ``prob_<class>`` columns in order.
    """
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
    for c in ("patient_id", "lesion_id", "true_class", "fold"):
        if df[c].isna().any():
            raise UserError(
                f"{where}: empty {c} in row(s) {_rows(df[c].isna())}; every row needs one "
                "(a row cut short is a truncated file: copy it again or re-run the step that wrote it)"
            )
    if "status" in df.columns:
        odd = ~df["status"].isin([CLASSIFIED, TOO_SMALL]).to_numpy()
        if odd.any():
            raise UserError(
                f"{where}: status in row(s) {_rows(odd)} is neither {CLASSIFIED!r} nor {TOO_SMALL!r} "
                "(a row cut short is a truncated file: copy it again or re-run the step that wrote it)"
            )
    unknown = sorted(set(df["true_class"]) - set(classes))
    if unknown:
        raise UserError(f"{where}: true_class value(s) {unknown} are not among the classes {list(classes)}")
    probs = df[[f"prob_{c}" for c in classes]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    bad = ~np.isfinite(probs).all(1) | (probs < -1e-6).any(1) | (probs > 1 + 1e-6).any(1)
    if "status" in df.columns:  # lesions the size rule left unclassified carry no probabilities
        bad &= (df["status"] == CLASSIFIED).to_numpy()
    if bad.any():
        raise UserError(
            f"{where}: probabilities missing or outside [0, 1] in row(s) {_rows(bad)}; the file is damaged or "
            "was edited: re-run the step that wrote it"
        )
    # Each row is one softmax; a sum far from 1 (not CSV rounding) would be renormalised into other numbers.
    off = ~np.isclose(probs.sum(1), 1.0, rtol=0.0, atol=_SUM_TOLERANCE)
    if "status" in df.columns:
        off &= (df["status"] == CLASSIFIED).to_numpy()
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise UserError(
            f"{where}: probabilities of row(s) {_rows(off)} do not sum to 1 (row {i + 2}: {probs[i].sum():.4g}, "
            f"over {', '.join('prob_' + c for c in classes)}); the file is damaged or was edited, or a class "
            "column is missing from run.json's class_names: re-run the step that wrote it"
        )
    return classes


# Of a row's probabilities around 1: above what rounding to 2 decimals leaves over 5 classes (0.025), far
# below what a damaged or mislabelled file gives (0.9 + 0.9, 0 + 0).
_SUM_TOLERANCE = 0.05


def _rows(mask: Any) -> str:
    idx = np.flatnonzero(np.asarray(mask)) + 2  # +2: header line and 1-based numbering, as in a spreadsheet
    return ", ".join(str(i) for i in idx[:5]) + (" ..." if len(idx) > 5 else "")


@dataclass
class PredictionArrays:
    """A validated predictions frame as arrays: truth and probabilities as class indices."""

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

    def take(self, idx: np.ndarray) -> PredictionArrays:
        return PredictionArrays(
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


def prediction_arrays(df: pd.DataFrame, classes: Sequence[str], positive_class: str) -> PredictionArrays:
    """Arrays of a validated frame; probabilities renormalised (CSV rounding), logits if all finite."""
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
    return PredictionArrays(
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


def fold_sort_key(f: str) -> tuple[int, Any]:
    """Sort folds numerically (``2`` before ``10``), names such as ``external`` after them."""
    return (0, int(f)) if str(f).lstrip("-").isdigit() else (1, str(f))


def check_positive_class(positive_class: str, classes: Sequence[str], where: str) -> None:
    """Refuse a positive class that is not one of ``classes`` (named in ``where``)."""
    if positive_class not in classes:
        raise UserError(
            f"--positive-class {positive_class!r} is not among the classes in {where} "
            f"({', '.join(classes)}); pass --positive-class with one of them"
        )


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


def read_predictions_table(path: str | Path) -> pd.DataFrame:
    """A predictions CSV as written, ids as text, not validated: for display (the report's tables)."""
    return pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str})


def write_predictions(path: str | Path, df: pd.DataFrame) -> Path:
    """Write a predictions frame as CSV, atomically (the same bytes as ``fileio.write_csv``)."""
    return write_csv(path, df)
