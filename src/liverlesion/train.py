"""Training: one fold at a time, with Lightning, then out-of-fold predictions.

Read top to bottom: ``run_cv`` prepares patches and patient-level splits, then
for each fold calls ``train_fold``, which builds the datasets, the network
(``model.build_model``), a Lightning module and trainer, fits with early
stopping on the fold's inner validation patients (never on the test fold),
and writes a self-describing checkpoint plus lesion-level predictions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, __version__, runs
from liverlesion.config import Config
from liverlesion.errors import UserError
from liverlesion.fileio import write_csv, write_json


# --------------------------------------------------------------------------- setup
def _prepare_run_dir(out: Path, resume: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise UserError(
            f"{out}: run folder already exists and is not empty; pass --resume to continue it, or choose a new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _quiet_lightning() -> None:
    """Keep the terminal readable: progress bars and our own lines, not Lightning's tips and notices."""
    import logging
    import warnings

    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*treespec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*number of training batches.*")
    # lpft keeps the pretrained BatchNorm statistics on purpose (modules in eval mode while training)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


def _set_threads(cfg: Config) -> None:
    import torch

    _quiet_lightning()

    if cfg.train.max_threads > 0:
        torch.set_num_threads(cfg.train.max_threads)


def prepare_patches(manifest: Path, out: Path, cfg: Config) -> tuple[Path, pd.DataFrame]:
    """Cut (or reuse cached) patches into ``out/patches`` and return (patch_dir, lesion table)."""
    from liverlesion.patches import build_patches, load_patch_index

    patch_dir = build_patches(manifest, runs.patches_dir(out), cfg.patch)
    index = load_patch_index(patch_dir)
    if index.empty:
        raise UserError(
            f"{manifest}: no lesions found; check the masks and labels with `liverlesion inspect`"
        )
    return Path(patch_dir), index


def class_names_from(index: pd.DataFrame) -> list[str]:
    """Classes in a stable order (sorted names), from the manifest's lesion_class column."""
    names = sorted(index["lesion_class"].astype(str).unique())
    if len(names) < 2:
        raise UserError(
            f"manifest lesion_class: only one class ({names[0]!r}) present; a classifier needs at least two"
        )
    return names


# --------------------------------------------------------------------------- one fold
@dataclass
class FoldData:
    index: pd.DataFrame  # lesion rows of this subset
    arrays: list[np.ndarray]
    labels: np.ndarray
    rows: np.ndarray | None = (
        None  # positions of these lesions in the run's lesion table (feature and view caches)
    )


def _subset(index: pd.DataFrame, arrays: list[np.ndarray], classes: list[str], patients) -> FoldData:
    mask = index["patient_id"].astype(str).isin(set(map(str, patients))).to_numpy()
    rows = np.flatnonzero(mask)
    sub = index.iloc[rows].reset_index(drop=True)
    cmap = {c: i for i, c in enumerate(classes)}
    return FoldData(
        sub, [arrays[i] for i in rows], sub["lesion_class"].astype(str).map(cmap).to_numpy(), rows
    )


class _EpochSampler:
    """Training order drawn from ``(seed, epoch)`` alone, so a run resumed at epoch N sees the batches an
    uninterrupted run would (a shuffled permutation, or class-balanced draws with ``weights``).

    Lightning calls ``set_epoch`` before each epoch's first batch; the order is drawn lazily then.
    """

    def __init__(self, n: int, seed: int, weights=None):
        self.n, self.seed, self.weights, self.epoch = n, int(seed), weights, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        return iter(order.tolist())


def _loaders(fit: FoldData, val: FoldData, cfg: Config):
    import torch
    from torch.utils.data import DataLoader

    from liverlesion.data import Augment, PatchDataset

    t = cfg.train
    aug = Augment(t.aug_flip, t.aug_rotate_deg, t.aug_scale, t.aug_intensity)
    train_ds = PatchDataset(fit.arrays, fit.labels, augment=aug)
    val_ds = PatchDataset(val.arrays, val.labels)
    weights = None
    if t.class_weighting == "sampler":
        y = train_ds.sample_labels()
        weights = torch.as_tensor(1.0 / np.bincount(y, minlength=y.max() + 1)[y], dtype=torch.double)
    sampler = _EpochSampler(len(train_ds), t.seed, weights)
    g = torch.Generator().manual_seed(t.seed)
    common = {
        "batch_size": t.batch_size,
        "num_workers": t.num_workers,
        "persistent_workers": t.num_workers > 0,
    }
    train_dl = DataLoader(
        train_ds,
        sampler=sampler,
        drop_last=len(train_ds) > t.batch_size,
        generator=g,
        **common,
    )
    val_dl = DataLoader(val_ds, shuffle=False, **common)
    return train_dl, val_dl


