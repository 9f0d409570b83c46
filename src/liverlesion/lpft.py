"""Linear probing, then fine-tuning (Kumar et al., ICLR 2022): the default CPU training recipe.

The pretrained backbone is only partly trained, so what ImageNet taught it is kept:

1. **Cache.** The activations below the last ``train.finetune_blocks`` backbone blocks are computed
   once per lesion and per view: the test-time views (``model.tta``) and ``train.aug_views``
   augmented views (flips, rotation, zoom, intensity, as in end-to-end training). They do not depend
   on the fold, so one pass serves every fold of a CV.
2. **Probe.** The paper's head (GAP -> FC 512 -> Dropout 0.4 -> FC 512 -> classes) is trained on the
   frozen pooled features of those views, with early stopping on the inner-validation patients.
3. **Fine-tune.** The top blocks and the head are then trained from the probe on the cached
   activations with a lower learning rate (BatchNorm statistics kept), again with early stopping on
   inner validation only. If fine-tuning never beats the probe on inner validation, the probe is kept.

The result is an ordinary ``LesionNet`` whose full forward pass gives the same logits as the staged
one (tested), so ``predict`` needs nothing but the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from liverlesion import runs
from liverlesion.config import Config
from liverlesion.inference import lesion_logits, tta_flips
from liverlesion.model_input import takes_mask
from liverlesion.progress import lightning_progress, progress_bar


@dataclass
class ViewCache:
    """Per lesion, the cached activations ``(V, S, ...)`` of its views; views ``[:n_tta]`` are the TTA views."""

    lower: list[np.ndarray]
    pooled: list[np.ndarray]  # frozen pooled features (V, S, D) of the same views (the model's pooling)
    n_tta: int
    n_top: int
    # globally average-pooled frozen features (S, D) of the identity view: the frozen_lr baseline's
    frozen: list[np.ndarray] | None = None


def n_top_blocks(model, cfg: Config) -> tuple[int, str | None]:
    """How many top blocks to fine-tune, and a note when the backbone cannot be split."""
    want = int(cfg.train.finetune_blocks)
    if want == 0:
        return 0, None
    blocks = model.blocks()
    if not blocks:
        return 0, f"{model.backbone_name}: blocks are not a plain sequence; probe only (no fine-tuning)"
    return min(want, len(blocks) - 1), None


def build_cache(model, arrays: list[np.ndarray], cfg: Config, n_top: int, progress: bool = True) -> ViewCache:
    """Run the frozen lower backbone over every lesion's TTA and augmented views (once per run).

    ``arrays`` are the model inputs (:func:`~liverlesion.model_input.model_input`): with
    ``model.pool=lesion`` their last channel is the lesion mask, flipped and augmented with the
    image, so each view is pooled with its own mask and its cached activations carry its pooling
    weights (:meth:`~liverlesion.model.LesionNet.forward_lower`).
    """
    from liverlesion.data import Augment  # local: heavy (scipy)
    from liverlesion.model import fold_batchnorm  # local: heavy (timm)

    t = cfg.train
    n_mask = int(takes_mask(model.pool))
    aug = (
        Augment(True, t.aug_rotate_deg, t.aug_scale, t.aug_intensity, n_mask=n_mask)
        if t.aug_views > 0
        else None
    )
    flips = tta_flips(cfg.model.tta)
    gen_state = torch.get_rng_state()
    torch.manual_seed(t.seed)
    model.eval()
    net = fold_batchnorm(model)  # frozen here: BatchNorm folded into the convolutions
    lower, pooled, frozen = [], [], []
    kids = net.blocks()
    top = nn.Sequential(*[m for _, m in kids[len(kids) - n_top :]]) if kids else None
    with channels_last(net), torch.inference_mode():  # layout changes outside inference mode
        for a in progress_bar(arrays, desc="caching frozen features", unit="lesion", enabled=progress):
            x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            views = [x if not d else torch.flip(x, dims=d) for d in flips]
            for _ in range(t.aug_views):
                views.append(torch.stack([aug(s.clone()) for s in x]))
            batch = torch.cat(views)  # (V*S, C, H, W)
            if kids:
                h = net.forward_lower(batch, n_top)
                fmap, weights = net.upper_map(h, top)
            else:
                h = batch
                fmap, weights = net.feature_map(batch), net.split_input(batch)[1]
            f = net._pool(fmap, weights)
            g = net._pool(fmap) if weights is not None else f  # global pooling, for frozen_lr
            v, s = len(views), x.shape[0]
            pooled.append(f.reshape(v, s, -1).numpy().astype(np.float32))
            frozen.append(g.reshape(v, s, -1)[0].numpy().astype(np.float32))
            # probe only: the pooled features are all that is needed
            lower.append(
                h.reshape(v, s, *h.shape[1:]).numpy().astype(np.float32) if n_top > 0 else pooled[-1]
            )
    torch.set_rng_state(gen_state)
    return ViewCache(lower, pooled, len(flips), n_top, frozen)


@contextlib.contextmanager
def channels_last(module: nn.Module):
    """Hold ``module``'s 4-D weights in channels-last (NHWC) layout for the block, then restore them.

    Convolutions then run channels-last on NCHW input (PyTorch follows the weight's layout). On 2
    CPU cores the cache pass ran 1.6x as fast (21.5 -> 33.5 images/s at 160 px) and a fine-tuning
    step and its validation about 1.1x (``benchmarks/bench_lpft_layout.py``); the features agree to
    float rounding. Parameters keep their identity (``.data`` is swapped), so optimisers built inside
    the block stay valid, and checkpoints written after it are in the usual layout. Enter it outside
    ``torch.inference_mode()``, or the weights become inference tensors that cannot be trained.
    """
    module.to(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        module.to(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- stage networks
class _Probe(nn.Module):
    """Stage 1: the head on frozen pooled features."""

    def __init__(self, model):
        super().__init__()
        self.head = model.head

    def forward(self, f):
        return self.head(f)


class _Upper(nn.Module):
    """Stage 2: the top blocks + pooling + head on cached lower activations."""

    def __init__(self, model, n_top: int):
        super().__init__()
        kids = model.blocks()
        self.top = nn.Sequential(*[m for _, m in kids[len(kids) - n_top :]])
        self.head = model.head
        self._pool_upper = model.pool_upper  # lesion pooling: weights in h's last channel

    def forward(self, h):
        return self.head(self._pool_upper(h, self.top))

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.top.modules():  # keep the pretrained BatchNorm statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


class _Views(torch.utils.data.Dataset):
    """Training items: one (lesion, view, sample) each; validation items: a lesion's TTA views stacked."""

    def __init__(self, source: list[np.ndarray], labels: np.ndarray, n_tta: int, train: bool):
        self.source, self.labels, self.n_tta, self.train = source, labels, n_tta, train
        if train:
            self.items = [
                (i, v, s) for i, a in enumerate(source) for v in range(a.shape[0]) for s in range(a.shape[1])
            ]
        else:
            self.items = [(i, -1, -1) for i in range(len(source))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx):
        i, v, s = self.items[idx]
        if self.train:
            x = self.source[i][v, s]
        else:
            a = self.source[i][: self.n_tta]
            x = a.reshape(-1, *a.shape[2:])
        return torch.from_numpy(np.ascontiguousarray(x)), int(self.labels[i])


class _ViewsPerEpoch(torch.utils.data.Sampler):
    """Each epoch, ``k`` of the cached views of every (lesion, sample), drawn at random, in random order.

    An index of :class:`_Views` (train) is one (lesion, view, sample); the views of one (lesion,
    sample) are its TTA flips and augmented copies, so an epoch of all of them sees every lesion as
    many times as it has views. Drawing ``k`` per epoch keeps every lesion and sample in every
    epoch while early stopping looks ``views / k`` times as often.
    """

    def __init__(self, ds: _Views, k: int, generator: torch.Generator):
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (i, _, s) in enumerate(ds.items):
            groups.setdefault((i, s), []).append(j)
        self.groups, self.k, self.generator = list(groups.values()), k, generator

    def __len__(self) -> int:
        return sum(min(self.k, len(g)) for g in self.groups)

    def __iter__(self):
        picked = [
            g[int(v)] for g in self.groups for v in torch.randperm(len(g), generator=self.generator)[: self.k]
        ]
        order = torch.randperm(len(picked), generator=self.generator)
        return iter([picked[int(o)] for o in order])


def _val_loss(net: nn.Module, ds: _Views, class_weights, cfg: Config) -> float:
    from liverlesion.lightning_modules import selection_loss  # local: heavy (lightning)

    net.eval()
    with torch.inference_mode():
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([ds[i][1] for i in range(len(ds))])
        b, v = xs.shape[:2]
        logits = net(xs.reshape(b * v, *xs.shape[2:])).reshape(b, v, -1).mean(1)
        return selection_loss(logits, y, class_weights, cfg)


def _fit_stage(
    net, params, lr, epochs, fit_ds, val_ds, cfg: Config, class_weights, fold_dir, name, progress, views=0
):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from torch.utils.data import DataLoader

    start = _val_loss(net, val_ds, class_weights, cfg)
    from liverlesion.lightning_modules import KeepBest, StageModule  # local: heavy (lightning)

    keep = KeepBest(net, start, copy.deepcopy(net.state_dict()))
    module = StageModule(net, params, lr, cfg, class_weights)
    g = torch.Generator().manual_seed(cfg.train.seed)
    bs = cfg.train.batch_size
    if views > 0:  # train.finetune_views: a random few of each sample's views per epoch
        sampler = _ViewsPerEpoch(fit_ds, views, g)
        train_dl = DataLoader(fit_ds, batch_size=bs, sampler=sampler, drop_last=len(sampler) > bs)
    else:
        train_dl = DataLoader(fit_ds, batch_size=bs, shuffle=True, drop_last=len(fit_ds) > bs, generator=g)
    val_dl = DataLoader(val_ds, batch_size=max(bs, 64), shuffle=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=cfg.train.deterministic,
        callbacks=[
            EarlyStopping(
                monitor="val_loss", patience=cfg.train.patience, min_delta=cfg.train.min_delta, mode="min"
            ),
            keep,
            *lightning_progress(progress),
        ],
        logger=[
            TensorBoardLogger(runs.logs_dir(fold_dir), name="", version=f"tensorboard_{name}"),
            CSVLogger(runs.logs_dir(fold_dir), name="", version=f"csv_{name}"),
        ],
        log_every_n_steps=1,
        enable_progress_bar=bool(lightning_progress(progress)),
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=fold_dir,
    )
    trainer.fit(module, train_dl, val_dl)
    net.load_state_dict(keep.state)
    return {
        "start_val_loss": start,
        "best_val_loss": keep.best,
        "improved": keep.improved,
        "epochs": int(trainer.current_epoch),
        "best_epochs": keep.best_epochs,
    }


def train_lpft(
    model,
    cache: ViewCache,
    fit_idx: np.ndarray,
    val_idx: np.ndarray,
    labels: np.ndarray,
    cfg: Config,
    class_weights,
    fold_dir,
    progress: bool = True,
) -> dict[str, Any]:
    """Stages 2 and 3 for one fold (``fit_idx`` / ``val_idx`` index the cache); trains ``model`` in place."""
    t = cfg.train

    def stage(net, source: list[np.ndarray], lr: float, epochs: int, name: str, views: int = 0):
        return _fit_stage(
            net,
            list(net.parameters()),
            lr,
            epochs,
            _Views([source[i] for i in fit_idx], labels[fit_idx], cache.n_tta, True),
            _Views([source[i] for i in val_idx], labels[val_idx], cache.n_tta, False),
            cfg,
            class_weights,
            fold_dir,
            name,
            progress,
            views=views,
        )

    probe = _Probe(model)
    info: dict[str, Any] = {"recipe": "lpft", "finetune_blocks": cache.n_top}
    info["probe"] = stage(probe, cache.pooled, t.probe_lr, t.probe_epochs, "probe")
    if cache.n_top > 0:
        upper = _Upper(model, cache.n_top)
        for p in upper.top.parameters():
            p.requires_grad_(True)
        with channels_last(upper):
            info["finetune"] = stage(
                upper, cache.lower, t.finetune_lr, t.epochs, "finetune", t.finetune_views
            )
    return info


def deep_logits_from_cache(model, cache: ViewCache, idx: np.ndarray) -> np.ndarray:
    """Network logits ``(len(idx), K)`` from the cached TTA views: the same numbers as a full forward."""
    samples = [cache.lower[i][: cache.n_tta].reshape(-1, *cache.lower[i].shape[2:]) for i in idx]
    model.eval()
    if cache.n_top > 0:
        upper = _Upper(model, cache.n_top).eval()
        with channels_last(upper):
            return lesion_logits(lambda h, _e: upper(h), samples, tta="none")
    pooled = [cache.pooled[i][: cache.n_tta].reshape(-1, cache.pooled[i].shape[-1]) for i in idx]
    return lesion_logits(lambda f, _e: model.head(f), pooled, tta="none")


def cross_fitted_probe_logits(
    head: nn.Module,
    cache: ViewCache,
    idx: np.ndarray,
    labels: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    cfg: Config,
    epochs: int,
) -> np.ndarray:
    """Out-of-fold probe logits ``(len(idx), K)`` over the training patients, on inner patient ``splits``.

    Each inner fold trains a fresh copy of ``head`` (the untrained paper head) on the frozen pooled
    features of the other patients' views, for the ``epochs`` the fold's own probe needed (chosen on
    its inner validation, so nothing here looks at the held-out patients), then scores the held-out
    lesions' TTA views. These logits let the fusion weight (``model.fusion_weight=auto``) be chosen
    on every training lesion instead of the few dozen inner-validation ones. A plain loop: the head is small.
    """
    import torch.nn.functional as F

    t = cfg.train
    idx = np.asarray(idx)
    y_all = np.asarray(labels)[idx]
    k = int(head(torch.zeros(1, cache.pooled[int(idx[0])].shape[-1])).shape[1])
    out = np.zeros((len(idx), k))
    if epochs < 1:
        return out  # the fold's probe never beat its untrained start: no signal to cross-fit
    g = torch.Generator().manual_seed(t.seed)
    for tr, te in splits:
        net = copy.deepcopy(head)
        x = torch.from_numpy(
            np.concatenate(
                [cache.pooled[int(i)].reshape(-1, cache.pooled[int(i)].shape[-1]) for i in idx[tr]]
            )
        ).float()
        y = torch.from_numpy(
            np.concatenate(
                [
                    np.full(cache.pooled[int(i)].shape[0] * cache.pooled[int(i)].shape[1], lab)
                    for i, lab in zip(idx[tr], y_all[tr], strict=True)
                ]
            )
        ).long()
        w = None
        if t.class_weighting == "loss":  # as the fold's probe: weighted cross-entropy
            counts = torch.bincount(y, minlength=k).float().clamp(min=1)
            w = counts.sum() / (k * counts)
        opt = torch.optim.AdamW(net.parameters(), lr=t.probe_lr, weight_decay=t.weight_decay, foreach=True)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g)
            for s in range(0, len(y), t.batch_size):
                b = order[s : s + t.batch_size]
                loss = F.cross_entropy(net(x[b]), y[b], weight=w, label_smoothing=t.label_smoothing)
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.inference_mode():
            for j in te:
                f = cache.pooled[int(idx[j])][: cache.n_tta]
                out[j] = net(torch.from_numpy(f.reshape(-1, f.shape[-1])).float()).double().mean(0).numpy()
    return out
