"""Lesion-centred 2-D / 2.5-D patches: cutting one lesion's patch (sampling, resampling, HU windowing).

One lesion gives one patch, cut around its largest axial cross-section:

* The centre slice is the axial slice where the lesion's area in mm² is largest.
  The ``neighbours`` slices on each side are taken at native spacing, or every
  ``slice_step_mm`` along z with interpolation. They are clamped at the ends of
  the volume, so the edge slice is repeated.
* ``2.5d``: the centre slice and its neighbours are the channels of one sample.
  ``stacks = m`` adds a sample centred on each of the ``m`` slices either side
  (the same step), so the network sees more of the lesion's volume: ``2m+1``
  samples whose features are averaged, like the slices of ``2d`` mode (which
  ignores ``stacks``: its samples are the ``neighbours`` slices).
* The in-plane field is a square centred on the lesion's centroid on the centre
  slice. Its side is the lesion's extent plus a margin, and at least
  ``min_field_mm``. It is resampled in millimetres to ``size_px`` pixels, so
  anisotropic pixels come out square. Anything outside the volume is air
  (-1024 HU).
* Orientation is the canonical LPS array's: row 0 anterior, column 0 patient
  right, as in a radiology viewer. Nothing is flipped.

The on-disk patch cache (``build_patches`` and its readers) lives in
:mod:`liverlesion.patch_cache`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from liverlesion.config import PatchConfig
from liverlesion.errors import UserError
from liverlesion.lesions import LesionMask, foreground_box
from liverlesion.volume import Volume

__all__ = [
    "AIR_FILL_HU",
    "LesionPatch",
    "check_patch_config",
    "extract_patch",
    "stacks_each_side",
    "window",
]

AIR_FILL_HU = -1024.0  # fill value outside the scanned volume (air)
_MODES = ("2.5d", "2d")
_ORDERS = {"nearest": 0, "linear": 1, "bspline": 3}


@dataclass
class LesionPatch:
    """One lesion's patch, in the layout of the patch cache.

    Attributes:
        image: float32 ``(S, C, H, W)`` windowed to ``[0, 1]`` (2.5d: S=2m+1 stacks, C=2k+1; 2d: S=2k+1, C=1).
        mask: uint8 ``(S, H, W)`` lesion mask on the centre slice of each sample.
        hu: float32 ``(S, H, W)`` HU on the centre slice of each sample.
        meta: Geometry of the cut: ``centre_slice``, ``slice_indices``, ``slice_positions_mm``,
            ``field_mm``, ``pixel_mm``, ``centre_lps_mm``, ``centre_index_zyx``, ``max_area_mm2``, ...
    """

    image: np.ndarray
    mask: np.ndarray
    hu: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored in the npz (``meta`` as a JSON string)."""
        return {
            "image": self.image,
            "mask": self.mask,
            "hu": self.hu,
            "meta": np.array(json.dumps(self.meta)),
        }