def _class_weights(labels: np.ndarray, n_classes: int, mode: str):
    if mode != "loss":
        return None
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    counts[counts == 0] = 1.0
    w = counts.sum() / (n_classes * counts)
    return w


def _trainer(cfg: Config, fold_dir: Path, enable_progress: bool = True):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg.train
    precision = t.precision
    if precision == "auto":
        import torch

        precision = "16-mixed" if torch.cuda.is_available() and t.accelerator != "cpu" else "32-true"
    ckpt = ModelCheckpoint(
        dirpath=runs.checkpoints_dir(fold_dir),
        filename="best",
        monitor="val_loss",
        mode="min",
        save_last=True,
    )
    from liverlesion.progress import lightning_progress

    bar = lightning_progress(enable_progress)
    callbacks = [EarlyStopping(monitor="val_loss", patience=t.patience, mode="min"), ckpt, *bar]
    devices: Any = t.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    trainer = pl.Trainer(
        max_epochs=t.epochs,
        accelerator=t.accelerator,
        devices=devices,
        precision=precision,
        deterministic=t.deterministic,
        callbacks=callbacks,
        logger=[
            TensorBoardLogger(runs.logs_dir(fold_dir), name="", version="tensorboard"),
            CSVLogger(runs.logs_dir(fold_dir), name="", version="csv"),
        ],
        log_every_n_steps=1,
        enable_progress_bar=bool(bar),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=fold_dir,
    )
    return trainer, ckpt


def _prediction_frame(
    data: FoldData, classes: list[str], logits: np.ndarray, probs: np.ndarray, fold: Any, dec: dict[str, Any]
) -> pd.DataFrame:
    """The ``predictions.csv`` rows of one set: calibrated probabilities, the decision and its status."""
    from liverlesion.decision import CLASSIFIED, TOO_SMALL, decide, too_small

    idx = data.index
    df = pd.DataFrame(
        {
            "patient_id": idx["patient_id"].astype(str),
            "lesion_id": idx["lesion_id"].astype(str),
            "true_class": idx["lesion_class"].astype(str),
        }
    )
    sizes = idx["min_axis_mm"] if "min_axis_mm" in idx else pd.Series(np.inf, index=idx.index)
    small = np.array([too_small(v, dec["min_size_mm"]) for v in sizes], dtype=bool)
    probs = np.where(small[:, None], np.nan, probs)
    for j, c in enumerate(classes):
        df[f"prob_{c}"] = probs[:, j]
    for j, c in enumerate(classes):
        df[f"logit_{c}"] = logits[:, j]
    pred = decide(np.nan_to_num(probs), classes, dec["positive_class"], dec["threshold"])
    df["pred_class"] = [TOO_SMALL if s else p for s, p in zip(small, pred, strict=True)]
    df["status"] = [TOO_SMALL if s else CLASSIFIED for s in small]
    df["threshold"] = dec["threshold"] if dec["threshold"] is not None else np.nan
    df["temperature"] = dec["temperature"]
    df["fold"] = fold
    for col in ("max_axial_diameter_mm", "volume_ml", "min_axis_mm", "hu_mean"):
        if col in idx:
            df[col] = idx[col].to_numpy()
    return df


