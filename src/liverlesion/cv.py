"""Run-level training: the patient-level cross-validation loop and single-model training.

``run_cv`` prepares patches and patient-level splits (written once), what every fold reuses
(``prepare_shared``: fusion features, the lpft view cache), then for each fold calls
``train.train_fold``, and finally the baselines and the evaluation of the run. ``train_single``
trains one model on all patients with an inner validation split. Distributed runs (torchrun): rank 0
alone prepares the run folder while the others wait.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, __version__, runs
from liverlesion.config import FUSION_HALF, Config
from liverlesion.csv_check import check_csv_complete
from liverlesion.decision import check_some_classified
from liverlesion.domain import stats_table
from liverlesion.errors import UserError
from liverlesion.fileio import write_csv, write_json
from liverlesion.manifest import read_manifest
from liverlesion.model_input import POOL_TEXT, image_chans
from liverlesion.run_checks import (
    check_manifest_folds,
    check_positive_setting,
    check_resume,
    class_names_from,
    resolve_init,
)
from liverlesion.train import fold_subset, train_fold
from liverlesion.versions import library_versions


def _prepare_run_dir(out: Path, resume: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise UserError(
            f"{out}: run folder already exists and is not empty; pass --resume to continue it, or choose a new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _remove_new_run_dir(out: Path, existed: bool) -> None:
    """Undo a new run folder's start (config.yaml, patches/: this run made both); keep a folder the user made."""
    runs.config_path(out).unlink(missing_ok=True)
    shutil.rmtree(runs.patches_dir(out), ignore_errors=True)
    if not existed and not any(out.iterdir()):
        out.rmdir()


@contextlib.contextmanager
def quiet_lightning():
    """Keep the terminal readable while a run trains: progress bars and our own lines, not Lightning's
    tips and notices. Logger levels and warning filters are restored on exit, so a Python caller's
    own logging setup is left as it was.
    """
    import logging
    import warnings

    names = (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
    )
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*treespec.*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*number of training batches.*")
        # lpft keeps the pretrained BatchNorm statistics on purpose (modules in eval mode while training)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def _quietly(fn):
    """Run ``fn`` inside :func:`quiet_lightning`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with quiet_lightning():
            return fn(*args, **kwargs)

    return wrapper


def _set_threads(cfg: Config) -> None:
    import torch

    if cfg.train.max_threads > 0:
        torch.set_num_threads(cfg.train.max_threads)


def prepare_patches(manifest: Path, out: Path, cfg: Config) -> tuple[Path, pd.DataFrame]:
    """Cut (or reuse cached) patches into ``out/patches`` and return (patch_dir, lesion table)."""
    from liverlesion.patch_cache import build_patches, load_patch_index  # local: heavy (scipy)

    patch_dir = build_patches(manifest, runs.patches_dir(out), cfg.patch)
    index = load_patch_index(patch_dir)
    if index.empty:
        raise UserError(
            f"{manifest}: no lesions found; check the masks and labels with `liverlesion inspect`"
        )
    return Path(patch_dir), index


# whose statistics standardise the fusion's radiomics-style features, by run kind (the console line)
_FUSION_STATS = {"cv": "training-fold statistics per fold", "train": "statistics of the training patients"}


def prepare_shared(
    cfg: Config,
    index: pd.DataFrame,
    arrays: list[np.ndarray],
    patch_dir: Path,
    classes: list[str],
    imagenet: Any,
    in_chans: int,
    kind: str = "cv",
) -> dict[str, Any]:
    """What every fold reuses: fusion features of every lesion and (lpft) the frozen-feature cache.

    ``kind``: the run's (``cv`` or ``train``), as its console line says whose statistics the fusion uses.
    """
    from liverlesion.model import build_model  # local: heavy (torch)

    shared: dict[str, Any] = {"extra": None, "extra_names": []}
    # per-lesion intensity/spacing statistics; each fold stores the range of its own training lesions
    shared["domain"] = stats_table(index, patch_dir)
    if cfg.model.fusion != "none":
        from liverlesion.features import cache_radiomics  # local: heavy (scipy)

        print(f"Fusion: radiomics-style features of every lesion ({_FUSION_STATS[kind]})")
        table = cache_radiomics(patch_dir, index, (cfg.patch.window_center, cfg.patch.window_width))
        names = [c for c in table.columns if c != "lesion_id"]
        shared["extra"] = table[names].to_numpy(np.float64)
        shared["extra_names"] = names
    if cfg.train.recipe == "lpft":
        import torch

        from liverlesion.lpft import build_cache, n_top_blocks  # local: heavy (torch)

        # the template's random parts (the head; all of it with weights=none) are the same in every
        # process: a resumed run retrains its interrupted fold from this very template
        torch.manual_seed(cfg.train.seed)
        model, init = build_model(
            cfg.model,
            num_classes=len(classes),
            in_chans=in_chans,
            imagenet=imagenet,
            fusion_features=shared["extra_names"],
        )
        n_top, note = n_top_blocks(model, cfg)
        if note:
            print(f"Note: {note}")
        views = (4 if cfg.model.tta == "flips" else 1) + cfg.train.aug_views
        samples = int(arrays[0].shape[0]) if arrays else 1  # 2.5d stacks or 2d slices per lesion
        print(
            f"Recipe lpft: head on frozen features, then the top {n_top} block(s) fine-tuned; caching "
            f"{views} views" + (f" of each of {samples} samples" if samples > 1 else "") + " per lesion"
        )
        shared.update(template=model, init=init, cache=build_cache(model, arrays, cfg, n_top))
    return shared


def _run_info(manifest: Path, patch_dir: Path, classes: list[str], cfg: Config, init: str, kind: str) -> dict:
    return {
        "kind": kind,
        "manifest": str(Path(manifest).resolve()),
        "patch_dir": str(Path(patch_dir).resolve()),
        "class_names": classes,
        "backbone": cfg.model.backbone,
        "init": init,
        "liverlesion_version": __version__,
        "versions": library_versions(),
        "hardware": _hardware(),
        "disclaimer": DISCLAIMER,
    }


def _hardware() -> dict[str, Any]:
    """CPU model, usable cores, torch's CPU threads and GPU name of the training machine (for the report)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "threads": torch.get_num_threads(), "gpu": gpu}


