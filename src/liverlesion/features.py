"""Per-lesion feature vectors shared by the baselines and the fusion model.

* Radiomics-style features (:func:`radiomics_features`): first-order HU statistics, GLCM texture,
  2-D shape and margin of the patch (``baselines.lesion_features``) plus the lesion table's 3-D
  measurements. The radiomics baselines and ``model.fusion: radiomics`` use exactly these, computed
  from the same arrays: the patch cache's ``hu`` / ``mask`` in ``cv``, the freshly cut patch in
  ``predict`` and ``serve``.
* Frozen ImageNet features (:func:`frozen_features`): the backbone's globally pooled features of
  each lesion's patch, read by the ``frozen_lr`` baseline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# 3-D measurements from the lesion table used as features next to the patch features
TABLE_FEATURES = ("volume_ml", "max_axial_diameter_mm", "min_axis_mm", "hu_mean", "hu_std")


def measurement_features(measurements: Mapping[str, Any]) -> dict[str, float]:
    """The lesion table's 3-D measurements as features, plus the elongation ratio."""
    out = {}
    for c in TABLE_FEATURES:
        v = measurements.get(c, math.nan)
        try:
            out[c] = float(v)
        except (TypeError, ValueError):
            out[c] = math.nan
    d, m = out["max_axial_diameter_mm"], out["min_axis_mm"]
    # elongation: 1 for a sphere, small for a flat or elongated lesion
    out["shape3d_axis_ratio"] = m / d if d > 0 else math.nan
    return out


def radiomics_features(
    hu: np.ndarray,
    mask: np.ndarray,
    pixel_mm: float,
    window: tuple[float, float],
    measurements: Mapping[str, Any],
) -> dict[str, float]:
    """Radiomics-style features of one lesion: patch features + 3-D measurements."""
    from liverlesion.baselines import lesion_features

    return lesion_features(hu, mask, pixel_mm, window) | measurement_features(measurements)


def cache_radiomics(patch_dir: str | Path, index: pd.DataFrame, window: tuple[float, float]) -> pd.DataFrame:
    """:func:`radiomics_features` of every lesion of a patch cache (one row per lesion, ``lesion_id`` first)."""
    patch_dir = Path(patch_dir)
    rows = []
    for _, r in index.iterrows():
        with np.load(patch_dir / str(r["file"]), allow_pickle=False) as z:
            hu, mask = z["hu"], z["mask"]
            meta = json.loads(str(z["meta"]))
        rows.append(
            {"lesion_id": str(r["lesion_id"])}
            | radiomics_features(hu, mask, float(meta["pixel_mm"]), window, r.to_dict())
        )
    return pd.DataFrame(rows)


def frozen_features(model, arrays: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Pooled backbone features ``(n_lesions, D)`` of each lesion's patch (mean over its samples)."""
    import torch

    out = []
    model.eval()
    with torch.inference_mode():
        for a in arrays:
            feats = []
            x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            for s in range(0, len(x), batch_size):
                feats.append(model.features(x[s : s + batch_size]).double())
            out.append(torch.cat(feats).mean(0).numpy())
    return np.stack(out) if out else np.zeros((0, 0))


def frozen_table(lesion_ids: Sequence[str], feats: np.ndarray) -> pd.DataFrame:
    """``lesion_id`` + ``deep_<j>`` columns: the frozen features in the form the baselines read."""
    df = pd.DataFrame(feats, columns=[f"deep_{j}" for j in range(feats.shape[1])])
    df.insert(0, "lesion_id", [str(x) for x in lesion_ids])
    return df
