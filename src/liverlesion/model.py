"""The network (timm backbone + the paper's head), built fresh or rebuilt from a checkpoint.

``LesionNet`` takes patches windowed to ``[0, 1]`` with shape ``(N, C, H, W)`` and normalises them
inside the module with the backbone's pretrained mean / std (registered buffers, stored in the
state dict), so checkpoints and exported models take ``[0, 1]`` input. For ``inception_v3``
mean = std = 0.5, i.e. ``[-1, 1]`` like Google's TF Inception.

Head (Romero et al. 2019): global average pooling -> FC 512 -> ReLU -> Dropout 0.4 -> FC 512 ->
ReLU -> FC (classes); softmax is applied by the loss / at prediction.

``pool="lesion"`` (``model.pool``) replaces the global average by the mean inside the lesion: the
input then carries the lesion mask as one extra channel after the image channels
(:mod:`liverlesion.model_input`), which is split off before normalisation and never reaches the
backbone; the mask, area-downsampled to the feature map (the numbers of ``adaptive_avg_pool2d``,
written as two small matrix products so the graph exports to ONNX at any size), weights the mean.

``build_model`` initialises the backbone (ImageNet, random, or a weights file fitted by
:mod:`liverlesion.backbone_weights`); ``load_checkpoint`` rebuilds a
trained network from its ``model.pt``, whose file format :mod:`liverlesion.checkpoint` owns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from liverlesion.backbone_weights import init_from_file, load_backbone

# checkpoint.py owns the file; save_checkpoint and checkpoint_hash stay importable from here (documented)
from liverlesion.checkpoint import checkpoint_hash, read_checkpoint, save_checkpoint
from liverlesion.config import ModelConfig, config_from_dict
from liverlesion.errors import UserError
from liverlesion.forest import TreeEnsemble, vote_logits
from liverlesion.model_input import POOLS, checkpoint_pool, input_chans, takes_mask

__all__ = ["LesionNet", "build_model", "checkpoint_hash", "load_checkpoint", "save_checkpoint"]


class LesionNet(nn.Module):
    """timm backbone + global average pooling + the paper's head.

    Args:
        backbone: timm model name (optionally ``name.tag``).
        num_classes: Output classes.
        in_chans: Input channels (2.5-D: 2k+1 slices; 2-D: 1 or 3).
        head_hidden: Width of both hidden FC layers (paper: 512).
        dropout: Dropout after the first FC layer (paper: 0.4).
        mean: Per-channel input mean on the [0, 1] scale (default: the backbone's pretrained cfg).
        std: Per-channel input std.
        pool: ``global`` (the paper's global average) or ``lesion`` (mean inside the lesion mask,
            which the input carries as channel ``in_chans``; the network then takes ``in_chans + 1``).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        in_chans: int = 3,
        head_hidden: int = 512,
        dropout: float = 0.4,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        init_backbone: bool = True,
        fusion_features: Sequence[str] = (),
        features_from: str = "last",
        pool: str = "global",
    ):
        super().__init__()
        if pool not in POOLS:
            raise UserError(f"config model.pool={pool!r}: unknown; choose one of {', '.join(POOLS)}")
        self.pool = pool
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.backbone_patch: str | None = None  # e.g. weights.TF_POOLING_PATCH; saved in checkpoints
        self.backbone = _create_backbone(backbone, in_chans, init_backbone)
        self.features_from, self._cut, self.num_features = _feature_cut(self.backbone, features_from)
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        self.register_buffer("input_mean", _per_channel(mean or cfg.get("mean") or (0.5,) * 3, in_chans))
        self.register_buffer("input_std", _per_channel(std or cfg.get("std") or (0.5,) * 3, in_chans))
        self.head = nn.Sequential(
            nn.Linear(self.num_features, head_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, head_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(head_hidden, num_classes),
        )
        # Late fusion (model.fusion): logits = a * network + (1 - a) * handcrafted half, the half a
        # logistic regression on the features standardised with training-fold statistics, or (radiomics_vote)
        # its soft vote with a random forest (fusion_forest, set by fusion.fit_fusion); ``a`` is chosen
        # on the training patients (fusion.py).
        self.fusion_features = [str(f) for f in fusion_features]
        self.fusion_forest: TreeEnsemble | None = None
        if self.fusion_features:
            k = len(self.fusion_features)
            self.register_buffer("fusion_fill", torch.zeros(k))
            self.register_buffer("fusion_mean", torch.zeros(k))
            self.register_buffer("fusion_std", torch.ones(k))
            self.register_buffer("fusion_alpha", torch.ones(1))
            self.fusion_head = nn.Linear(k, num_classes)
            nn.init.zeros_(self.fusion_head.weight)
            nn.init.zeros_(self.fusion_head.bias)

    def set_input_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Set the per-channel mean / std applied to [0, 1] inputs."""
        self.input_mean.copy_(_per_channel(mean, self.in_chans))
        self.input_std.copy_(_per_channel(std, self.in_chans))

    def apply_backbone_patch(self, patch: str | None) -> None:
        """Apply a named backbone patch (see ``weights.apply_backbone_patch``) and remember it."""
        from liverlesion.tf_inception import apply_backbone_patch  # local: heavy (timm)

        apply_backbone_patch(self.backbone, patch)
        if patch:
            self.backbone_patch = patch

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters that take part in :meth:`forward` (none above ``features_from``)."""
        if self._cut is None:
            return list(self.backbone.parameters())
        return [p for _, m in self.blocks() for p in m.parameters()]

    @property
    def input_chans(self) -> int:
        """Channels the network takes: the image's, plus the lesion-mask channel for ``pool="lesion"``."""
        return input_chans(self.in_chans, self.pool)

    def split_input(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(image, mask)`` of an input: the first ``in_chans`` channels and (``pool="lesion"``) the mask."""
        if not takes_mask(self.pool):
            return x, None
        if x.shape[1] != self.in_chans + 1:
            raise UserError(
                f"input of {x.shape[1]} channels: this model pools inside the lesion and takes "
                f"{self.in_chans} image channels + 1 lesion-mask channel (see liverlesion.model_input)"
            )
        return x[:, : self.in_chans], x[:, self.in_chans :]

    def feature_map(self, x: Tensor) -> Tensor:
        """Backbone feature map for ``[0, 1]`` input (NCHW for CNNs), at ``features_from``'s block.

        Only the image channels reach the backbone (a lesion-mask channel is dropped here).
        """
        h = (x[:, : self.in_chans] - self.input_mean) / self.input_std
        if self._cut is None:
            return self.backbone.forward_features(h)
        kids = self.blocks()
        if not kids:
            raise UserError(
                f"model.features_from={self.features_from}: {self.backbone_name}'s blocks do not run as a "
                "plain sequence, so its features cannot be read at an inner block; set model.features_from=last"
            )
        for _, m in kids:
            h = m(h)
        return h

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``(N, num_features)``: global, or inside the lesion (``pool``)."""
        _, mask = self.split_input(x)
        return self._pool(self.feature_map(x), mask)

    def _pool(self, f: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            return lesion_pool(self._nchw(f), mask)
        if f.ndim == 4:
            return self._nchw(f).mean(dim=(2, 3))
        if f.ndim == 3:  # transformer tokens (N, L, C)
            return f.mean(dim=1)
        return f

    def _nchw(self, f: Tensor) -> Tensor:
        if f.ndim != 4:
            raise UserError(
                f"model.pool={self.pool}: {self.backbone_name}'s features have no spatial map to weight by the "
                "lesion mask; use a CNN backbone or model.pool=global"
            )
        # timm CNNs are NCHW; a few (e.g. Swin) return NHWC
        if f.shape[1] != self.num_features and f.shape[-1] == self.num_features:
            return f.permute(0, 3, 1, 2)
        return f

    def forward(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        """Logits ``(N, num_classes)`` for patches ``(N, in_chans, H, W)`` in ``[0, 1]``.

        ``pool="lesion"``: ``(N, in_chans + 1, H, W)``, the lesion mask last (``model_input``).
        A fusion model also needs ``extra``: its ``fusion_features`` per sample ``(N, F)`` (NaN = missing).
        """
        return self.fuse(self.network_logits(x), extra)

    def network_logits(self, x: Tensor) -> Tensor:
        """The network half's logits (backbone -> pooling -> the paper's head), before any fusion:
        what end-to-end training optimises and Grad-CAM explains."""
        return self.head(self.features(x))

    def fuse(self, deep_logits: Tensor, extra: Tensor | None) -> Tensor:
        """Combine the network's logits with the fusion branch (identity for a plain network)."""
        if not self.fusion_features:
            return deep_logits
        if extra is None:
            raise UserError(
                f"this model fuses the network with {len(self.fusion_features)} radiomics-style features; "
                "pass them (Classifier and predict compute them from the lesion mask)"
            )
        a = self.fusion_alpha
        return a * deep_logits + (1 - a) * self.handcrafted_logits(extra)

    def handcrafted_logits(self, extra: Tensor) -> Tensor:
        """The fusion's handcrafted half: its logistic regression, voting with its forest where it has one."""
        e = torch.where(torch.isnan(extra), self.fusion_fill.to(extra.dtype), extra)
        lr = self.fusion_head((e - self.fusion_mean) / self.fusion_std)
        return vote_logits(lr, None if self.fusion_forest is None else self.fusion_forest(e))

    # ------------------------------------------------------------------ staged (cached) forward
    _NOT_FEATURES = ("global_pool", "head_drop", "fc", "head", "classifier", "fc_norm", "pre_logits")

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The backbone's top-level blocks in forward order up to ``features_from``'s block.

        [] when they are not a plain sequence (the network then runs timm's ``forward_features``).
        """
        kids = [(n, m) for n, m in self.backbone.named_children() if n not in self._NOT_FEATURES]
        if getattr(self, "_blocks_ok", None) is None:
            was = self.training
            self.eval()
            try:
                with torch.no_grad():
                    x = torch.rand(1, self.in_chans, 160, 160, device=self.input_mean.device)
                    h = (x - self.input_mean) / self.input_std
                    ref = self.backbone.forward_features(h)
                    for _, m in kids:
                        h = m(h)
                self._blocks_ok = tuple(h.shape) == tuple(ref.shape) and bool(
                    torch.allclose(h, ref, atol=1e-5)
                )
            except Exception:
                self._blocks_ok = False
            finally:
                self.train(was)
        if not self._blocks_ok:
            return []
        return kids[: self._cut] if self._cut is not None else kids

    def forward_lower(self, x: Tensor, n_top: int) -> Tensor:
        """Activations below the last ``n_top`` blocks for ``[0, 1]`` input (cached during lpft).

        With ``pool="lesion"`` one more channel follows the activations: the pooling weights (the
        mask area-downsampled to the final feature map), zero-padded into its top-left corner, so
        :meth:`forward_upper` pools each cached view with its own mask.
        """
        _, mask = self.split_input(x)
        h = (x[:, : self.in_chans] - self.input_mean) / self.input_std
        kids = self.blocks()
        for _, m in kids[: len(kids) - n_top]:
            h = m(h)
        if mask is None:
            return h
        size = self._final_size(h, n_top)
        if size[0] > h.shape[2] or size[1] > h.shape[3]:
            raise UserError(
                f"model.pool={self.pool}: {self.backbone_name}'s top blocks enlarge the feature map; "
                "use model.pool=global or train.finetune_blocks=0"
            )
        w = area_downsample(mask, size)
        return torch.cat([h, nn.functional.pad(w, (0, h.shape[3] - size[1], 0, h.shape[2] - size[0]))], 1)

    def forward_upper(self, h: Tensor, n_top: int, extra: Tensor | None = None) -> Tensor:
        """Logits from :meth:`forward_lower`'s activations: the same numbers as :meth:`forward`."""
        kids = self.blocks()
        return self.fuse(
            self.head(self.pool_upper(h, nn.Sequential(*[m for _, m in kids[len(kids) - n_top :]]))), extra
        )

    def pool_upper(self, h: Tensor, top: nn.Module) -> Tensor:
        """Pooled features of :meth:`forward_lower`'s activations ``h`` after the top blocks ``top``."""
        return self._pool(*self.upper_map(h, top))

    def upper_map(self, h: Tensor, top: nn.Module) -> tuple[Tensor, Tensor | None]:
        """The feature map of cached activations ``h`` after ``top``, and its pooling weights (or None)."""
        mask = takes_mask(self.pool)
        x = h[:, :-1] if mask else h
        if x.ndim == 4:  # the first layers of a block (Inception: four 1x1-conv branches) then do not
            x = x.contiguous(memory_format=torch.channels_last)  # each convert it: 1.5x validation on CPU
        if not mask:
            return top(x), None
        f = self._nchw(top(x))
        return f, h[:, -1:, : f.shape[2], : f.shape[3]]

    def _final_size(self, h: Tensor, n_top: int) -> tuple[int, int]:
        """Spatial size of the feature map the top ``n_top`` blocks make from lower activations ``h``."""
        key = (n_top, *h.shape[1:])
        sizes = self.__dict__.setdefault("_final_sizes", {})
        if key not in sizes:
            kids = self.blocks()
            was = self.training
            self.eval()
            try:
                with torch.no_grad():
                    f = h[:1].detach()
                    for _, m in kids[len(kids) - n_top :]:
                        f = m(f)
            finally:
                self.train(was)
            f = self._nchw(f)
            sizes[key] = (int(f.shape[2]), int(f.shape[3]))
        return sizes[key]

    def cam_target_layers(self, size: Sequence[int] | None = None, min_side: int = 5) -> list[nn.Module]:
        """The deepest backbone block whose map is at least ``min_side`` pixels wide, for Grad-CAM.

        At small inputs the last stage is too coarse (Inception-v3 at 160 px: 3x3 after Mixed_7c), so
        an earlier block is taken (Mixed_6e, 8x8). Returns [] when no block qualifies.
        """
        h, w = (int(size[0]), int(size[1])) if size is not None else (299, 299)
        kids = self.blocks() or list(self.backbone.named_children())
        seen: list[tuple[nn.Module, tuple[int, ...]]] = []
        hooks = [
            m.register_forward_hook(
                lambda mod, _i, out: seen.append((mod, tuple(out.shape)))
                if torch.is_tensor(out) and out.ndim == 4
                else None
            )
            for _, m in kids
        ]
        was_training = self.training
        try:
            self.eval()
            with torch.no_grad():
                self.feature_map(torch.zeros(1, self.in_chans, h, w, device=self.input_mean.device))
        finally:
            for hk in hooks:
                hk.remove()
            self.train(was_training)
        ok = [m for m, shp in seen if min(shp[2], shp[3]) >= min_side and shp[1] > 3]
        return ok[-1:] if ok else []

    def _last_4d_child(self) -> nn.Module:
        seen: list[nn.Module] = []
        hooks = [
            m.register_forward_hook(
                lambda mod, _i, out: seen.append(mod) if torch.is_tensor(out) and out.ndim == 4 else None
            )
            for _, m in self.backbone.named_children()
        ]
        was_training = self.training
        try:
            self.eval()
            with torch.no_grad():
                self.feature_map(torch.zeros(1, self.in_chans, 96, 96, device=self.input_mean.device))
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)
        if not seen:
            raise UserError(f"backbone {self.backbone_name}: no layer with a 4-D output for Grad-CAM")
        return seen[-1]


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference copy of ``module`` with each timm ``ConvNormAct``'s BatchNorm folded into its conv.

    The copy computes the same numbers to float rounding with one pass less over every activation:
    the frozen lower Inception-v3 of the lpft cache pass ran about 1.2x as fast on 2 CPU cores.
    Eval only (the folded statistics are fixed); ``module`` is not changed, and layers of other
    shapes are copied as they are.
    """
    import copy

    from timm.layers import BatchNormAct2d, ConvNormAct
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(module).eval()
    for m in out.modules():
        bn = getattr(m, "bn", None)
        if isinstance(m, ConvNormAct) and type(bn) is BatchNormAct2d and bn.running_mean is not None:
            m.conv = fuse_conv_bn_eval(m.conv, bn)  # ConvNormAct: conv -> bn (+ drop, act) -> aa
            m.bn = nn.Sequential(bn.drop, bn.act)
    return out


def _create_backbone(name: str, in_chans: int, init: bool) -> nn.Module:
    """``timm.create_model`` without classifier or pooling.

    With ``init=False`` (weights are loaded right after) the random initialisation is skipped by
    building on the meta device: seconds faster for inception_v3 on a CPU. Models with
    non-persistent buffers (which a state dict would not fill) are built normally.
    """
    import timm

    kwargs = {"pretrained": False, "num_classes": 0, "global_pool": "", "in_chans": in_chans}
    if not init:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, **kwargs)
        except Exception:  # some model's init code needs real tensors
            model = None
        if model is not None:
            stored = set(model.state_dict())
            named = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
            if all(n in stored for n in named):
                return model.to_empty(device="cpu")
    return timm.create_model(name, **kwargs)


def _feature_cut(backbone: nn.Module, features_from: str) -> tuple[str, int | None, int]:
    """Where the network reads its features: ``(setting, blocks kept or None for all, channels)``.

    ``last`` is timm's ``forward_features`` (the paper: Inception-v3's 2048 channels after Mixed_7c).
    ``mid`` is the second-to-last stage of timm's ``feature_info`` (Inception-v3: Mixed_6e, 768
    channels; ResNets: layer3): mid-level ImageNet features describe texture, which is what tells
    lesions apart, better than the object-level last stage (frozen-feature ROC AUC in README).
    Backbones whose stages are not top-level blocks (EfficientNet) read their last stage. A stage
    name from ``feature_info`` also works. Blocks above the cut are frozen and never run. The
    returned setting is the resolved stage name (or ``last``), as stored in checkpoints.
    """
    choice = str(features_from or "last").strip()
    if choice == "last":
        return "last", None, int(backbone.num_features)
    info = [dict(i) for i in (getattr(backbone, "feature_info", None) or [])]
    stages = [i for i in info if "." not in str(i.get("module", "")) and i.get("num_chs")]
    if choice == "mid":
        if len(stages) < 2:  # stages are not top-level blocks (e.g. EfficientNet): the last stage
            return "last", None, int(backbone.num_features)
        pick = stages[-2]
    else:
        found = [i for i in stages if i["module"] == choice]
        if not found:
            names = ", ".join(str(i["module"]) for i in stages) or "none"
            raise UserError(
                f"model.features_from={choice}: not a stage of this backbone; use last, mid or one of: {names}"
            )
        pick = found[0]
    kids = [n for n, _ in backbone.named_children() if n not in LesionNet._NOT_FEATURES]
    choice = str(pick["module"])
    cut = kids.index(choice) + 1
    if cut == len(kids):
        return "last", None, int(backbone.num_features)
    for n, m in backbone.named_children():
        if n in kids[cut:]:
            m.requires_grad_(False)  # never run: no gradient, nothing for DDP to wait for
    return choice, cut, int(pick["num_chs"])


def _per_channel(values: tuple[float, ...] | list[float], in_chans: int) -> Tensor:
    v = [float(x) for x in values]
    if len(v) != in_chans:
        # slices / grey channels are not RGB: use the average statistic on every channel
        v = [sum(v) / len(v)] * in_chans
    return torch.tensor(v, dtype=torch.float32).view(1, in_chans, 1, 1)


def area_downsample(mask: Tensor, size: Sequence[int]) -> Tensor:
    """``adaptive_avg_pool2d(mask, size)`` as two matrix products (ONNX exports it at any size).

    torch's ONNX exporter refuses adaptive average pooling when the input size is not a multiple of
    the output size (160 px -> 3x3 at Mixed_7c); the matrices hold the same bins: output cell ``i``
    averages input rows ``floor(i H / h)`` to ``ceil((i + 1) H / h)``.
    """
    h, w = int(size[0]), int(size[1])
    rows = _bins(int(mask.shape[-2]), h).to(mask)
    cols = _bins(int(mask.shape[-1]), w).to(mask)
    return rows @ mask @ cols.T


def _bins(n_in: int, n_out: int) -> Tensor:
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


POOL_EMPTY = 1e-6  # pooling weights summing to less: no lesion in the view, the global mean is used


def lesion_pool(f: Tensor, mask: Tensor) -> Tensor:
    """Mean of the feature map ``f`` ``(N, C, h, w)`` weighted by ``mask`` ``(N, 1, H, W)`` in [0, 1].

    The mask is area-downsampled to ``h x w`` (:func:`area_downsample`); a sample whose weights sum
    to ~0 (no lesion in view) gets the global mean instead.
    """
    w = area_downsample(mask.to(f.dtype), f.shape[-2:])
    total = w.sum(dim=(2, 3))
    inside = (f * w).sum(dim=(2, 3)) / total.clamp_min(POOL_EMPTY)
    return torch.where(total > POOL_EMPTY, inside, f.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- building


def check_model_config(cfg: ModelConfig, in_chans: int = 3) -> None:
    """The settings that decide the network's shape (backbone, ``features_from``), checked before any work.

    ``build_model`` checks the same when it runs; this builds the bare backbone without initialising
    it (no weights are read), so a misspelt backbone or stage fails in one line before a run folder,
    patches or features exist.
    """
    from liverlesion.weights import check_backbone_name  # local: heavy (timm)

    check_backbone_name(cfg.backbone)
    _feature_cut(_create_backbone(cfg.backbone, in_chans, init=False), cfg.features_from)


def check_input_size(model: LesionNet, size_px: int) -> None:
    """Refuse a ``patch.size_px`` too small for the network's strides, before any work.

    A blank patch of that size is run up to the block the head reads (as every patch will be); when
    it does not fit, the smallest size that does is found the same way and named, instead of a torch
    error in the first fold.
    """
    was = model.training
    model.eval()

    def fits(size: int) -> bool:
        try:
            with torch.no_grad():
                model.feature_map(torch.zeros(1, model.in_chans, size, size, device=model.input_mean.device))
        except RuntimeError:
            return False
        return True

    try:
        if fits(int(size_px)):
            return
        low, high = int(size_px), max(2 * int(size_px), 32)  # bracket the smallest size that fits, then halve
        while not fits(high):
            if high >= 1024:
                raise UserError(
                    f"model.backbone={model.backbone_name}: does not run on a square patch of up to 1024 px; "
                    "choose another backbone"
                )
            low, high = high, min(2 * high, 1024)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(mid) else (mid, high)
    finally:
        model.train(was)
    raise UserError(
        f"patch.size_px={size_px}: too small for {model.backbone_name} (features read at {model.features_from}), "
        f"whose strides need at least {high} px; set patch.size_px={high} or more (quick preset: 160, paper: 299)"
    )


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    in_chans: int = 3,
    weights: str | None = None,
    imagenet: Any = None,
    fusion_features: Sequence[str] = (),
) -> tuple[LesionNet, str]:
    """Build ``LesionNet`` and initialise its backbone.

    Args:
        cfg: Model settings (backbone, head width, dropout, weights).
        num_classes: Number of output classes (>= 2).
        in_chans: Input channels.
        weights: Overrides ``cfg.weights``: ``imagenet`` | ``none`` | PATH to a liverlesion checkpoint
            (its backbone is used) or a plain / timm state-dict file (``.pth``, ``.pt``, ``.safetensors``).

    Returns:
        The model and a human description of the initialisation used.
    """
    from liverlesion.weights import check_backbone_name  # local: heavy (timm)

    choice = str(weights if weights is not None else cfg.weights).strip()
    if num_classes < 2:
        raise UserError(f"number of classes is {num_classes}; need at least 2 lesion classes in the manifest")
    if in_chans < 1:
        raise UserError(f"in_chans={in_chans}: need at least one input channel")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"config model.dropout={cfg.dropout}: must be in [0, 1)")
    if cfg.head_hidden < 1:
        raise UserError(f"config model.head_hidden={cfg.head_hidden}: must be a positive integer")
    check_backbone_name(cfg.backbone)
    kind = choice.lower()
    args = (cfg.backbone, num_classes, in_chans, cfg.head_hidden, cfg.dropout)
    kw = {"fusion_features": fusion_features, "features_from": cfg.features_from, "pool": cfg.pool}
    if kind == "imagenet":
        from liverlesion.weights import resolve_imagenet_weights  # local: heavy (timm)

        # ``imagenet``: weights already resolved by the caller (one look-up for all CV folds)
        w = imagenet if imagenet is not None else resolve_imagenet_weights(cfg.backbone)
        model = LesionNet(*args, mean=w.mean, std=w.std, init_backbone=False, **kw)
        load_backbone(model, w.state_dict, source=w.source, src_chans=3)
        model.apply_backbone_patch(w.backbone_patch)
        return model, w.source
    if kind in ("none", "random", ""):
        return LesionNet(*args, **kw), "random init"
    path = Path(choice).expanduser()
    # every backbone tensor is loaded from the file (or we fail), so skip the random init
    model = LesionNet(*args, init_backbone=not path.is_file(), **kw)
    return model, init_from_file(model, path)


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[LesionNet, dict]:
    """Rebuild the model from a checkpoint alone (no download) and load its weights.

    Returns:
        The model in eval mode, and the checkpoint dict without ``state_dict``.

    Raises:
        UserError: missing / corrupt / foreign file, unsupported format version, or weights that do
            not fit the stored config.
    """
    path = Path(path).expanduser()
    obj = read_checkpoint(path)
    try:
        from liverlesion.weights import check_backbone_name  # local: heavy (timm)

        mc = config_from_dict(obj["config"]).model
        check_backbone_name(mc.backbone)
        # no download and no random init: every tensor comes from the state dict (checked below)
        model = LesionNet(
            mc.backbone,
            len(obj["class_names"]),
            int(obj["in_chans"]),
            mc.head_hidden,
            mc.dropout,
            init_backbone=False,
            fusion_features=[str(f) for f in obj.get("fusion_features") or []],
            # checkpoints from before the setting read the last stage
            features_from=str(obj.get("features_from") or "last"),
            # checkpoints from before the setting pool globally
            pool=checkpoint_pool(obj),
        )
        model.apply_backbone_patch(obj.get("backbone_patch"))
        forest = TreeEnsemble.size_in(obj["state_dict"], "fusion_forest.")
        if forest is not None and model.fusion_features:
            model.fusion_forest = TreeEnsemble(*forest)  # its tensors come with the state dict below
    except UserError as e:
        raise UserError(f"checkpoint {path}: {e}") from e
    wrong = _shape_mismatch(model, obj["state_dict"])
    own = model.state_dict()
    result = model.load_state_dict(
        {
            k: v
            for k, v in obj["state_dict"].items()
            if not (k in own and (not torch.is_tensor(v) or tuple(v.shape) != tuple(own[k].shape)))
        },
        strict=False,
    )
    if result.missing_keys or result.unexpected_keys or wrong:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[0]})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[0]})")
        parts.extend(wrong[:1])
        raise UserError(
            f"checkpoint {path}: weights do not match the stored config ({'; '.join(parts)}); "
            f"the file is damaged or was edited, use the original model.pt"
        )
    damage = (
        model.fusion_forest.damage(len(model.fusion_features)) if model.fusion_forest is not None else None
    )
    if damage:
        raise UserError(
            f"checkpoint {path}: {damage}; the file is damaged or was edited, use the original model.pt"
        )
    model.to(map_location).eval()
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model, meta


def _shape_mismatch(model: nn.Module, sd: dict[str, Tensor]) -> list[str]:
    own = model.state_dict()
    return [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and torch.is_tensor(v) and tuple(v.shape) != tuple(own[k].shape)
    ]
