"""Training of one fold, then its predictions.

``train_fold`` (called by ``cv.run_cv`` and ``cv.train_single``) trains one model with early
stopping on the fold's inner validation patients (never on the test fold): the ``lpft`` recipe
(``lpft.py``) on the shared view cache, or the paper's end-to-end recipe with Lightning
(``lightning_modules.LesionModule``). ``finish_fold`` then sets or chooses the fusion weight
(``fusion.py``), the temperature and the threshold on training patients only, writes a
self-describing checkpoint and the lesion-level predictions of every set.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import runs
from liverlesion.config import Config, fixed_fusion_weight, fusion_votes
from liverlesion.decision import CLASSIFIED, TOO_SMALL, choose_threshold, decide, too_small_rows
from liverlesion.domain import training_range
from liverlesion.fileio import write_csv
from liverlesion.fusion import (
    calibrate_deep,
    choose_alpha,
    cross_fitted_radiomics,
    fit_fusion,
    gate_weight,
    inner_patient_splits,
    radiomics_logits,
)
from liverlesion.inference import apply_temperature, fit_temperature, lesion_logits
from liverlesion.model_input import image_chans, takes_mask
from liverlesion.progress import lightning_progress


@dataclass
class FoldData:
    index: pd.DataFrame  # lesion rows of this subset
    arrays: list[np.ndarray]
    labels: np.ndarray
    rows: np.ndarray | None = (
        None  # positions of these lesions in the run's lesion table (feature and view caches)
    )


def fold_subset(index: pd.DataFrame, arrays: list[np.ndarray], classes: list[str], patients) -> FoldData:
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

    from liverlesion.data import Augment, PatchDataset  # local: heavy (torch)

    t = cfg.train
    n_mask = int(takes_mask(cfg.model.pool))  # the lesion-mask channel moves but is not jittered
    aug = Augment(t.aug_flip, t.aug_rotate_deg, t.aug_scale, t.aug_intensity, n_mask=n_mask)
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
    bar = lightning_progress(enable_progress)
    stop = EarlyStopping(monitor="val_loss", patience=t.patience, min_delta=t.min_delta, mode="min")
    callbacks = [stop, ckpt, *bar]
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
    data: FoldData,
    classes: list[str],
    logits: np.ndarray,
    probs: np.ndarray,
    fold: Any,
    dec: dict[str, Any],
    network_logits: np.ndarray | None = None,
) -> pd.DataFrame:
    """The ``predictions.csv`` rows of one set: calibrated probabilities, the decision and its status.

    ``network_logits`` (fusion models): the calibrated network half's logits before mixing, written
    as ``network_prob_<class>`` so that every run shows what the network alone does.
    """
    idx = data.index
    df = pd.DataFrame(
        {
            "patient_id": idx["patient_id"].astype(str),
            "lesion_id": idx["lesion_id"].astype(str),
            "true_class": idx["lesion_class"].astype(str),
        }
    )
    small = too_small_rows(idx, dec["min_size_mm"])
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
    if "network_weight" in dec:  # fusion models: the network's weight in the fused logits
        df["network_weight"] = dec["network_weight"]
    if network_logits is not None:
        half = np.where(small[:, None], np.nan, apply_temperature(network_logits, 1.0))
        for j, c in enumerate(classes):
            df[f"network_prob_{c}"] = half[:, j]
    df["fold"] = fold
    for col in ("max_axial_diameter_mm", "volume_ml", "min_axis_mm", "hu_mean"):
        if col in idx:
            df[col] = idx[col].to_numpy()
    return df


def _in_table_order(extra: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of ``rows`` in lesion-table order, the order the radiomics baselines fit in."""
    order = np.argsort(rows, kind="stable")
    return extra[rows[order]], labels[order]


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

    The network's weight in a fusion model is judged on held-out training lesions: ``cross_fitted()``
    (lpft recipe) returns out-of-fold ``(deep, radiomics, labels, too_small, patient_ids)`` over every
    training patient, so it is judged on all of them rather than on the inner-validation lesions
    alone (the end-to-end recipe). A number in ``model.fusion_weight`` is taken or refused
    (:func:`liverlesion.fusion.gate_weight`); ``auto`` chooses it (:func:`liverlesion.fusion.choose_alpha`).
    """
    import torch

    info: dict[str, Any] = {}
    val_deep = deep_logits(val)

    def fused(data: FoldData, deep: np.ndarray) -> np.ndarray:
        if not model.fusion_features:
            return deep
        a = float(model.fusion_alpha.item())
        return a * deep + (1 - a) * radiomics_logits(model, extra[data.rows])

    ok = ~too_small_rows(val.index, cfg.eval.min_size_mm)
    vote = fusion_votes(cfg.model)
    if model.fusion_features:
        fit_fusion(model, *_in_table_order(extra, fit.rows, fit.labels), cfg.train.seed, vote)
        # each half calibrated on its own, then mixed (fusion.py)
        deep_t = float(fit_temperature(val_deep[ok], val.labels[ok]))
        calibrate_deep(model, deep_t)
        val_deep = val_deep / deep_t
        oof = cross_fitted() if cross_fitted is not None else None
        if oof is not None:
            d_oof, r_oof, y_oof, small_oof, patients = oof
            keep = ~small_oof
            d = d_oof[keep] / fit_temperature(d_oof[keep], y_oof[keep])
            r, y_w, g_w = r_oof[keep], y_oof[keep], patients[keep]
            chosen_on = f"out-of-fold over {int(keep.sum())} training lesions (inner patient folds)"
        else:
            d, r = val_deep[ok], radiomics_logits(model, extra[val.rows])[ok]
            y_w, g_w = val.labels[ok], val.index["patient_id"].astype(str).to_numpy()[ok]
            chosen_on = f"{int(ok.sum())} inner-validation lesions"
        fixed = fixed_fusion_weight(cfg.model)
        if fixed is None:
            alpha, temperature, scores = choose_alpha(d, r, y_w, g_w)
        else:
            # the set weight or none, and no temperature on top of the two calibrated halves: one
            # fitted per fold on ~40 inner-validation lesions (0.6-1.5) put the folds on different
            # scales (pooled ROC AUC -0.009 on one cohort) without a better NLL
            alpha, scores = gate_weight(d, r, y_w, fixed)
            temperature = 1.0
        with torch.no_grad():
            model.fusion_alpha.fill_(alpha)
        info["fusion"] = {
            "alpha": alpha,
            "chosen_on": chosen_on,
            "network_temperature": deep_t,
            "nll_by_alpha": scores,
        }
        val_logits = fused(val, val_deep)
    else:
        val_logits = val_deep
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
    if model.fusion_features:
        dec["network_weight"] = info["fusion"]["alpha"]  # as chosen (the model holds it in float32)
    half = val_deep if model.fusion_features else None  # calibrated by the network's own temperature
    results = {"val": _prediction_frame(val, classes, val_logits, val_probs, fold, dec, half)}
    if model.fusion_features and len(val.rows):
        # weight, temperature and threshold are chosen; the radiomics half is refit on every training
        # patient (fit + inner validation), as the radiomics baselines are, before the test folds
        rows, labels = np.concatenate([fit.rows, val.rows]), np.concatenate([fit.labels, val.labels])
        fit_fusion(model, *_in_table_order(extra, rows, labels), cfg.train.seed, vote)
    for name, data in tests.items():
        if len(data.arrays):
            deep = deep_logits(data)  # calibrate_deep folded the network's temperature into its head
            lg = fused(data, deep)
            results[name] = _prediction_frame(
                data,
                classes,
                lg,
                apply_temperature(lg, temperature),
                fold,
                dec,
                deep if model.fusion_features else None,
            )
    return results, {**info, **dec}


def _train_end_to_end(
    model, fit: FoldData, val: FoldData, classes, cfg: Config, fold_dir: Path, resume: bool
):
    """The paper's recipe: the whole network trained end to end (Lightning, early stopping on inner val)."""
    import torch

    from liverlesion.lightning_modules import LesionModule  # local: heavy (lightning)

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
    def fn(data: FoldData) -> np.ndarray:
        model.eval()
        return lesion_logits(lambda x, _e: model.network_logits(x), data.arrays, tta=cfg.model.tta)

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

    from liverlesion.model import build_model, save_checkpoint  # local: heavy (torch)

    shared = shared or {}
    fold_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    in_chans = image_chans(fit.arrays[0].shape[1], cfg.model.pool)  # arrays: model_input's
    t0 = time.time()
    extra, names = shared.get("extra"), shared.get("extra_names", [])
    cross_fitted = None
    if cfg.train.recipe == "lpft":
        from liverlesion.lpft import deep_logits_from_cache, train_lpft  # local: heavy (torch)

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
                from liverlesion.lpft import cross_fitted_probe_logits  # local: heavy (torch)

                rows = np.concatenate([fit.rows, val.rows])
                idx = pd.concat([fit.index, val.index], ignore_index=True)
                y = np.concatenate([fit.labels, val.labels])
                patients = idx["patient_id"].astype(str).to_numpy()
                splits = inner_patient_splits(patients)
                epochs = int(train_info["probe"].get("best_epochs", 0))
                d = cross_fitted_probe_logits(head0, cache, rows, labels, splits, cfg, epochs)
                r = cross_fitted_radiomics(
                    extra[rows], y, splits, len(classes), cfg.train.seed, fusion_votes(cfg.model)
                )
                return d, r, y, too_small_rows(idx, cfg.eval.min_size_mm), patients
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
        # counts, not the ids: a model is shared beyond the site, and a manifest's patient_id may be an
        # MRN (the run folder's splits.json keeps which patients each fold used)
        n_train_patients=int(fit.index["patient_id"].astype(str).nunique()),
        n_val_patients=int(val.index["patient_id"].astype(str).nunique()),
        training_domain=_training_domain(shared, fit, val),
        epochs_trained=int(train_info.get("epochs", 0)),
        train_seconds=round(time.time() - t0, 1),
        **meta,
    )
    for name, df in results.items():
        write_csv(runs.fold_predictions_path(fold_dir, name), df)
    # The fold is done: model.pt and its predictions are all that resume and every later step read.
    # Lightning's resume checkpoints (weights + optimiser state, about 3x the model: ~1.6 GB per
    # inception_v3 run of 5 folds) would only fill the disk.
    shutil.rmtree(runs.checkpoints_dir(fold_dir), ignore_errors=True)
    return results


def _training_domain(shared: dict[str, Any], fit: FoldData, val: FoldData) -> dict[str, Any] | None:
    """The intensity/spacing range of this fold's training lesions (fit + inner validation, never test)."""
    table = shared.get("domain")
    if table is None:
        return None
    ids = pd.concat([fit.index["lesion_id"], val.index["lesion_id"]]).astype(str)
    return training_range(table, ids)