def _radiomics_logits(model, extra: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        e = torch.from_numpy(np.asarray(extra, dtype=np.float32))
        e = torch.where(torch.isnan(e), model.fusion_fill, e)
        return model.fusion_head((e - model.fusion_mean) / model.fusion_std).double().numpy()


def _radiomics_lr(fit_x: np.ndarray, fit_y: np.ndarray, k: int, seed: int):
    """The radiomics baselines' logistic regression, as plain arrays (fill, mean, std, W, b) of logits."""
    from liverlesion.baselines import lr_pipeline

    x = np.where(np.isfinite(fit_x), fit_x, np.nan)
    pipe = lr_pipeline(seed).fit(x, fit_y)
    imp, scale, lr = pipe.named_steps["impute"], pipe.named_steps["scale"], pipe.named_steps["lr"]
    fill, mean, std = imp.statistics_, scale.mean_, scale.scale_
    w = np.zeros((k, x.shape[1]))
    b = np.zeros(k)
    # two classes in the fit data (also when a third is absent from it): sklearn gives one binary row
    if len(lr.classes_) == 2:
        w[lr.classes_[1]], b[lr.classes_[1]] = lr.coef_[0] / 2, lr.intercept_[0] / 2
        w[lr.classes_[0]], b[lr.classes_[0]] = -lr.coef_[0] / 2, -lr.intercept_[0] / 2
    else:
        for j, c in enumerate(lr.classes_):
            w[c], b[c] = lr.coef_[j], lr.intercept_[j]
    return fill, mean, std, w, b


def _radiomics_lr_logits(params, x: np.ndarray) -> np.ndarray:
    fill, mean, std, w, b = params
    x = np.where(np.isfinite(x), x, fill)
    return ((x - mean) / std) @ w.T + b


def _fit_fusion(model, fit_x: np.ndarray, fit_y: np.ndarray, seed: int) -> None:
    """The fusion branch: a class-balanced logistic regression on training-fold-standardised features."""
    import torch

    fill, mean, std, w, b = _radiomics_lr(fit_x, fit_y, model.num_classes, seed)
    with torch.no_grad():
        model.fusion_fill.copy_(torch.as_tensor(fill, dtype=torch.float32))
        model.fusion_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        model.fusion_std.copy_(torch.as_tensor(std, dtype=torch.float32))
        model.fusion_head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        model.fusion_head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))


