"""What the network is fed: a patch's image, plus its lesion mask as one more channel when it pools in the lesion.

``model.pool = lesion`` (see :mod:`liverlesion.model`) averages the feature map inside the lesion,
so the network needs the mask. It travels as ONE extra input channel appended after the image
channels (0 / 1, not normalised): every single-input path (test-time flips, training augmentation,
ONNX / TorchScript export, Grad-CAM, predict, serve, ensembles) then carries it with no change of
its own. :func:`model_input` is the one place that builds the input from a patch; cv, train,
the lpft cache, the :class:`~liverlesion.classifier.Classifier`, Grad-CAM and export all call it.
numpy only: the onnx backend runs without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from liverlesion.errors import UserError

__all__ = ["POOLS", "POOL_TEXT", "checkpoint_pool", "image_chans", "input_chans", "model_input", "takes_mask"]

POOLS = ("global", "lesion")  # model.pool: global average pooling (the paper) | mean inside the lesion mask


POOL_TEXT = {  # how the features are pooled, in words (cv's header, the report)
    "global": "globally averaged",
    "lesion": "averaged inside the lesion mask",
}


def takes_mask(pool: str) -> bool:
    """Whether a model pooling with ``pool`` takes the lesion mask as its last input channel (``lesion``)."""
    return pool != "global"


def input_chans(in_chans: int, pool: str) -> int:
    """Channels of the network's input: the image's, plus the mask channel for ``pool="lesion"``."""
    return int(in_chans) + (1 if takes_mask(pool) else 0)


def image_chans(x_chans: int, pool: str) -> int:
    """Image channels of a model input with ``x_chans`` channels (inverse of :func:`input_chans`)."""
    return int(x_chans) - (1 if takes_mask(pool) else 0)


def checkpoint_pool(ckpt: Mapping[str, Any]) -> str:
    """The pooling a checkpoint (or an export's metadata) was trained with; older ones pool globally."""
    pool = str(ckpt.get("pool") or "global")
    if pool not in POOLS:
        raise UserError(
            f"checkpoint pool={pool!r}: unknown pooling (this liverlesion knows {', '.join(POOLS)}); "
            "upgrade liverlesion or use the original model.pt"
        )
    return pool


def model_input(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    pool: str = "global",
    in_chans: int | None = None,
) -> np.ndarray:
    """The network input ``(S, C', H, W)`` float32 of one lesion's patch.

    Args:
        image: ``(S, C, H, W)`` (or one sample ``(C, H, W)``) windowed to ``[0, 1]``, as cut by
            :func:`liverlesion.patches.extract_patch`.
        mask: The patch's lesion mask ``(S, H, W)`` (or ``(H, W)``); needed for ``pool="lesion"``.
        pool: The model's ``pool``: ``global`` (image only) or ``lesion`` (mask appended as the
            last channel, 1 inside the lesion, 0 outside).
        in_chans: The model's image channels; a grey sample (2-D mode, ``C == 1``) is repeated to
            fill them. None: as given.

    Raises:
        UserError: The image or mask does not fit (shape), or ``pool="lesion"`` without a mask.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if in_chans is not None and x.ndim == 4 and x.shape[1] == 1 and in_chans > 1:
        x = np.repeat(x, in_chans, axis=1)  # 2-D mode: a grey slice fed as several channels
    if x.ndim != 4 or (in_chans is not None and x.shape[1] != in_chans):
        want = f"(S, {in_chans}, H, W)" if in_chans is not None else "(S, C, H, W)"
        raise UserError(
            f"patch of shape {tuple(np.shape(image))} does not fit the model: expected {want} "
            "as cut with the checkpoint's patch settings"
        )
    if pool not in POOLS:
        raise UserError(f"model.pool={pool!r}: unknown; choose one of {', '.join(POOLS)}")
    if not takes_mask(pool):
        return x
    if mask is None:
        raise UserError(
            f"this model pools its features inside the lesion (model.pool={pool}) and needs the patch's "
            "lesion mask; pass it (Classifier and predict cut it with the patch)"
        )
    m = np.asarray(mask)
    if m.ndim == 2:
        m = m[None]
    if m.shape != (x.shape[0], *x.shape[2:]):
        raise UserError(
            f"lesion mask of shape {tuple(np.shape(mask))} does not fit the patch of shape {tuple(x.shape)}: "
            f"expected {(x.shape[0], *x.shape[2:])}, the mask cut with the same patch"
        )
    m = (m > 0).astype(np.float32)[:, None]
    return np.ascontiguousarray(np.concatenate([x, m], axis=1))