def _start_run(manifest: str | Path, out: str | Path, cfg: Config, resume: bool, kind: str):
    """Common start of `cv` and `train`: run folder, config.yaml, patches, classes, the resolved init."""
    manifest = Path(manifest)
    # Validate the manifest and its classes, the network's settings and its weights before creating anything.
    df = read_manifest(manifest)
    if resume:
        check_resume(out, cfg, kind, patients=set(df["patient_id"].astype(str)))
    class_names_from(df)
    resolved = resolve_init(cfg)
    rank = _init_distributed(cfg)
    out = Path(out)
    existed = out.exists()
    if rank == 0:  # under torchrun the first process sets the run folder up, the others wait for it
        out = _prepare_run_dir(out, resume)
    fresh = not any(out.iterdir()) if rank == 0 else False
    _set_threads(cfg)
    if rank == 0:
        try:
            cfg.save(runs.config_path(out))
            print(f"liverlesion {kind}: {DISCLAIMER}")
            patch_dir, index = prepare_patches(manifest, out, cfg)
            check_some_classified(
                index, cfg.eval.min_size_mm
            )  # the lesion sizes are known once patches are cut
        except BaseException:
            if fresh:  # a bad image or mask, or a size rule that leaves no lesion: no run folder to --resume
                _remove_new_run_dir(out, existed)
            raise
    _barrier()
    if rank != 0:
        patch_dir, index = prepare_patches(manifest, out, cfg)  # the finished cache: nothing is recut
    return manifest, out, patch_dir, index, class_names_from(index), resolved


def _init_distributed(cfg: Config) -> int:
    """Global rank; under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is set up here.

    Lightning's DDP strategy reuses an initialised group, so the run folder, patches and splits
    can be made by rank 0 alone before training starts (the other ranks wait at a barrier).
    gloo on CPU, nccl when the run uses CUDA.
    """

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and cfg.train.accelerator not in ("cpu",)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return int(dist.get_rank())


def _barrier() -> None:
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _announce_init(
    cfg: Config, manifest: Path, out: Path, patch_dir: Path, classes: list[str], kind: str, resolved: tuple
) -> tuple[dict, Any]:
    imagenet, init = resolved
    fusion = f" + late fusion with {FUSION_HALF[cfg.model.fusion]}" if cfg.model.fusion != "none" else ""
    pool = f"features {POOL_TEXT[cfg.model.pool]}"
    print(
        f"Network: {cfg.model.backbone} ({pool}) + paper head{fusion}; recipe {cfg.train.recipe}; init: {init}"
    )
    info = _run_info(manifest, patch_dir, classes, cfg, init, kind)
    write_json(runs.run_info_path(out), info)
    return info, imagenet


