"""Patient-level cross-validation splits, written once to ``splits.json`` and reused.

Lesions of one patient are never split across folds (about 3.7 lesions per
patient in the paper's cohort). Each fold's training patients are further split,
again by patient, into an inner training and an inner validation set; early
stopping, threshold choice and temperature scaling use only the inner validation
set, never the test fold.
"""

from __future__ import annotations

import json
import math
import warnings
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


def check_folds(
    n_patients: int,
    folds: int,
    val_fraction: float = 0.2,
    name: str = "cv.folds",
    classes: list[str] | None = None,
) -> None:
    """Refuse a number of folds the patients cannot fill, before any work is done.

    Each fold needs at least one test patient, and its training patients must still split
    (by patient) into an inner training and an inner validation set, so at least 2 remain.

    Args:
        n_patients: Distinct patients in the manifest.
        folds: Requested number of outer folds.
        val_fraction: Inner validation fraction (only for the message).
        name: How the setting is named in the message (``--folds`` or ``cv.folds``).
        classes: The manifest's lesion classes, when known: at least two are needed.

    Raises:
        UserError: Naming ``name``, the value and the largest usable number of folds.
    """
    if classes is not None:
        _check_two_classes(classes)
    try:
        k = int(folds)
    except (TypeError, ValueError):
        k = 0
    if k != folds or k < 2:
        raise UserError(f"{name}={folds!r}: need a whole number of at least 2 folds (e.g. 5)")
    # Largest k with at least one test patient per fold and >= 2 training patients in every fold.
    best = max(
        (j for j in range(2, n_patients + 1) if n_patients - math.ceil(n_patients / j) >= 2), default=None
    )
    if best is None:
        raise UserError(
            f"{name}={k}: the manifest has only {n_patients} patient(s); patient-level cross-validation needs "
            f"at least 3 (one to test, two to train and validate per fold); add patients"
        )
    if k > best:
        raise UserError(
            f"{name}={k}: the manifest has only {n_patients} patients; each fold needs a test patient and at "
            f"least 2 training patients (inner validation {val_fraction:g}): use at most {best} folds"
        )
    if classes is not None:
        # Stratified folds need one class with at least as many lesions as there are folds.
        counts = pd.Series(list(map(str, classes))).value_counts()
        if int(counts.max()) < k:
            raise UserError(
                f"{name}={k}: the largest class ({counts.index[0]!r}) has only {int(counts.max())} lesion(s), "
                f"too few to stratify {k} folds; use at most {max(int(counts.max()), 2)} folds or add lesions"
            )


def _check_two_classes(classes: list[str]) -> None:
    if len(set(classes)) < 2:
        names = sorted(set(classes))
        raise UserError(
            f"manifest lesion_class: only one class ({names[0]!r}) present; a classifier needs at least two"
            if names
            else "manifest: no lesions; a classifier needs lesions of at least two classes"
        )


def check_train_split(lesions: pd.DataFrame, val_fraction: float, source: str = "manifest") -> None:
    """Refuse, before any work, patients that cannot give ``train`` its inner validation split: one of
    ``inner_split_count(val_fraction)`` patient groups, held out for early stopping.

    ``train`` has no folds, so the message names ``train.val_fraction`` (not ``cv.folds``) and the
    largest part it could hold out instead.

    Args:
        lesions: Manifest rows or lesion table, with ``patient_id`` and ``lesion_class``.
        val_fraction: ``train.val_fraction``.
        source: What the rows are, as the message names them (e.g. ``manifest PATH``).

    Raises:
        UserError: One class only, or too few patients or lesions for the split.
    """
    classes = list(_patient_label(lesions))
    _check_two_classes(classes)  # one class only: its own message comes first
    n_patients = int(lesions["patient_id"].astype(str).nunique())

    def fits(k: int) -> bool:
        try:
            check_folds(n_patients, k, val_fraction, classes=classes)
        except UserError:
            return False
        return True

    need = inner_split_count(val_fraction)
    if fits(need):
        return
    usable = next((k for k in range(need - 1, 1, -1) if fits(k)), None)
    fix = (
        f"hold out a larger part: --set train.val_fraction={1 / usable:.2g} (or add patients and lesions)"
        if usable
        else "add patients (at least 3, with lesions of every class)"
    )
    raise UserError(
        f"{source}: {n_patients} patient(s) with {len(classes)} lesion(s) cannot be split by patient "
        f"into {need} groups (train.val_fraction={val_fraction:g}: one group is held out for early stopping, "
        f"each needing a patient and the largest class a lesion in each); {fix}"
    )


def make_train_split(
    lesions: pd.DataFrame, val_fraction: float, seed: int = 0, source: str = "manifest"
) -> dict[str, Any]:
    """``train``'s inner split by patient (``splits.json``): ``train_patients`` and ``val_patients``, the
    first of ``inner_split_count(val_fraction)`` stratified patient groups held out (checked first by
    :func:`check_train_split`). The same patients as the first fold of ``make_splits`` with that many folds.
    """
    check_train_split(lesions, val_fraction, source)
    fit_p, val_p = _stratified_group_split(lesions, inner_split_count(val_fraction), seed)[0]
    return {"group": "patient_id", "train_patients": fit_p, "val_patients": val_p}


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
    # The patients' order is shuffled here, not by ``shuffle=True``: up to scikit-learn 1.7, that
    # shuffles the per-patient class counts without the patient index they belong to, so each fold
    # got the patients of other rows and the folds were neither stratified nor balanced in size
    # (scikit-learn issue #32478, fixed in 1.8). Unshuffled, the splitter assigns patients greedily
    # by class mix, ties in the order of their codes: a seeded permutation of the patients.
    names, codes = np.unique(groups, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(names))
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=False)
    out = []
    with warnings.catch_warnings():  # a rare class with fewer lesions than folds is expected, not news
        warnings.filterwarnings("ignore", message=r".*least populated class.*")
        for tr, te in sgkf.split(np.zeros(len(y)), y, order[codes]):
            out.append((sorted(set(groups[tr])), sorted(set(groups[te]))))
    return out


