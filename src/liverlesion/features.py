"""Per-lesion feature vectors shared by the baselines and the fusion model.

* Radiomics-style features (:func:`radiomics_features`): first-order HU statistics, GLCM texture,
  2-D shape and margin of the patch (:func:`lesion_features`) plus the lesion table's 3-D
  measurements. The radiomics baselines and ``model.fusion`` use exactly these, computed
  from the same arrays: the patch cache's ``hu`` / ``mask`` in ``cv``, the freshly cut patch in
  ``predict`` and ``serve``. :func:`extract_features` computes them for a whole patch cache
  (scikit-image by default; ``extractor="pyradiomics"`` uses PyRadiomics where it is installed:
  it does not build on Python 3.11 from PyPI today).
* Frozen ImageNet features (:func:`frozen_features`): the backbone's globally pooled features of
  each lesion's patch, read by the ``frozen_lr`` baseline.

The patch cache is read through :mod:`liverlesion.patch_cache` (its only reader).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion.errors import UserError
from liverlesion.patch_cache import load_patch, load_patch_index, load_patch_settings, resolve_patch_dir
from liverlesion.progress import progress_bar

__all__ = [
    "EXTRACTORS",
    "TABLE_FEATURES",
    "cache_radiomics",
    "extract_features",
    "frozen_features",
    "frozen_table",
    "lesion_features",
    "measurement_features",
    "radiomics_features",
]

# 3-D measurements from the lesion table used as features next to the patch features
TABLE_FEATURES = ("volume_ml", "max_axial_diameter_mm", "min_axis_mm", "hu_mean", "hu_std")
EXTRACTORS = ("skimage", "pyradiomics")
GLCM_LEVELS = 32  # grey levels of the quantised liver window
GLCM_DISTANCES_MM = (1.0, 2.0, 3.0)  # in mm, so patches resampled to different pixel sizes compare
HIST_BIN_HU = 25.0  # histogram bin width for entropy/uniformity (PyRadiomics' default binWidth)
DEFAULT_WINDOW = (60.0, 250.0)  # liver window (centre, width) when the cache has no settings.json


# --------------------------------------------------------------------------- patch features
def _first_order(values: np.ndarray) -> dict[str, float]:
    from scipy import stats

    v = values.astype(np.float64)
    p10, p25, p50, p75, p90 = np.percentile(v, [10, 25, 50, 75, 90])
    edges = np.arange(np.floor(v.min() / HIST_BIN_HU), np.floor(v.max() / HIST_BIN_HU) + 2) * HIST_BIN_HU
    hist = np.histogram(v, bins=edges)[0].astype(float)
    p = hist[hist > 0] / hist.sum()
    several = v.size > 2 and np.ptp(v) > 0
    return {
        "fo_mean": float(v.mean()),
        "fo_std": float(v.std()),
        "fo_min": float(v.min()),
        "fo_max": float(v.max()),
        "fo_p10": float(p10),
        "fo_p25": float(p25),
        "fo_median": float(p50),
        "fo_p75": float(p75),
        "fo_p90": float(p90),
        "fo_iqr": float(p75 - p25),
        "fo_mad": float(np.mean(np.abs(v - v.mean()))),
        "fo_skewness": float(stats.skew(v)) if several else 0.0,
        "fo_kurtosis": float(stats.kurtosis(v, fisher=False)) if several else 0.0,
        "fo_entropy": float(-(p * np.log2(p)).sum()),
        "fo_uniformity": float((p**2).sum()),
    }


def _glcm(hu: np.ndarray, mask: np.ndarray, pixel_mm: float, window: tuple[float, float]) -> dict[str, float]:
    """GLCM texture of the lesion on one slice, grey levels from the liver window, lesion pixels only."""
    from skimage.feature import graycomatrix, graycoprops

    centre, width = window
    q = np.clip((hu - (centre - width / 2)) / width, 0, 1) * (GLCM_LEVELS - 1)
    q = np.rint(q).astype(np.uint8) + 1
    q[~mask] = 0  # level 0 marks "outside the lesion" and is dropped below
    dists = sorted({max(1, round(d / pixel_mm)) for d in GLCM_DISTANCES_MM})
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    P = graycomatrix(q, dists, angles, levels=GLCM_LEVELS + 1, symmetric=True, normed=False)
    P = P[1:, 1:].astype(np.float64)  # pairs where both pixels lie in the lesion
    totals = P.sum(axis=(0, 1), keepdims=True)
    valid = totals[0, 0] > 0
    names = ("contrast", "dissimilarity", "homogeneity", "ASM", "energy", "correlation")
    if not valid.any():
        return {f"glcm_{n.lower()}": math.nan for n in names} | {"glcm_entropy": math.nan}
    P = P[..., valid].reshape(GLCM_LEVELS, GLCM_LEVELS, 1, -1) / totals[..., valid].reshape(1, 1, 1, -1)
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for n in names:
            vals = graycoprops(P, n)
            # correlation is undefined for a constant region; call it 1 (perfectly uniform)
            out[f"glcm_{n.lower()}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else 1.0
    ent = -(P * np.log2(np.where(P > 0, P, 1))).sum(axis=(0, 1))
    out["glcm_entropy"] = float(ent.mean())
    return out


def _shape_2d(mask: np.ndarray, pixel_mm: float) -> dict[str, float]:
    from skimage.measure import perimeter, regionprops

    area = float(mask.sum()) * pixel_mm**2
    perim = float(perimeter(mask, neighborhood=8)) * pixel_mm
    props = regionprops(mask.astype(np.uint8))
    p = props[0] if props else None
    return {
        "shape_area_mm2": area,
        "shape_perimeter_mm": perim,
        # 1 for a disc, lower for lobulated or irregular outlines
        "shape_circularity": float(min(4 * math.pi * area / perim**2, 1.0)) if perim > 0 else 1.0,
        "shape_solidity": float(p.solidity) if p is not None else 1.0,
        "shape_eccentricity": float(p.eccentricity) if p is not None else 0.0,
        "shape_axis_ratio": float(p.axis_minor_length / p.axis_major_length)
        if p is not None and p.axis_major_length > 0
        else 1.0,
    }


def _margin(hu: np.ndarray, mask: np.ndarray, pixel_mm: float) -> dict[str, float]:
    """Contrast to the surrounding parenchyma and edge sharpness (a sharp, dark cyst vs an ill-defined metastasis)."""
    from scipy import ndimage

    ring_px = max(1, round(3.0 / pixel_mm))
    ring = ndimage.binary_dilation(mask, iterations=ring_px) & ~mask
    inner = mask & ~ndimage.binary_erosion(mask, iterations=max(1, round(1.0 / pixel_mm)))
    edge = ndimage.binary_dilation(mask, iterations=1) & ~ndimage.binary_erosion(mask, iterations=1)
    gy, gx = np.gradient(hu.astype(np.float64), pixel_mm)
    grad = np.hypot(gy, gx)
    ring_mean = float(np.median(hu[ring])) if ring.any() else math.nan
    return {
        "margin_ring_hu": ring_mean,
        "margin_contrast_hu": float(hu[mask].mean() - ring_mean) if ring.any() else math.nan,
        "margin_rim_minus_core_hu": float(hu[inner].mean() - hu[mask & ~inner].mean())
        if (mask & ~inner).any() and inner.any()
        else 0.0,
        "margin_edge_gradient": float(grad[edge].mean()) if edge.any() else math.nan,
    }


def lesion_features(
    hu: np.ndarray, mask: np.ndarray, pixel_mm: float, window: tuple[float, float] = DEFAULT_WINDOW
) -> dict[str, float]:
    """Radiomics-style features of one lesion patch (scikit-image implementation).

    Args:
        hu: HU ``(S, H, W)`` (or ``(H, W)``); slice ``S // 2`` is the lesion's largest cross-section.
        mask: Lesion mask, same shape.
        pixel_mm: Patch pixel size in mm.
        window: Liver window (centre, width) used to quantise grey levels for the GLCM.

    Returns:
        First-order (``fo_*``), GLCM (``glcm_*``), 2-D shape (``shape_*``) and margin (``margin_*``)
        features of the centre slice, the largest cross-section: how many slices the network's patch
        holds (``patch.neighbours`` in 2d mode, ``patch.stacks``) does not change them.
    """
    hu = np.asarray(hu, dtype=np.float32)
    mask = np.asarray(mask).astype(bool)
    if hu.ndim == 2:
        hu, mask = hu[None], mask[None]
    if hu.shape != mask.shape:
        raise UserError(
            f"patch arrays: hu shape {hu.shape} differs from mask shape {mask.shape}; rebuild the cache"
        )
    if not mask.any():
        raise UserError("patch arrays: the lesion mask is empty; rebuild the patch cache")
    c = hu.shape[0] // 2
    if not mask[c].any():  # the centre slice is the largest cross-section; fall back to any slice with lesion
        c = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))
    feats = _first_order(hu[c][mask[c]])
    feats |= _glcm(hu[c], mask[c], pixel_mm, window)
    feats |= _shape_2d(mask[c], pixel_mm)
    feats |= _margin(hu[c], mask[c], pixel_mm)
    return feats


def _pyradiomics_features(hu: np.ndarray, mask: np.ndarray, pixel_mm: float) -> dict[str, float]:
    import SimpleITK as sitk
    from radiomics import featureextractor  # type: ignore[import-not-found]

    c = (
        hu.shape[0] // 2
        if mask[hu.shape[0] // 2].any()
        else int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))
    )
    img = sitk.GetImageFromArray(hu[c][None].astype(np.float32))
    msk = sitk.GetImageFromArray(mask[c][None].astype(np.uint8))
    for im in (img, msk):
        im.SetSpacing((pixel_mm, pixel_mm, 1.0))
    ext = featureextractor.RadiomicsFeatureExtractor(binWidth=HIST_BIN_HU, force2D=True, label=1)
    ext.disableAllFeatures()
    for cls in ("firstorder", "glcm", "shape2D"):
        ext.enableFeatureClassByName(cls)
    res = ext.execute(img, msk)
    return {f"pyrad_{k}": float(v) for k, v in res.items() if not k.startswith("diagnostics_")}


def _window(patch_dir: Path) -> tuple[float, float]:
    s = load_patch_settings(patch_dir)
    return float(s.get("window_center", DEFAULT_WINDOW[0])), float(s.get("window_width", DEFAULT_WINDOW[1]))


def extract_features(patch_dir: str | Path, extractor: str = "skimage") -> pd.DataFrame:
    """Radiomics-style features of every lesion in a patch cache.

    Args:
        patch_dir: Cache folder holding ``index.csv`` and one npz per lesion (``hu``, ``mask``).
        extractor: ``skimage`` (default) or ``pyradiomics`` (needs PyRadiomics installed).

    Returns:
        One row per lesion: ``lesion_id`` then the feature columns.
    """
    if extractor not in EXTRACTORS:
        raise UserError(f"extractor={extractor!r}: unknown; use one of {', '.join(EXTRACTORS)}")
    if extractor == "pyradiomics":
        try:
            import radiomics  # type: ignore[import-not-found]  # noqa: F401
        except ImportError as e:
            raise UserError(
                "extractor='pyradiomics': PyRadiomics is not installed (it does not build on Python 3.11 from "
                "PyPI); install it where it builds, or use extractor='skimage'"
            ) from e
    folder = resolve_patch_dir(patch_dir)
    index = load_patch_index(folder)
    window = _window(folder)
    rows = []
    for _, r in progress_bar(index.iterrows(), "radiomics features", unit="lesion", total=len(index)):
        p = load_patch(folder, r, arrays=("hu", "mask"))
        hu, mask, meta = p["hu"], p["mask"], p["meta"]
        pixel = r.get("patch_pixel_mm", math.nan)
        pixel_mm = float(pixel) if pd.notna(pixel) else float(meta.get("pixel_mm", 1.0))
        try:
            feats = (
                lesion_features(hu, mask, pixel_mm, window)
                if extractor == "skimage"
                else _pyradiomics_features(
                    np.asarray(hu, np.float32), np.asarray(mask).astype(bool), pixel_mm
                )
            )
        except UserError as e:
            raise UserError(f"lesion {r['lesion_id']} ({Path(str(r['file'])).name}): {e}") from e
        rows.append({"lesion_id": str(r["lesion_id"]), **feats})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- fusion and frozen features
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
    return lesion_features(hu, mask, pixel_mm, window) | measurement_features(measurements)


def cache_radiomics(patch_dir: str | Path, index: pd.DataFrame, window: tuple[float, float]) -> pd.DataFrame:
    """:func:`radiomics_features` of every lesion of a patch cache (one row per lesion, ``lesion_id`` first)."""
    rows = []
    for _, r in index.iterrows():
        p = load_patch(patch_dir, r, arrays=("hu", "mask"))
        rows.append(
            {"lesion_id": str(r["lesion_id"])}
            | radiomics_features(p["hu"], p["mask"], float(p["meta"]["pixel_mm"]), window, r.to_dict())
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