@_quietly
def run_cv(
    manifest: str | Path,
    out: str | Path,
    cfg: Config,
    resume: bool = False,
    baselines: bool = True,
    evaluate: bool = True,
) -> Path:
    """Patient-level cross-validation; writes predictions.csv and (optionally) evaluates.

    Args:
        manifest: Manifest CSV.
        out: Run folder.
        cfg: Resolved config.
        resume: Continue an interrupted run: finished folds are skipped; the interrupted one resumes
            from its ``last.ckpt`` (end_to_end, at most the epoch in progress is lost) or is retrained
            from its start (lpft: no checkpoints). With ``train.deterministic`` and
            ``train.num_workers=0`` the result is byte-identical to an uninterrupted run.
        baselines: Also run the mean-HU and radiomics baselines on the same folds.
        evaluate: Run ``evaluate_run`` at the end.
    """
    from liverlesion.data import load_patch_arrays  # local: heavy (torch)
    from liverlesion.splits import check_fold_classes, load_or_create_splits  # local: heavy (sklearn)

    # Validate, then work: the same fold checks as the CLI, before the run folder or patches exist.
    df = read_manifest(manifest)
    check_positive_setting(cfg, class_names_from(df))
    check_manifest_folds(df, cfg)
    manifest, out, patch_dir, index, classes, resolved = _start_run(manifest, out, cfg, resume, "cv")
    for turn in ("first", "rest"):  # rank 0 writes splits.json, the other ranks then read it
        if (_init_distributed(cfg) == 0) == (turn == "first"):
            splits = load_or_create_splits(
                runs.splits_path(out), index, cfg.cv.folds, cfg.cv.seed, cfg.train.val_fraction
            )
            check_fold_classes(splits, index)
        _barrier()
    info, imagenet = _announce_init(cfg, manifest, out, patch_dir, classes, "cv", resolved)
    print(
        f"{len(index)} lesions, {index['patient_id'].nunique()} patients, classes {classes}; "
        f"{cfg.cv.folds}-fold patient-level CV"
    )
    arrays = load_patch_arrays(patch_dir, index, cfg.model.pool)
    todo = [
        s
        for s in splits["splits"]
        if not (
            runs.model_path(out, s["fold"]).exists()
            and runs.fold_predictions_path(runs.fold_dir(out, s["fold"]), "test").exists()
        )
    ]
    need_frozen = baselines and cfg.train.recipe == "lpft"
    shared = (
        prepare_shared(
            cfg, index, arrays, patch_dir, classes, imagenet, image_chans(arrays[0].shape[1], cfg.model.pool)
        )
        if todo or need_frozen
        else {}
    )

    test_frames, val_frames = [], []
    t0 = time.time()
    for s in splits["splits"]:
        k = s["fold"]
        fold_dir = runs.fold_dir(out, k)
        done = runs.fold_model_path(fold_dir)
        if done.exists() and runs.fold_predictions_path(fold_dir, "test").exists():
            print(f"Fold {k + 1}/{cfg.cv.folds}: already trained, reusing {done}")
            # the values as written (ids as text, floats round-trip), so a resumed run's predictions.csv
            # is byte-identical to an uninterrupted one
            ids = {c: str for c in ("patient_id", "lesion_id", "true_class", "pred_class")}
            for frames, name in ((test_frames, "test"), (val_frames, "val")):
                kept = runs.fold_predictions_path(fold_dir, name)
                check_csv_complete(kept, f"delete the folder {fold_dir} and run again to retrain this fold")
                frames.append(pd.read_csv(kept, dtype=ids, float_precision="round_trip"))
            continue
        fit = fold_subset(index, arrays, classes, s["train_patients"])
        val = fold_subset(index, arrays, classes, s["val_patients"])
        test = fold_subset(index, arrays, classes, s["test_patients"])
        assert not set(fit.index["patient_id"]) & set(test.index["patient_id"]), "patient leak into test fold"
        print(
            f"Fold {k + 1}/{cfg.cv.folds}: train {len(fit.arrays)} lesions, inner-val {len(val.arrays)}, "
            f"test {len(test.arrays)}"
        )
        res = train_fold(
            fold_dir,
            fit,
            val,
            {"test": test},
            classes,
            cfg,
            k,
            {"run": "cv"},
            resume=resume,
            imagenet=imagenet,
            shared=shared,
        )
        if not res:
            continue  # non-zero DDP rank
        test_frames.append(res["test"])
        val_frames.append(res["val"])
    if not test_frames:
        return out
    preds = pd.concat(test_frames, ignore_index=True)
    write_csv(runs.predictions_path(out), preds)
    write_csv(runs.val_predictions_path(out), pd.concat(val_frames, ignore_index=True))
    info["train_seconds"] = round(time.time() - t0, 1)
    write_json(runs.run_info_path(out), info)
    if baselines:
        from liverlesion.baselines import run_baselines  # local: heavy (scipy)

        run_baselines(
            index,
            patch_dir,
            splits,
            runs.baselines_dir(out),
            positive_class=cfg.eval.positive_class,
            seed=cfg.cv.seed,
            frozen=_frozen_features(shared, index, cfg, patch_dir),
        )
    if evaluate:
        from liverlesion.evaluate import evaluate_run  # local: heavy (scipy)

        evaluate_run(out)
    return out