def inner_split_count(val_fraction: float) -> int:
    """Number of patient-grouped splits whose held-out part is about ``val_fraction`` (at least 2).

    One of them gives the inner validation set: ``0.2`` gives 5 splits (a fifth held out).
    """
    return max(2, int(round(1.0 / max(val_fraction, 1e-6))))


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
    check_folds(
        int(lesions["patient_id"].nunique()), folds, val_fraction, classes=list(_patient_label(lesions))
    )
    outer = _stratified_group_split(lesions, folds, seed)
    splits = []
    for k, (train_p, test_p) in enumerate(outer):
        inner = lesions[lesions["patient_id"].astype(str).isin(train_p)]
        n_inner = inner_split_count(val_fraction)
        # sklearn refuses more splits than the largest class has lesions: cap the inner split there
        largest = int(_patient_label(inner).value_counts().max())
        n_inner = min(n_inner, inner["patient_id"].nunique(), largest)
        if n_inner < 2:
            raise UserError(
                f"cv.folds={folds}: fold {k}'s training patients have one lesion per class, too few to split "
                f"off an inner validation set by patient; use fewer folds or add lesions"
            )
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


def check_fold_classes(splits: dict[str, Any], lesions: pd.DataFrame) -> None:
    """Refuse cross-validation folds whose training patients hold lesions of one class only.

    Small cohorts can leave a fold with one or two training patients once inner validation is held
    out; no classifier can be fitted to one class (scikit-learn raised its own traceback).

    Raises:
        UserError: Naming the fold, its training patients and the one class.
    """
    by_patient = _patient_label(lesions).groupby(lesions["patient_id"].astype(str))
    classes = {str(p): set(v) for p, v in by_patient}
    for s in splits["splits"]:
        fit = set().union(*(classes.get(str(p), set()) for p in s["train_patients"]))
        if len(fit) < 2:
            raise UserError(
                f"cv.folds={splits['folds']}: fold {s['fold']}'s training patients ({len(s['train_patients'])}, after "
                f"{len(s['val_patients'])} held out for inner validation) have lesions of one class only "
                f"({', '.join(map(repr, sorted(fit))) or 'none'}), so no classifier can be trained on them; use "
                "fewer folds or add patients"
            )


def check_splits(splits: dict[str, Any], path: str | Path | None = None) -> None:
    """Check a splits dict (e.g. read from an edited ``splits.json``): its structure, and that no
    patient is in two test folds or shared between train/val/test of a fold.

    Args:
        splits: The splits.
        path: The file it was read from (named in messages).

    Raises:
        UserError: Naming the file and what is wrong.
    """
    where = f"{path}" if path is not None else "splits"
    fix = "delete it to create new splits" if path is not None else "this is a bug: please report it"
    folds = splits.get("splits") if isinstance(splits, dict) else None
    if not isinstance(folds, list) or not folds:
        raise UserError(f"{where}: has no list of folds under 'splits'; {fix}")
    keys = ("fold", "train_patients", "val_patients", "test_patients")
    seen: dict[str, Any] = {}
    for i, s in enumerate(folds):
        if not isinstance(s, dict) or any(k not in s for k in keys):
            raise UserError(f"{where}: fold entry {i} lacks one of {', '.join(keys)}; {fix}")
        if not all(isinstance(s[k], list) for k in keys[1:]):
            raise UserError(f"{where}: fold {s['fold']}: patient lists must be JSON lists; {fix}")
        tr, va, te = (set(map(str, s[k])) for k in keys[1:])
        if not te or not tr or not va:
            raise UserError(f"{where}: fold {s['fold']} has an empty train, val or test patient list; {fix}")
        overlap = (tr & te) | (va & te) | (tr & va)
        if overlap:
            raise UserError(
                f"{where}: fold {s['fold']}: patient(s) {', '.join(sorted(overlap)[:5])} are in more than one of "
                f"train/val/test (leakage); {fix}"
            )
        for p in te:
            if p in seen:
                raise UserError(f"{where}: patient {p} is in test folds {seen[p]} and {s['fold']}; {fix}")
            seen[p] = s["fold"]


def load_or_create_splits(
    path: str | Path, lesions: pd.DataFrame, folds: int, seed: int = 0, val_fraction: float = 0.2
) -> dict[str, Any]:
    """Read ``splits.json`` if present (validated against the lesion table), else create it once."""
    path = Path(path)
    if path.exists():
        try:
            splits = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e}); delete it to create new splits") from e
        check_splits(splits, path)
        patients = set(lesions["patient_id"].astype(str))
        in_file = {str(p) for s in splits["splits"] for p in s["test_patients"]}
        if patients != in_file or splits.get("folds") != folds:
            raise UserError(
                f"{path}: existing splits ({splits.get('folds')} folds, {len(in_file)} patients) do not match this "
                f"run ({folds} folds, {len(patients)} patients); delete it or use a new output folder"
            )
        return splits
    splits = make_splits(lesions, folds, seed, val_fraction)
    write_json(path, splits)
    return splits
