"""Fitting foreign weights into a ``LesionNet`` backbone (``--weights`` PATH / ImageNet).

A liverlesion checkpoint gives its backbone; a plain or timm state dict (``.pth``, ``.pt``,
``.safetensors``) is unwrapped (``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model``),
its wrapper prefixes stripped (timm's ``clean_state_dict``, then Lightning / LesionNet ones), its
pretrained classifier dropped and its first convolution adapted to the model's input channels with
timm's ``adapt_input_conv``. Anything that does not fit is one ``UserError`` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from liverlesion.checkpoint import CHECKPOINT_FORMAT, safe_torch_load
from liverlesion.errors import UserError

if TYPE_CHECKING:
    from liverlesion.model import LesionNet

__all__ = ["init_from_file", "load_backbone"]


def _adapt_first_conv(model: LesionNet, sd: dict[str, Tensor], src_chans: int) -> dict[str, Tensor]:
    """Adapt the first conv weights to ``model.in_chans`` with timm's ``adapt_input_conv``."""
    from timm.models import adapt_input_conv

    if src_chans == model.in_chans:
        return sd
    first = (getattr(model.backbone, "pretrained_cfg", None) or {}).get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    sd = dict(sd)
    for name in names:
        key = f"{name}.weight"
        if key in sd and sd[key].ndim == 4 and sd[key].shape[1] == src_chans:
            sd[key] = adapt_input_conv(model.in_chans, sd[key], base_chans=src_chans)
    return sd


def load_backbone(model: LesionNet, sd: dict[str, Tensor], source: str, src_chans: int) -> None:
    """Load a backbone state dict (pretrained classifier dropped, first conv adapted to the model's channels).

    Raises:
        UserError: The weights do not fit the backbone (missing, unexpected or other-shaped tensors).
    """
    sd = _adapt_first_conv(model, sd, src_chans)
    own = model.backbone.state_dict()
    classifier = (getattr(model.backbone, "pretrained_cfg", None) or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    # a pretrained classifier (fc, head, ...) is not part of a num_classes=0 backbone
    unexpected = [k for k in sd if k not in own and not any(k.startswith(c + ".") for c in classifier)]
    missing = [k for k in own if k not in sd]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with other shapes (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise UserError(
            f"--weights {source}: does not fit backbone {model.backbone_name} ({'; '.join(parts)}); "
            f"give weights made for {model.backbone_name} or change model.backbone"
        )
    model.backbone.load_state_dict({k: sd[k] for k in own}, strict=True)


_STRIP_PREFIXES = ("model.", "net.", "backbone.", "encoder.")  # past timm.clean_state_dict's


def init_from_file(model: LesionNet, path: Path) -> str:
    """Initialise the backbone from a liverlesion checkpoint or a plain / timm state dict."""
    if not path.exists():
        raise UserError(
            f"--weights {path}: file not found; give imagenet, none, or the path of a checkpoint / state_dict"
        )
    if path.is_dir():
        raise UserError(
            f"--weights {path}: is a folder; give a model.pt / .pth / .safetensors file inside it"
        )
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            obj: Any = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:
            raise UserError(
                f"--weights {path}: not a readable safetensors file ({type(e).__name__}); re-download it"
            ) from e
    else:
        obj = safe_torch_load(path, "--weights")
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        sd = {k[len("backbone.") :]: v for k, v in obj["state_dict"].items() if k.startswith("backbone.")}
        stored = obj.get("config", {}).get("model", {}).get("backbone")
        if stored and stored.split(".")[0] != model.backbone_name.split(".")[0]:
            raise UserError(
                f"--weights {path}: checkpoint backbone is {stored}, config wants {model.backbone_name}; "
                f"set --backbone {stored} or use other weights"
            )
        load_backbone(model, sd, source=str(path), src_chans=int(obj.get("in_chans", 3)))
        model.apply_backbone_patch(obj.get("backbone_patch"))
        if int(obj.get("in_chans", 3)) == model.in_chans:
            sdict = obj["state_dict"]
            if "input_mean" in sdict and "input_std" in sdict:
                model.input_mean.copy_(sdict["input_mean"])
                model.input_std.copy_(sdict["input_std"])
        return f"checkpoint {path} (backbone of liverlesion checkpoint)"
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(
            f"--weights {path}: not a state_dict (expected a mapping of parameter names to tensors); "
            f"save one with torch.save(model.state_dict(), PATH)"
        )
    from timm.models import clean_state_dict

    own = set(model.backbone.state_dict())
    sd = clean_state_dict(dict(obj))  # timm strips the DataParallel / DDP / torch.compile wrappers
    # then other wrapper prefixes (Lightning, our own LesionNet, ...) while that finds more keys
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            stripped = {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}
            if stripped and len(own & set(stripped)) > len(own & set(sd)):
                sd, changed = stripped, True
    src_chans = _first_conv_chans(model, sd)
    load_backbone(model, sd, source=str(path), src_chans=src_chans)
    return f"checkpoint {path}"


def _first_conv_chans(model: LesionNet, sd: dict[str, Tensor]) -> int:
    first = (getattr(model.backbone, "pretrained_cfg", None) or {}).get("first_conv")
    name = first if isinstance(first, str) else (first[0] if first else None)
    w = sd.get(f"{name}.weight") if name else None
    return int(w.shape[1]) if w is not None and w.ndim == 4 else model.in_chans
