"""What a run checks before any work (GUIDE: validate, then work): its classes, settings, folds, the
network and its weights, and, when resuming, that the run folder is one it may continue.

``cv``, ``train``, ``baselines`` and ``demo`` call these before a run folder, a patch or a split exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from liverlesion import runs
from liverlesion.config import Config, load_run_config, setting_differences
from liverlesion.errors import UserError


def class_names_from(index: pd.DataFrame) -> list[str]:
    """Classes in a stable order (sorted names), from the manifest's lesion_class column."""
    names = sorted(index["lesion_class"].astype(str).unique())
    if len(names) < 2:
        raise UserError(
            f"manifest lesion_class: only one class ({names[0]!r}) present; a classifier needs at least two"
        )
    return names


def check_positive_setting(cfg: Config, classes: list[str]) -> None:
    """Refuse an ``eval.positive_class`` the manifest does not hold, before any work (the metrics need it)."""
    if cfg.eval.positive_class not in classes:
        raise UserError(
            f"config eval.positive_class={cfg.eval.positive_class!r} is not among the manifest's classes "
            f"({', '.join(classes)}); pass --set eval.positive_class=CLASS with one of them"
        )


def resolve_init(cfg: Config) -> tuple[Any, str]:
    """Resolve the init once, up front, so the user sees it before training and folds reuse it.

    Returns:
        (resolved ImageNet weights or None, description of the init).
    """
    from liverlesion.model import build_model, check_input_size, check_model_config  # local: heavy (torch)
    from liverlesion.runtime import check_accelerator

    check_accelerator(cfg.train.accelerator)
    w = None
    if cfg.model.weights.lower() == "imagenet":
        from liverlesion.weights import resolve_imagenet_weights  # local: heavy (torch, timm)

        check_model_config(cfg.model)
        w = resolve_imagenet_weights(cfg.model.backbone)
    model, init = build_model(cfg.model, num_classes=2, in_chans=3, imagenet=w)
    check_input_size(model, cfg.patch.size_px)
    return w, init


def check_manifest_folds(df: pd.DataFrame, cfg: Config) -> None:
    """``cv.folds`` against a read manifest's patients and classes (``splits.check_folds``), before any work.

    Where each row is one lesion (a mask with its label, a DICOM SEG segment or a click), the folds
    are also made from the rows as they will be from the lesion table (``splits.make_splits``: the
    same patients and classes give the same folds), so a fold that cannot be trained, e.g. one whose
    training patients hold a single class, is refused before patches are cut.
    """
    from liverlesion.splits import check_fold_classes, check_folds, make_splits  # local: heavy (sklearn)

    whole_masks = df["mask_path"].fillna("").astype(str).ne("") & df["label"].isna()
    if whole_masks.any():  # a mask row without a label may hold several lesions: the table decides the folds
        check_folds(
            int(df["patient_id"].astype(str).nunique()),
            cfg.cv.folds,
            cfg.train.val_fraction,
            classes=list(df["lesion_class"].astype(str)),
        )
    else:  # make_splits runs check_folds on the same patients and classes first
        rows = df[["patient_id", "lesion_class"]]
        check_fold_classes(make_splits(rows, cfg.cv.folds, cfg.cv.seed, cfg.train.val_fraction), rows)


def check_run_settings(cfg: Config, n_patients: int, classes: list[str] | None = None) -> tuple[Any, str]:
    """Everything a run's settings can get wrong, checked before any work: folds, network, weights.

    Returns:
        What ``resolve_init`` gives (the resolved ImageNet weights or None, the init's description).
    """
    from liverlesion.splits import check_folds  # local: heavy (sklearn)

    check_folds(n_patients, cfg.cv.folds, cfg.train.val_fraction, classes=classes)
    return resolve_init(cfg)


def nothing_to_resume(out: str | Path) -> bool:
    """Whether ``out`` holds no run to continue: no such path, or an empty folder."""
    out = Path(out)
    return not out.exists() or (out.is_dir() and not any(out.iterdir()))


def check_resume(
    out: str | Path,
    cfg: Config,
    kind: str = "cv",
    fix: str = "resume without --config, --preset or --set to keep them, or give a new run folder",
    patients: set[str] | None = None,
) -> None:
    """Refuse to resume where there is no run (no folder, or an empty one: a mistyped folder would
    silently start a new run), a run of another kind (``cv`` / ``train``), of other patients than the
    manifest's (``patients``, against its ``splits.json``), or with settings other than those its
    finished folds were trained with.

    Only what changes how, not what, a run computes may differ (``config.RESUMABLE_SETTINGS``: the
    device, threads, workers and evaluation settings).
    """
    if nothing_to_resume(out):
        raise UserError(
            f"{out}: nothing to resume (no run folder there); drop --resume to start a new run, or give the "
            "run folder to continue"
        )
    runs.check_run_slots(out)
    made_by = runs.read_run_info(out).get("kind")
    if made_by in ("cv", "train") and made_by != kind:
        raise UserError(
            f"{out}: a `liverlesion {made_by}` run folder (run.json), so `liverlesion {kind} --resume` cannot "
            f"continue it; resume it with `liverlesion {made_by} ... --resume`, or give a new run folder"
        )
    if patients is not None:
        _check_split_patients(Path(out), patients)
    saved = runs.config_path(out)
    if not saved.is_file():
        return
    diff = setting_differences(load_run_config(saved), cfg)
    if diff:
        shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
        raise UserError(
            f"{out}: resuming with settings other than the run's own ({saved.name} -> now: {shown}), which would "
            f"mix two models in one run; {fix}"
        )


def _check_split_patients(out: Path, patients: set[str]) -> None:
    """The patients of a run folder's ``splits.json`` (cv: its test folds; train: its inner split) against
    a manifest's, before any patch is cut; a damaged file is left to the splits reader to name."""
    path = runs.splits_path(out)
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return
    if not isinstance(data, dict):
        return
    folds = data.get("splits") if isinstance(data.get("splits"), list) else [data]
    have = {
        str(p)
        for s in folds
        if isinstance(s, dict)
        for key in ("test_patients", "train_patients", "val_patients")
        if isinstance(s.get(key), list)
        for p in s[key]
    }
    if have and have != patients:
        odd = sorted(have ^ patients)
        raise UserError(
            f"{out}: its {path.name} is of {len(have)} patients, this manifest of {len(patients)} ({len(odd)} in only "
            f"one of them, e.g. {', '.join(odd[:3])}); its finished folds were trained on the run's own patients: "
            "resume with the manifest the run was started with, or give a new run folder"
        )