def check_patch_config(cfg: PatchConfig) -> None:
    """Raise :class:`UserError` naming the setting when a PatchConfig value is unusable."""
    if cfg.mode not in _MODES:
        raise UserError(f"config patch.mode={cfg.mode!r}: unknown mode; use one of {', '.join(_MODES)}")
    if cfg.interpolation not in _ORDERS:
        raise UserError(
            f"config patch.interpolation={cfg.interpolation!r}: unknown interpolation; "
            f"use one of {', '.join(_ORDERS)}"
        )
    checks = [
        ("neighbours", cfg.neighbours >= 0, "must be 0 or more"),
        ("stacks", cfg.stacks >= 0, "must be 0 or more"),
        ("slice_step_mm", cfg.slice_step_mm >= 0, "must be 0 (native spacing) or a positive step in mm"),
        ("size_px", cfg.size_px >= 8, "must be at least 8 pixels"),
        ("margin_mm", cfg.margin_mm >= 0, "must be 0 or more"),
        ("min_field_mm", cfg.min_field_mm > 0, "must be a positive field of view in mm"),
        ("window_width", cfg.window_width > 0, "must be a positive width in HU"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise UserError(f"config patch.{name}={getattr(cfg, name)!r}: {what}")
    for name in ("slice_step_mm", "margin_mm", "min_field_mm", "window_center", "window_width"):
        if not math.isfinite(float(getattr(cfg, name))):
            raise UserError(f"config patch.{name}={getattr(cfg, name)!r}: must be a finite number")


def stacks_each_side(cfg: PatchConfig) -> int:
    """2.5-D stacks cut on each side of the centre one (``patch.stacks``); 0 in 2d mode, whose samples
    are its ``neighbours`` slices already."""
    return int(cfg.stacks) if cfg.mode == "2.5d" else 0


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU through a display window to ``[0, 1]``.

    ``center - width/2`` maps to 0 and ``center + width/2`` to 1; values outside are clipped.

    Args:
        hu: Values in HU.
        center: Window centre (level) in HU.
        width: Window width in HU (> 0).
    """
    if not width > 0:
        raise UserError(f"window width={width!r}: must be a positive width in HU, e.g. 250")
    lo = float(center) - float(width) / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _sample(
    array: np.ndarray,
    zs: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    order: int,
    cval: float,
    offset: tuple[int, int, int] = (0, 0, 0),
    shape: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Sample ``array`` on the grid ``zs x rows x cols`` (fractional indices) -> ``(len(zs), H, W)``.

    Only the small block around the grid is copied (a B-spline prefilter over a whole
    CT would cost hundreds of MB). Along z the block repeats the edge slice; in-plane,
    points outside the volume take ``cval``.

    ``array`` may be a crop at ``offset`` (z, y, x) of a volume of ``shape`` that holds
    ``cval`` everywhere outside the crop (a lesion mask cut to its bounding box): the
    result is the same as sampling the full volume, without building it.
    """
    from scipy.ndimage import map_coordinates

    nz, ny, nx = shape if shape is not None else array.shape
    oz, oy, ox = offset
    cz, cy, cx = array.shape
    pad = order + 2  # spline support plus one voxel of slack
    z0, z1 = math.floor(zs.min()) - pad, math.ceil(zs.max()) + pad + 1
    y0, y1 = math.floor(rows.min()) - pad, math.ceil(rows.max()) + pad + 1
    x0, x1 = math.floor(cols.min()) - pad, math.ceil(cols.max()) + pad + 1
    zi = np.clip(np.arange(z0, z1), 0, nz - 1) - oz  # volume slice of each block slice, in crop indices
    inside = (zi >= 0) & (zi < cz)
    block = np.full((len(zi), y1 - y0, x1 - x0), cval, dtype=np.float32)
    ys, ye = max(y0, oy, 0), min(y1, oy + cy, ny)
    xs, xe = max(x0, ox, 0), min(x1, ox + cx, nx)
    if ye > ys and xe > xs and inside.any():
        block[inside, ys - y0 : ye - y0, xs - x0 : xe - x0] = array[
            zi[inside], ys - oy : ye - oy, xs - ox : xe - ox
        ]
    zz, rr, cc = np.meshgrid(zs - z0, rows - y0, cols - x0, indexing="ij")
    out = map_coordinates(block, [zz, rr, cc], order=order, mode="nearest", prefilter=order > 1)
    return out.astype(np.float32, copy=False)


def extract_patch(volume: Volume, lesion_mask: Any, cfg: PatchConfig) -> LesionPatch:
    """Cut one lesion's patch from a CT volume.

    Args:
        volume: CT in HU, canonical LPS (see volume.py).
        lesion_mask: This one lesion: a ``lesions.LesionMask`` crop, or a boolean ``[z, y, x]`` array
            the shape of ``volume``.
        cfg: Patch settings.

    Returns:
        The patch arrays and the geometry used (``meta``).
    """
    check_patch_config(cfg)
    if isinstance(lesion_mask, LesionMask):  # a crop already: no full-size array is made
        mask, base = lesion_mask.crop, lesion_mask.offset
        shape = tuple(lesion_mask.shape)
    else:
        mask, base = np.asarray(lesion_mask), (0, 0, 0)
        shape = tuple(mask.shape)
    if shape != tuple(volume.shape):
        raise UserError(
            f"lesion mask shape {shape} differs from the image shape {volume.shape}; "
            "resample the mask onto the image grid"
        )
    mask = mask.astype(bool, copy=False)
    box = foreground_box(mask)
    if box is None:
        raise UserError("lesion mask is empty (no non-zero voxels); check the mask file and the label value")
    # Work on the lesion's bounding box: the full-size mask is mostly empty.
    crop = mask[box]
    offset = tuple(int(s.start) + b for s, b in zip(box, base, strict=True))
    zz, yy, xx = np.nonzero(crop)
    zz, yy, xx = zz + offset[0], yy + offset[1], xx + offset[2]
    nz = volume.shape[0]
    sz, sy, sx = volume.spacing

    # Largest cross-section in mm²; ties go to the slice nearest the lesion's z-centroid.
    areas = np.bincount(zz, minlength=nz) * (sy * sx)
    candidates = np.flatnonzero(areas == areas.max())
    zc = int(candidates[np.argmin(np.abs(candidates - zz.mean()))])
    on = zz == zc
    cy, cx = float(yy[on].mean()), float(xx[on].mean())

    # Half extent (mm) of the whole lesion around the in-plane centre, to voxel edges,
    # so an irregular lesion still fits inside the field with its margin.
    half_extent = max((np.abs(yy - cy).max() + 0.5) * sy, (np.abs(xx - cx).max() + 0.5) * sx)
    if cfg.scale_with_lesion:
        field_mm = max(2.0 * half_extent + 2.0 * cfg.margin_mm, float(cfg.min_field_mm))
    else:
        field_mm = float(cfg.min_field_mm)
    size = int(cfg.size_px)
    pixel_mm = field_mm / size
    offsets = (np.arange(size) - (size - 1) / 2.0) * pixel_mm  # pixel centres, mm from the patch centre
    rows = cy + offsets / sy
    cols = cx + offsets / sx

    k, m = int(cfg.neighbours), stacks_each_side(cfg)
    steps = np.arange(-(k + m), k + m + 1, dtype=float)
    z_wanted = zc + (steps if cfg.slice_step_mm == 0 else steps * (cfg.slice_step_mm / sz))
    zs = np.clip(z_wanted, 0, nz - 1)

    order = _ORDERS[cfg.interpolation]
    hu = _sample(volume.array, zs, rows, cols, order=order, cval=AIR_FILL_HU)
    # Linear then > 0.5 keeps the mask's area in mm when pixel sizes differ.
    mask_order = 0 if order == 0 else 1
    lesion = (
        _sample(
            crop.astype(np.float32),
            zs,
            rows,
            cols,
            order=mask_order,
            cval=0.0,
            offset=offset,
            shape=volume.shape,
        )
        > 0.5
    )
    img = window(hu, cfg.window_center, cfg.window_width)

    if cfg.mode == "2.5d":
        # (2m+1, 2k+1, H, W): one stack per centre slice, channels run inferior -> superior
        image = np.stack([img[j : j + 2 * k + 1] for j in range(2 * m + 1)])
        mask_out = lesion[k : k + 2 * m + 1]
        hu_out = hu[k : k + 2 * m + 1]
    else:
        image = img[:, None]  # (2k+1, 1, H, W)
        mask_out = lesion
        hu_out = hu

    meta = {
        "mode": cfg.mode,
        "centre_slice": zc,
        "slice_indices": [round(float(z), 4) for z in zs],
        "slice_positions_mm": [round(float(volume.index_to_physical([z, cy, cx])[2]), 3) for z in zs],
        "clamped": bool(np.any(zs != z_wanted)),
        "field_mm": float(field_mm),
        "pixel_mm": float(pixel_mm),
        "size_px": size,
        "centre_index_zyx": [zc, cy, cx],
        "centre_lps_mm": [float(v) for v in volume.index_to_physical([zc, cy, cx])],
        "max_area_mm2": float(areas[zc]),
    }
    return LesionPatch(
        image=np.ascontiguousarray(image, dtype=np.float32),
        mask=np.ascontiguousarray(mask_out, dtype=np.uint8),
        hu=np.ascontiguousarray(hu_out, dtype=np.float32),
        meta=meta,
    )
