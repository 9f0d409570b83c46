"""Patient-level cross-validation splits, written once to ``splits.json`` and reused.

Lesions of one patient are never split across folds (about 3.7 lesions per
patient in the paper's cohort). Each fold's training patients are further split,
again by patient, into an inner training and an inner validation set; early
stopping, threshold choice and temperature scaling use only the inner validation
set, never the test fold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from liverlesion.errors import UserError
from liverlesion.fileio import write_json


def _patient_label(lesions: pd.DataFrame) -> pd.Series:
    """Label per lesion used for stratification: its own class."""
    return lesions["lesion_class"].astype(str)


def _stratified_group_split(
    lesions: pd.DataFrame, n_splits: int, seed: int
) -> list[tuple[list[str], list[str]]]:
    groups = lesions["patient_id"].astype(str).to_numpy()
    y = _patient_label(lesions).to_numpy()
    n_patients = len(np.unique(groups))
    if n_patients < n_splits:
        raise UserError(
            f"cv.folds={n_splits}: only {n_patients} patients in the manifest; use at most {n_patients} folds"
        )
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    out = []
    for tr, te in sgkf.split(np.zeros(len(y)), y, groups):
        out.append((sorted(set(groups[tr])), sorted(set(groups[te]))))
    return out


def make_splits(
    lesions: pd.DataFrame, folds: int, seed: int = 0, val_fraction: float = 0.2
) -> dict[str, Any]:
    """Make patient-level stratified folds with an inner validation split per fold.

    Args:
        lesions: Lesion table with ``patient_id`` and ``lesion_class``.
        folds: Number of outer folds (>= 2).
        seed: Shuffling seed.
        val_fraction: Fraction of each fold's training patients held out for inner validation.
    """
    if folds < 2:
        raise UserError(f"cv.folds={folds}: need at least 2 folds")
    outer = _stratified_group_split(lesions, folds, seed)
    splits = []
    for k, (train_p, test_p) in enumerate(outer):
        inner = lesions[lesions["patient_id"].astype(str).isin(train_p)]
        n_inner = max(2, int(round(1.0 / max(val_fraction, 1e-6))))
        n_inner = min(n_inner, inner["patient_id"].nunique())
        fit_p, val_p = _stratified_group_split(inner, n_inner, seed + 1000 + k)[0]
        splits.append({"fold": k, "train_patients": fit_p, "val_patients": val_p, "test_patients": test_p})
    result = {
        "group": "patient_id",
        "folds": folds,
        "seed": seed,
        "val_fraction": val_fraction,
        "n_patients": int(lesions["patient_id"].nunique()),
        "n_lesions": int(len(lesions)),
        "splits": splits,
    }
    check_splits(result)
    return result


def check_splits(splits: dict[str, Any]) -> None:
    """Invariants: no patient in two test folds, none shared between train/val/test of a fold."""
    seen: dict[str, int] = {}
    for s in splits["splits"]:
        tr, va, te = set(s["train_patients"]), set(s["val_patients"]), set(s["test_patients"])
        assert not (tr & te) and not (va & te) and not (tr & va), f"fold {s['fold']}: patient overlap"
        for p in te:
            assert p not in seen, f"patient {p} is in test folds {seen[p]} and {s['fold']}"
            seen[p] = s["fold"]


def load_or_create_splits(
    path: str | Path, lesions: pd.DataFrame, folds: int, seed: int = 0, val_fraction: float = 0.2
) -> dict[str, Any]:
    """Read ``splits.json`` if present (validated against the lesion table), else create it once."""
    path = Path(path)
    if path.exists():
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e}); delete it to create new splits") from e
        patients = set(lesions["patient_id"].astype(str))
        in_file = {p for s in splits["splits"] for p in s["test_patients"]}
        if patients != in_file or splits.get("folds") != folds:
            raise UserError(
                f"{path}: existing splits ({splits.get('folds')} folds, {len(in_file)} patients) do not match this "
                f"run ({folds} folds, {len(patients)} patients); delete it or use a new output folder"
            )
        check_splits(splits)
        return splits
    splits = make_splits(lesions, folds, seed, val_fraction)
    write_json(path, splits)
    return splits
