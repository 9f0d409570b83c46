"""Torch datasets over the patch cache, and training-time augmentation.

Patches are small (a few KB per lesion), so a fold's patches are held in memory.
Augmentation (flips, small rotations, scale, intensity jitter) is applied to
training samples only, on the windowed [0, 1] scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from liverlesion.model_input import model_input, takes_mask
from liverlesion.patch_cache import load_patch


def load_patch_arrays(patch_dir: str | Path, index: pd.DataFrame, pool: str = "global") -> list[np.ndarray]:
    """Each lesion's network input ``(S, C, H, W)`` from the patch cache (:func:`~liverlesion.model_input.model_input`).

    ``pool="lesion"``: the image channels and then the lesion mask's channel.
    """
    names = ("image", "mask") if takes_mask(pool) else ("image",)
    out = []
    for f in index["file"]:
        p = load_patch(patch_dir, str(f), arrays=names)
        out.append(model_input(p["image"], p.get("mask"), pool))
    return out


class Augment:
    """Random flips, rotation, zoom and intensity jitter on a ``(C, H, W)`` tensor in [0, 1].

    Built on torchvision's v2 transforms; the intensity jitter is ours because it
    acts on windowed CT values (a small contrast/brightness change mimics scanner
    and contrast-phase variation), not on RGB colour. The last ``n_mask`` channels
    are masks (``model.pool=lesion``): they move with the image (bilinear, kept as
    soft weights in [0, 1]) but are never jittered.
    """

    def __init__(self, flip: bool, rotate_deg: float, scale: float, intensity: float, n_mask: int = 0):
        from torchvision.transforms import v2

        ops: list = []
        if flip:
            ops += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if rotate_deg > 0 or scale > 0:
            ops.append(
                v2.RandomAffine(
                    degrees=rotate_deg,
                    scale=(1 - scale, 1 + scale) if scale > 0 else None,
                    interpolation=v2.InterpolationMode.BILINEAR,
                )
            )
        self.spatial = v2.Compose(ops) if ops else None
        self.intensity = intensity
        self.n_mask = int(n_mask)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial is not None:
            x = self.spatial(x)
        if self.intensity > 0:
            gain = 1.0 + (torch.rand(1).item() * 2 - 1) * self.intensity * 2
            bias = (torch.rand(1).item() * 2 - 1) * self.intensity
            n = x.shape[0] - self.n_mask
            x = torch.cat([(x[:n] - 0.5) * gain + 0.5 + bias, x[n:]])
        return x.clamp_(0.0, 1.0)


class PatchDataset(Dataset):
    """One item per patch sample: ``(image (C,H,W), class index, lesion row index)``.

    In 2.5-D mode each lesion gives one sample; in 2-D mode it gives one per slice,
    and predictions are averaged back to the lesion (see ``train.predict_lesions``).
    """

    def __init__(
        self,
        arrays: list[np.ndarray],
        labels: np.ndarray,
        augment: Augment | None = None,
    ):
        self.items: list[tuple[int, int]] = [(i, s) for i, a in enumerate(arrays) for s in range(a.shape[0])]
        self.arrays = arrays
        self.labels = np.asarray(labels, dtype=np.int64)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int):
        i, s = self.items[idx]
        x = torch.from_numpy(np.ascontiguousarray(self.arrays[i][s]))
        if self.augment is not None:
            x = self.augment(x)
        return x, int(self.labels[i]), i

    def sample_labels(self) -> np.ndarray:
        return np.array([self.labels[i] for i, _ in self.items])