def _choose_alpha(deep: np.ndarray, rad: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
    """Weight of the network in the fused logits, from inner-validation NLL (after temperature).

    A grid of weights is scored on a few dozen lesions, so the winner is partly noise. A mixture is
    taken only when it beats the better half by more than one standard error of the paired
    per-lesion NLL difference (the one-standard-error rule); otherwise the better half alone is
    used. So on cohorts where one half is weak, fusion falls back to the other instead of mixing
    in noise.
    """
    from scipy.special import log_softmax

    from liverlesion.inference import fit_temperature

    if not len(y):
        return 0.5, {}
    losses: dict[float, np.ndarray] = {}
    for a in np.round(np.linspace(0.0, 1.0, 21), 2):
        z = a * deep + (1 - a) * rad
        t = fit_temperature(z, y)
        losses[float(a)] = -log_softmax(z / t, axis=1)[np.arange(len(y)), y]
    scores = {a: float(v.mean()) for a, v in losses.items()}
    best = min(scores.values())
    # ties (e.g. both halves perfect on inner validation): the most even mix
    mix = min((a for a, v in scores.items() if v <= best + 1e-4), key=lambda a: abs(a - 0.5))
    half = 0.0 if scores[0.0] <= scores[1.0] else 1.0
    gain = losses[half] - losses[mix]
    se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else 0.0
    alpha = mix if float(gain.mean()) > se else half
    return alpha, scores


def inner_patient_splits(groups: np.ndarray, n_splits: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped inner folds over a training fold (positions into ``groups``)."""
    from sklearn.model_selection import GroupKFold

    n = min(n_splits, len(np.unique(groups)))
    return list(GroupKFold(n_splits=n).split(np.zeros(len(groups)), groups=groups)) if n >= 2 else []


def cross_fitted_radiomics(
    x: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]], k: int, seed: int
) -> np.ndarray:
    """Out-of-fold radiomics-LR logits on the same inner splits as the probe's."""
    out = np.zeros((len(y), k))
    for tr, te in splits:
        if len(np.unique(y[tr])) < 2:
            continue  # an inner fold with one class: no model, neutral logits
        out[te] = _radiomics_lr_logits(_radiomics_lr(x[tr], y[tr], k, seed), x[te])
    return out


def finish_fold(
    model,
    deep_logits,
    fit: FoldData,
    val: FoldData,
    tests: dict[str, FoldData],
    classes: list[str],
    cfg: Config,
    extra: np.ndarray | None,
    fold: Any,
    cross_fitted=None,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Fusion weight, temperature and threshold on inner validation; predictions of every set.

    ``deep_logits(data)`` gives the network's lesion logits of a set (TTA views and samples averaged
    by :mod:`liverlesion.inference`). The threshold is fitted on the same calibrated probabilities
    it is compared with later, on the lesions the size rule lets through.

    ``cross_fitted(extra_rows_fit_val)`` (lpft recipe) returns out-of-fold ``(deep, radiomics,
    labels, min_axis_mm)`` over every training patient; the fusion weight is then chosen on all of
    them rather than on the inner-validation lesions alone.
    """
    import torch

    from liverlesion.decision import choose_threshold, too_small
    from liverlesion.inference import apply_temperature, fit_temperature

    info: dict[str, Any] = {}
    val_deep = deep_logits(val)

    def fused(data: FoldData, deep: np.ndarray) -> np.ndarray:
        if not model.fusion_features:
            return deep
        a = float(model.fusion_alpha.item())
        return a * deep + (1 - a) * _radiomics_logits(model, extra[data.rows])

    sizes = val.index["min_axis_mm"] if "min_axis_mm" in val.index else [np.inf] * len(val.index)
    ok = np.array([not too_small(v, cfg.eval.min_size_mm) for v in sizes], dtype=bool)
    if model.fusion_features:
        _fit_fusion(model, extra[fit.rows], fit.labels, cfg.train.seed)
        oof = cross_fitted() if cross_fitted is not None else None
        if oof is not None:
            d_oof, r_oof, y_oof, size_oof = oof
            keep = np.array([not too_small(v, cfg.eval.min_size_mm) for v in size_oof], dtype=bool)
            alpha, scores = _choose_alpha(d_oof[keep], r_oof[keep], y_oof[keep])
            chosen_on = f"out-of-fold over {int(keep.sum())} training lesions (inner patient folds)"
        else:
            rad = _radiomics_logits(model, extra[val.rows])
            alpha, scores = _choose_alpha(val_deep[ok], rad[ok], val.labels[ok])
            chosen_on = f"{int(ok.sum())} inner-validation lesions"
        with torch.no_grad():
            model.fusion_alpha.fill_(alpha)
        info["fusion"] = {"alpha": alpha, "chosen_on": chosen_on, "nll_by_alpha": scores}
    val_logits = fused(val, val_deep)
    temperature = float(fit_temperature(val_logits[ok], val.labels[ok]))
    val_probs = apply_temperature(val_logits, temperature)
    positive = cfg.eval.positive_class if cfg.eval.positive_class in classes else None
    threshold = None
    if len(classes) == 2 and positive is not None:
        y_pos = (val.labels[ok] == classes.index(positive)).astype(int)
        threshold = float(choose_threshold(y_pos, val_probs[ok, classes.index(positive)], cfg.eval.threshold))
    dec = {
        "temperature": temperature,
        "threshold": threshold,
        "positive_class": positive,
        "min_size_mm": cfg.eval.min_size_mm,
    }
    results = {"val": _prediction_frame(val, classes, val_logits, val_probs, fold, dec)}
    if model.fusion_features and len(val.rows):
        # weight, temperature and threshold are chosen; the radiomics half is refit on every training
        # patient (fit + inner validation), as the radiomics baselines are, before the test folds
        _fit_fusion(
            model,
            extra[np.concatenate([fit.rows, val.rows])],
            np.concatenate([fit.labels, val.labels]),
            cfg.train.seed,
        )
    for name, data in tests.items():
        if len(data.arrays):
            lg = fused(data, deep_logits(data))
            results[name] = _prediction_frame(
                data, classes, lg, apply_temperature(lg, temperature), fold, dec
            )
    return results, {**info, **dec}


def _train_end_to_end(
    model, fit: FoldData, val: FoldData, classes, cfg: Config, fold_dir: Path, resume: bool
):
    """The paper's recipe: the whole network trained end to end (Lightning, early stopping on inner val)."""
    import torch

    from liverlesion.lightning_modules import LesionModule

    module = LesionModule(model, cfg, _class_weights(fit.labels, len(classes), cfg.train.class_weighting))
    train_dl, val_dl = _loaders(fit, val, cfg)
    trainer, ckpt_cb = _trainer(cfg, fold_dir)
    last = runs.checkpoints_dir(fold_dir) / "last.ckpt"
    trainer.fit(module, train_dl, val_dl, ckpt_path=_resume_checkpoint(last) if resume else None)
    if ckpt_cb.best_model_path:
        state = torch.load(ckpt_cb.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    return (
        module.model.cpu(),
        trainer.global_rank,
        {"recipe": "end_to_end", "epochs": int(trainer.current_epoch)},
    )


def _resume_checkpoint(last: Path) -> str | None:
    """``last.ckpt`` when it can be resumed from; None (the fold restarts) when absent or unreadable.

    A process killed while Lightning wrote the file leaves it truncated.
    """
    import torch

    if not last.exists():
        return None
    try:
        torch.load(last, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt: any unpickling error
        print(f"Note: {last} is unreadable ({type(e).__name__}); this fold restarts from epoch 0")
        return None
    return str(last)


def _full_deep_logits(model, cfg: Config):
    from liverlesion.inference import lesion_logits

    def fn(data: FoldData) -> np.ndarray:
        model.eval()
        return lesion_logits(lambda x, _e: model.head(model.features(x)), data.arrays, tta=cfg.model.tta)

    return fn


def train_fold(
    fold_dir: Path,
    fit: FoldData,
    val: FoldData,
    tests: dict[str, FoldData],
    classes: list[str],
    cfg: Config,
    fold: Any,
    meta: dict[str, Any],
    resume: bool = False,
    imagenet: Any = None,
    shared: dict[str, Any] | None = None,
) -> dict[str, pd.DataFrame]:
    """Train one model with early stopping on ``val``; write ``model.pt``; predict each set in ``tests``.

    ``imagenet`` is an already resolved ``weights.ImagenetWeights`` (``run_cv`` resolves it once).
    ``shared`` holds what every fold reuses: ``extra`` (fusion features of every lesion, with their
    ``extra_names``), and for the lpft recipe the pretrained ``template`` model and the view ``cache``.
    """
    import copy

    import lightning.pytorch as pl

    from liverlesion.model import build_model, save_checkpoint

    shared = shared or {}
    fold_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    in_chans = int(fit.arrays[0].shape[1])
    t0 = time.time()
    extra, names = shared.get("extra"), shared.get("extra_names", [])
    cross_fitted = None
    if cfg.train.recipe == "lpft":
        from liverlesion.lpft import deep_logits_from_cache, train_lpft

        model = copy.deepcopy(shared["template"])
        init = shared["init"]
        cache = shared["cache"]
        labels = np.full(max(len(cache.lower), 1), -1)
        labels[fit.rows], labels[val.rows] = fit.labels, val.labels
        weights = _class_weights(fit.labels, len(classes), cfg.train.class_weighting)
        head0 = copy.deepcopy(model.head)  # the untrained head, for the cross-fitted probes
        train_info = train_lpft(model, cache, fit.rows, val.rows, labels, cfg, weights, fold_dir)
        rank = 0

        def deep(data: FoldData) -> np.ndarray:
            return deep_logits_from_cache(model, cache, data.rows)

        if extra is not None:

            def cross_fitted():
                from liverlesion.lpft import cross_fitted_probe_logits

                rows = np.concatenate([fit.rows, val.rows])
                idx = pd.concat([fit.index, val.index], ignore_index=True)
                y = np.concatenate([fit.labels, val.labels])
                splits = inner_patient_splits(idx["patient_id"].astype(str).to_numpy())
                epochs = int(train_info["probe"].get("best_epochs", 0))
                d = cross_fitted_probe_logits(head0, cache, rows, labels, splits, cfg, epochs)
                r = cross_fitted_radiomics(extra[rows], y, splits, len(classes), cfg.train.seed)
                sizes = idx["min_axis_mm"] if "min_axis_mm" in idx else np.full(len(idx), np.inf)
                return d, r, y, np.asarray(sizes, dtype=float)
    else:
        model, init = build_model(
            cfg.model, num_classes=len(classes), in_chans=in_chans, imagenet=imagenet, fusion_features=names
        )
        model, rank, train_info = _train_end_to_end(model, fit, val, classes, cfg, fold_dir, resume)
        deep = _full_deep_logits(model, cfg)
    if rank != 0:
        return {}
    results, dec = finish_fold(
        model, deep, fit, val, tests, classes, cfg, extra, fold, cross_fitted=cross_fitted
    )
    save_checkpoint(
        runs.fold_model_path(fold_dir),
        model,
        cfg,
        classes,
        in_chans,
        temperature=dec["temperature"],
        threshold=dec["threshold"],
        positive_class=dec["positive_class"],
        fold=fold,
        init=init,
        training=train_info,
        fusion=dec.get("fusion"),
        train_patients=sorted(set(fit.index["patient_id"].astype(str))),
        val_patients=sorted(set(val.index["patient_id"].astype(str))),
        training_domain=_training_domain(shared, fit, val),
        epochs_trained=int(train_info.get("epochs", 0)),
        train_seconds=round(time.time() - t0, 1),
        **meta,
    )
    for name, df in results.items():
        write_csv(runs.fold_predictions_path(fold_dir, name), df)
    return results


def _training_domain(shared: dict[str, Any], fit: FoldData, val: FoldData) -> dict[str, Any] | None:
    """The intensity/spacing range of this fold's training lesions (fit + inner validation, never test)."""
    from liverlesion.domain import training_range

    table = shared.get("domain")
    if table is None:
        return None
    ids = pd.concat([fit.index["lesion_id"], val.index["lesion_id"]]).astype(str)
    return training_range(table, ids)


def prepare_shared(
    cfg: Config,
    index: pd.DataFrame,
    arrays: list[np.ndarray],
    patch_dir: Path,
    classes: list[str],
    imagenet: Any,
    in_chans: int,
) -> dict[str, Any]:
    """What every fold reuses: fusion features of every lesion and (lpft) the frozen-feature cache."""
    from liverlesion.domain import stats_table
    from liverlesion.model import build_model

    shared: dict[str, Any] = {"extra": None, "extra_names": []}
    # per-lesion intensity/spacing statistics; each fold stores the range of its own training lesions
    shared["domain"] = stats_table(index, patch_dir)
    if cfg.model.fusion == "radiomics":
        from liverlesion.features import cache_radiomics

        print("Fusion: radiomics-style features of every lesion (training-fold statistics per fold)")
        table = cache_radiomics(patch_dir, index, (cfg.patch.window_center, cfg.patch.window_width))
        names = [c for c in table.columns if c != "lesion_id"]
        shared["extra"] = table[names].to_numpy(np.float64)
        shared["extra_names"] = names
    if cfg.train.recipe == "lpft":
        import torch

        from liverlesion.lpft import build_cache, n_top_blocks

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
        print(
            f"Recipe lpft: head on frozen features, then the top {n_top} block(s) fine-tuned; caching "
            f"{views} views per lesion"
        )
        shared.update(template=model, init=init, cache=build_cache(model, arrays, cfg, n_top))
    return shared


# --------------------------------------------------------------------------- entry points
def _run_info(manifest: Path, patch_dir: Path, classes: list[str], cfg: Config, init: str, kind: str) -> dict:
    from liverlesion.versions import library_versions

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
    """CPU model, usable cores and GPU name of the training machine (for the report)."""
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
    return {"cpu": cpu, "cores": cores, "gpu": gpu}


def _resolve_init(cfg: Config) -> tuple[Any, str]:
    """Resolve the init once, up front, so the user sees it before training and folds reuse it.

    Returns:
        (resolved ImageNet weights or None, description of the init).
    """
    if cfg.model.weights.lower() == "imagenet":
        from liverlesion.weights import resolve_imagenet_weights

        w = resolve_imagenet_weights(cfg.model.backbone)
        return w, w.source
    from liverlesion.model import build_model

    _, init = build_model(cfg.model, num_classes=2, in_chans=3)
    return None, init


def _start_run(manifest: str | Path, out: str | Path, cfg: Config, resume: bool, kind: str):
    """Common start of `cv` and `train`: run folder, config.yaml, patches, classes."""
    from liverlesion.manifest import read_manifest

    manifest = Path(manifest)
    # Validate the manifest and its classes before creating anything.
    class_names_from(read_manifest(manifest))
    rank = _init_distributed(cfg)
    out = Path(out)
    if rank == 0:  # under torchrun the first process sets the run folder up, the others wait for it
        out = _prepare_run_dir(out, resume)
    _set_threads(cfg)
    if rank == 0:
        cfg.save(runs.config_path(out))
        print(f"liverlesion {kind}: {DISCLAIMER}")
        patch_dir, index = prepare_patches(manifest, out, cfg)
    _barrier()
    if rank != 0:
        patch_dir, index = prepare_patches(manifest, out, cfg)  # the finished cache: nothing is recut
    return manifest, out, patch_dir, index, class_names_from(index)


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
    cfg: Config, manifest: Path, out: Path, patch_dir: Path, classes: list[str], kind: str
) -> tuple[dict, Any]:
    imagenet, init = _resolve_init(cfg)
    fusion = " + radiomics late fusion" if cfg.model.fusion == "radiomics" else ""
    print(f"Network: {cfg.model.backbone} + paper head{fusion}; recipe {cfg.train.recipe}; init: {init}")
    info = _run_info(manifest, patch_dir, classes, cfg, init, kind)
    write_json(runs.run_info_path(out), info)
    return info, imagenet


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
    from liverlesion.data import load_patch_arrays
    from liverlesion.manifest import read_manifest
    from liverlesion.splits import check_folds, load_or_create_splits

    # Validate, then work: the same fold checks as the CLI, before the run folder or patches exist.
    df = read_manifest(manifest)
    class_names_from(df)
    check_folds(
        int(df["patient_id"].astype(str).nunique()),
        cfg.cv.folds,
        cfg.train.val_fraction,
        classes=list(df["lesion_class"].astype(str)),
    )
    manifest, out, patch_dir, index, classes = _start_run(manifest, out, cfg, resume, "cv")
    for turn in ("first", "rest"):  # rank 0 writes splits.json, the other ranks then read it
        if (_init_distributed(cfg) == 0) == (turn == "first"):
            splits = load_or_create_splits(
                runs.splits_path(out), index, cfg.cv.folds, cfg.cv.seed, cfg.train.val_fraction
            )
        _barrier()
    info, imagenet = _announce_init(cfg, manifest, out, patch_dir, classes, "cv")
    print(
        f"{len(index)} lesions, {index['patient_id'].nunique()} patients, classes {classes}; "
        f"{cfg.cv.folds}-fold patient-level CV"
    )
    arrays = load_patch_arrays(patch_dir, index)
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
        prepare_shared(cfg, index, arrays, patch_dir, classes, imagenet, int(arrays[0].shape[1]))
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
                frames.append(
                    pd.read_csv(
                        runs.fold_predictions_path(fold_dir, name), dtype=ids, float_precision="round_trip"
                    )
                )
            continue
        fit = _subset(index, arrays, classes, s["train_patients"])
        val = _subset(index, arrays, classes, s["val_patients"])
        test = _subset(index, arrays, classes, s["test_patients"])
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
        from liverlesion.baselines import run_baselines

        run_baselines(
            index,
            patch_dir,
            splits,
            runs.baselines_dir(out),
            positive_class=cfg.eval.positive_class,
            seed=cfg.cv.seed,
            frozen=_frozen_features(shared, index, cfg),
        )
    if evaluate:
        from liverlesion.evaluate import evaluate_run

        evaluate_run(out)
    return out


def _frozen_features(shared: dict[str, Any], index: pd.DataFrame, cfg: Config) -> pd.DataFrame | None:
    """Frozen ImageNet features (identity view, mean over samples) for the frozen_lr baseline."""
    cache = shared.get("cache")
    if cache is None or cfg.model.weights.lower() != "imagenet":
        return None
    from liverlesion.features import frozen_table

    return frozen_table(index["lesion_id"], np.stack([p[0].mean(0) for p in cache.pooled]))


def train_single(manifest: str | Path, out: str | Path, cfg: Config, resume: bool = False) -> Path:
    """Train one model on all patients (an inner validation split by patient for early stopping)."""
    from liverlesion.data import load_patch_arrays
    from liverlesion.splits import inner_split_count, make_splits

    manifest, out, patch_dir, index, classes = _start_run(manifest, out, cfg, resume, "train")
    n_inner = inner_split_count(cfg.train.val_fraction)
    split_file = runs.splits_path(out)
    if _init_distributed(cfg) == 0 and not split_file.exists():
        split = make_splits(index, n_inner, cfg.cv.seed, cfg.train.val_fraction)["splits"][0]
        fit_p = sorted(set(split["train_patients"]) | set(split["val_patients"]))
        split = {"group": "patient_id", "train_patients": fit_p, "val_patients": split["test_patients"]}
        write_json(split_file, split)
    _barrier()  # under torchrun every rank reads the split rank 0 wrote
    split = json.loads(split_file.read_text())
    _, imagenet = _announce_init(cfg, manifest, out, patch_dir, classes, "train")
    arrays = load_patch_arrays(patch_dir, index)
    shared = prepare_shared(cfg, index, arrays, patch_dir, classes, imagenet, int(arrays[0].shape[1]))
    fit = _subset(index, arrays, classes, split["train_patients"])
    val = _subset(index, arrays, classes, split["val_patients"])
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
            f"{(res['val']['pred_class'] == res['val']['true_class']).mean():.3f})"
        )
    return out
