"""Measure one lesion in millimetres on its image's own grid: volume, largest axial (Feret)
diameter, smallest principal-axis extent and HU statistics (see :mod:`liverlesion.lesions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from liverlesion.volume import Volume

# In-plane 4-neighbourhood: erodes each axial slice on its own.
_AXIAL_CROSS = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)
_EDGE_MIDPOINTS = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5]])


def max_axial_diameter_mm(crop: np.ndarray, spacing_y: float, spacing_x: float) -> float:
    """Largest Feret diameter over the axial slices of a ``[z, y, x]`` boolean crop, in mm."""
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist

    scale = np.array([spacing_y, spacing_x])
    # Only outline pixels can carry the extreme points; their edge midpoints are the
    # 0.5 iso-contour of the slice. One erosion for all slices, then split by slice.
    edge = crop & ~ndimage.binary_erosion(crop, structure=_AXIAL_CROSS, border_value=0)
    zyx = np.argwhere(edge)
    if len(zyx) == 0:
        return 0.0
    starts = np.flatnonzero(np.r_[True, np.diff(zyx[:, 0]) != 0])  # argwhere is sorted by z
    best = 0.0
    for yx in np.split(zyx[:, 1:].astype(float), starts[1:]):
        # Duplicate midpoints (shared by neighbouring pixels) change neither the hull nor the maximum.
        pts = (yx[:, None, :] + _EDGE_MIDPOINTS[None]).reshape(-1, 2) * scale
        if len(pts) > 8:
            try:
                pts = pts[ConvexHull(pts).vertices]
            except QhullError:  # degenerate outline: fall back to all points
                pass
        best = max(best, float(pdist(pts).max()))
    return best


def min_axis_mm(
    idx_zyx: np.ndarray, spacing_zyx: Sequence[float], extreme_idx_zyx: np.ndarray | None = None
) -> float:
    """Extent along the smallest principal axis of voxel indices ``(n, 3)``, in mm.

    Args:
        idx_zyx: All voxel indices of the lesion (they define the principal axes).
        spacing_zyx: Voxel size in mm.
        extreme_idx_zyx: A subset that holds every voxel that can be extreme along an axis
            (e.g. the surface voxels); defaults to ``idx_zyx``.
    """
    spacing = np.asarray(spacing_zyx, dtype=float)
    if len(idx_zyx) < 2:
        return float(spacing.min())
    coords = idx_zyx * spacing
    centred = coords - coords.mean(axis=0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    extreme = coords if extreme_idx_zyx is None else extreme_idx_zyx * spacing  # extents ignore the origin
    # Extent along each principal axis; voxel centres span one voxel less than the
    # object, so add one voxel's extent along the axis. Taking the smallest extent
    # (not just the smallest-variance axis) settles ties, e.g. a one-voxel-thick bar.
    proj = extreme @ vecs
    extents = proj.max(axis=0) - proj.min(axis=0) + np.abs(vecs).T @ spacing
    return float(extents.min())


def measure_lesion(image: Volume, crop: np.ndarray, offset: Sequence[int]) -> dict:
    """Measurements of a lesion given its boolean crop at ``offset`` (z, y, x) in ``image``."""
    idx = np.argwhere(crop)
    assert len(idx), "empty lesion crop"
    gidx = idx + np.asarray(offset)
    lo = gidx.min(axis=0)
    hi = gidx.max(axis=0) + 1
    window = tuple(slice(int(o), int(o) + s) for o, s in zip(offset, crop.shape, strict=True))
    hu = image.array[window][crop].astype(np.float64)
    centroid = image.index_to_physical(gidx.mean(axis=0))
    # A voxel that is extreme along some direction lacks one of its 6 neighbours, so the
    # surface voxels carry every extent (a large lesion has far fewer of them).
    surface = np.argwhere(crop & ~ndimage.binary_erosion(crop, border_value=0))
    return {
        "n_voxels": int(len(idx)),
        "bbox_zyx": tuple(int(v) for v in (*lo, *hi)),
        "centroid_mm": tuple(round(float(c), 4) for c in centroid),
        # Rounded far below measurement precision, to keep the CSV readable.
        "volume_ml": round(float(len(idx) * image.voxel_volume_ml), 6),
        "max_axial_diameter_mm": round(max_axial_diameter_mm(crop, image.spacing[1], image.spacing[2]), 4),
        "min_axis_mm": round(min_axis_mm(idx, image.spacing, surface), 4),
        "hu_mean": round(float(hu.mean()), 3),
        "hu_std": round(float(hu.std()), 3),
    }