def _frozen_features(
    shared: dict[str, Any], index: pd.DataFrame, cfg: Config, patch_dir: Path
) -> pd.DataFrame | None:
    """Frozen ImageNet features (identity view, mean over samples) for the frozen_lr baseline.

    lpft has them in its cache; other recipes (``end_to_end``, the paper preset) compute them as
    ``liverlesion baselines`` does, so every run shows the frozen-feature floor.
    """
    cache = shared.get("cache")
    if cache is None or cfg.model.weights.lower() != "imagenet":
        from liverlesion.baselines import frozen_lr_table  # local: heavy (torch)

        return frozen_lr_table(cfg, patch_dir, index)  # or None, saying why (not ImageNet weights)
    from liverlesion.features import frozen_table  # local: heavy (scipy)

    # global pooling whatever model.pool is: the "frozen ImageNet + LR" floor
    return frozen_table(index["lesion_id"], np.stack([p.mean(0) for p in cache.frozen]))


def _read_train_split(path: Path) -> dict[str, Any]:
    """The inner split of a ``train`` run (``splits.json``: train and validation patients)."""
    fix = "delete it and run again to draw the split anew"
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8 text
        raise UserError(f"{path}: not valid JSON ({e}); {fix}") from None
    ok = isinstance(split, dict) and all(
        isinstance(split.get(k), list) and split[k] for k in ("train_patients", "val_patients")
    )
    if not ok:
        raise UserError(f"{path}: lacks the lists train_patients and val_patients of a train run; {fix}")
    return split


@_quietly
def train_single(manifest: str | Path, out: str | Path, cfg: Config, resume: bool = False) -> Path:
    """Train one model on all patients (an inner validation split by patient for early stopping)."""
    from liverlesion.data import load_patch_arrays  # local: heavy (torch)
    from liverlesion.splits import check_train_split, make_train_split  # local: heavy (sklearn)

    # Validate, then work: the inner split the patients must give, before the run folder or patches exist.
    source = f"manifest {manifest}"
    check_train_split(read_manifest(manifest), cfg.train.val_fraction, source)
    manifest, out, patch_dir, index, classes, resolved = _start_run(manifest, out, cfg, resume, "train")
    split_file = runs.splits_path(out)
    if _init_distributed(cfg) == 0 and not split_file.exists():
        write_json(split_file, make_train_split(index, cfg.train.val_fraction, cfg.cv.seed, source))
    _barrier()  # under torchrun every rank reads the split rank 0 wrote
    split = _read_train_split(split_file)
    _, imagenet = _announce_init(cfg, manifest, out, patch_dir, classes, "train", resolved)
    arrays = load_patch_arrays(patch_dir, index, cfg.model.pool)
    shared = prepare_shared(
        cfg,
        index,
        arrays,
        patch_dir,
        classes,
        imagenet,
        image_chans(arrays[0].shape[1], cfg.model.pool),
        kind="train",
    )
    fit = fold_subset(index, arrays, classes, split["train_patients"])
    val = fold_subset(index, arrays, classes, split["val_patients"])
    res = train_fold(
        out,
        fit,
        val,
        {},
        classes,
        cfg,
        "all",
        {"run": "train"},
        resume=resume,
        imagenet=imagenet,
        shared=shared,
    )
    if res:
        print(
            f"Saved {runs.fold_model_path(out)} (inner-validation accuracy "
            f"{(res['val']['pred_class'] == res['val']['true_class']).mean():.3f}); "
            f"next: liverlesion predict --model {out} --image CT --mask MASK -o OUT"
        )
    return out
