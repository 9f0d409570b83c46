"""Lesion records from masks or clicks, and the lesion table of a manifest.

A lesion is a set of voxels of one image: a connected component of a mask, one
label of a label mask, or a sphere around a clicked point. Each is measured in
millimetres on the image's own grid (no resampling), so anisotropic spacing is
handled by construction:

* ``bbox_zyx``: array indices ``(z0, y0, x0, z1, y1, x1)``, half-open.
* ``centroid_mm``: mean voxel position in LPS mm ``(x, y, z)``.
* ``volume_ml``: voxel count x voxel volume.
* ``max_axial_diameter_mm``: the largest in-plane Feret (caliper) diameter over
  the axial slices, measured on the pixel outline (the 0.5 iso-contour, as
  scikit-image's ``feret_diameter_max``) with the in-plane spacing, as a
  radiologist would measure it on one slice (RECIST long axis).
* ``min_axis_mm``: the extent along the lesion's smallest principal axis
  (voxel centres projected onto that axis, plus one voxel's extent along it);
  used to flag lesions too small to characterise.
* ``hu_mean`` / ``hu_std``: HU statistics over the lesion voxels.

Masks handed to callers are **crops** (:class:`LesionMask`: the boolean array of the
lesion's bounding box, its offset and the image shape), never full-size copies: on a
512 x 512 x 900 CT a full-size boolean mask is 236 MB per lesion. A crop still reads
as the full-size array where a caller needs one (``np.asarray``, ``mask[z]``), one
lesion at a time. :func:`iter_manifest_lesions` yields them one image at a time.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from liverlesion import DISCLAIMER
from liverlesion.click import grow_from_click, sphere_region
from liverlesion.errors import UserError
from liverlesion.volume import Volume

log = logging.getLogger(__name__)

#: Columns of the lesion table (``lesions.csv``), in order; see docs/ARCHITECTURE.md.
LESION_COLUMNS = (
    "lesion_id",
    "patient_id",
    "lesion_class",
    "image",
    "mask",
    "label",
    "source",
    "measurement",
    "n_voxels",
    "bbox_z0",
    "bbox_y0",
    "bbox_x0",
    "bbox_z1",
    "bbox_y1",
    "bbox_x1",
    "centroid_x_mm",
    "centroid_y_mm",
    "centroid_z_mm",
    "volume_ml",
    "max_axial_diameter_mm",
    "min_axis_mm",
    "hu_mean",
    "hu_std",
)

#: HU below which a clicked point is taken to be in air (outside the body, lung or gas).
AIR_HU = -500.0


@dataclass(frozen=True, eq=False)
class LesionMask:
    """One lesion's voxels as a crop: ``crop`` is the boolean bounding box at ``offset`` in ``shape``.

    Behaves as the full-size boolean ``[z, y, x]`` array where asked (``np.asarray(m)``, ``m[z]``,
    ``m.any()``, ``m.sum()``), building only what is asked for; ``extract_patch`` and the
    measurements use the crop itself.
    """

    crop: np.ndarray
    offset: tuple[int, int, int]
    shape: tuple[int, int, int]

    dtype = np.dtype(bool)
    ndim = 3

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Where the crop lies in the full array."""
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.crop.shape, strict=True))  # type: ignore[return-value]

    def full(self) -> np.ndarray:
        """The full-size boolean array (allocates ``prod(shape)`` bytes)."""
        out = np.zeros(self.shape, dtype=bool)
        out[self.slices] = self.crop
        return out

    def __array__(self, dtype=None, copy=None):
        a = self.full()
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):  # one axial slice, as an overlay needs it
            z = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= z < self.shape[0]:
                raise IndexError(f"slice {key} out of range for {self.shape[0]} slices")
            out = np.zeros(self.shape[1:], dtype=bool)
            k = z - self.offset[0]
            if 0 <= k < self.crop.shape[0]:
                out[self.slices[1:]] = self.crop[k]
            return out
        return self.full()[key]

    def any(self) -> bool:
        return bool(self.crop.any())

    def sum(self) -> int:
        return int(np.count_nonzero(self.crop))

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return self.full().astype(dtype)


LesionWithMask = tuple["Lesion", LesionMask]


@dataclass
class Lesion:
    """One lesion: where it is and how large it is.

    Attributes:
        lesion_id: ``{patient_id}-L{nn}``, numbered per patient (see :func:`iter_manifest_lesions`).
        patient_id: Patient identifier from the manifest (never from DICOM headers).
        lesion_class: Class name from the manifest ("" when unknown, e.g. at prediction).
        image: The image reference as given (manifest text or path).
        mask: The mask reference as given ("" for a click).
        label: Mask label used (None: connected components of the non-zero mask, or a click);
            for a DICOM SEG mask, the segment number the lesion came from.
        source: ``"mask"`` or ``"click"``.
        n_voxels: Number of voxels.
        bbox_zyx: ``(z0, y0, x0, z1, y1, x1)`` array indices, half-open.
        centroid_mm: Centroid in LPS mm ``(x, y, z)``.
        volume_ml: Volume in mL.
        max_axial_diameter_mm: Largest in-plane Feret diameter over the axial slices, mm.
        min_axis_mm: Extent along the smallest principal axis, mm.
        hu_mean: Mean HU over the lesion.
        hu_std: HU standard deviation over the lesion.
        measurement: ``"mask"`` (measured on the given mask), or for a click one of
            :data:`liverlesion.click.MEASUREMENT`'s values, all starting "estimated from click".
    """

    lesion_id: str
    patient_id: str
    lesion_class: str
    image: str
    mask: str
    label: int | None
    source: str
    n_voxels: int
    bbox_zyx: tuple[int, int, int, int, int, int]
    centroid_mm: tuple[float, float, float]
    volume_ml: float
    max_axial_diameter_mm: float
    min_axis_mm: float
    hu_mean: float
    hu_std: float
    measurement: str = "mask"

    @property
    def bbox_slices(self) -> tuple[slice, slice, slice]:
        """The bounding box as array slices ``[z, y, x]``."""
        z0, y0, x0, z1, y1, x1 = self.bbox_zyx
        return slice(z0, z1), slice(y0, y1), slice(x0, x1)

    def to_row(self) -> dict:
        """The lesion as a flat dict with the lesion-table columns (:data:`LESION_COLUMNS`)."""
        d = asdict(self)
        bbox = d.pop("bbox_zyx")
        cx, cy, cz = d.pop("centroid_mm")
        row = {
            **d,
            **{f"bbox_{k}": int(v) for k, v in zip(("z0", "y0", "x0", "z1", "y1", "x1"), bbox, strict=True)},
            "centroid_x_mm": cx,
            "centroid_y_mm": cy,
            "centroid_z_mm": cz,
        }
        return {c: row[c] for c in LESION_COLUMNS}


# ----------------------------------------------------------------------------- measurements


# In-plane 4-neighbourhood: erodes each axial slice on its own.
_AXIAL_CROSS = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)
_EDGE_MIDPOINTS = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5]])


def _max_axial_diameter_mm(crop: np.ndarray, spacing_y: float, spacing_x: float) -> float:
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


def _min_axis_mm(
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


def _measure(image: Volume, crop: np.ndarray, offset: Sequence[int]) -> dict:
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
        "max_axial_diameter_mm": round(_max_axial_diameter_mm(crop, image.spacing[1], image.spacing[2]), 4),
        "min_axis_mm": round(_min_axis_mm(idx, image.spacing, surface), 4),
        "hu_mean": round(float(hu.mean()), 3),
        "hu_std": round(float(hu.std()), 3),
    }


def _lesion_id(patient_id: str, number: int) -> str:
    return f"{patient_id}-L{number:02d}"


def _foreground_box(arr: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box of ``arr > 0`` (a ``[z, y, x]`` mask of any numeric or bool type) as slices, or None.

    Max-projections take milliseconds on a full CT-sized mask, where ``ndimage.find_objects``
    or ``np.nonzero`` take a few hundred, and need no full-size ``arr > 0`` temporary.
    """
    z = np.flatnonzero(arr.max(axis=(1, 2)) > 0)
    if z.size == 0:
        return None
    slab = arr[z[0] : z[-1] + 1]
    y = np.flatnonzero(slab.max(axis=(0, 2)) > 0)
    x = np.flatnonzero(slab.max(axis=(0, 1)) > 0)
    return (
        slice(int(z[0]), int(z[-1]) + 1),
        slice(int(y[0]), int(y[-1]) + 1),
        slice(int(x[0]), int(x[-1]) + 1),
    )


# ----------------------------------------------------------------------------- masks

#: A lesion mask whose foreground covers more than this fraction of the body (voxels above
#: :data:`AIR_HU`) is not a lesion mask (a body/organ mask, or an image passed as the mask).
MAX_BODY_FRACTION = 0.5
#: More connected components than this in a lesion mask is not plausible.
MAX_COMPONENTS = 500


def check_mask_foreground(
    image: Volume, mask: Volume, mask_name: str = "mask", box: tuple[slice, slice, slice] | None = None
) -> None:
    """Refuse masks that cannot be lesion masks, cheaply (before any per-lesion work).

    Refused: foreground touching all six faces of the volume (e.g. a mask that is 1
    everywhere), and foreground covering more than :data:`MAX_BODY_FRACTION` of the body
    (voxels above :data:`AIR_HU` in ``image``).

    Args:
        image: The CT (HU) on the same grid as ``mask``.
        mask: The mask.
        mask_name: How the mask is named in the message.
        box: The foreground's bounding box, when already known.

    Raises:
        UserError: Naming the mask and what is wrong.
    """
    arr = mask.array
    if box is None:
        box = _foreground_box(arr)
    if box is None:
        return
    hint = (
        "give the lesion mask (lesions > 0, background 0), not a liver/body mask or an image; "
        "check --image and --mask are not swapped"
    )
    if tuple(s.stop - s.start for s in box) == tuple(arr.shape):
        raise UserError(f"{mask_name}: the foreground touches all six faces of the volume; {hint}")
    n_fg = int(np.count_nonzero(arr[box] > 0))
    n_body = int(np.count_nonzero(image.array > AIR_HU))
    if n_fg > MAX_BODY_FRACTION * max(n_body, 1):
        pct = 100.0 * n_fg / max(n_body, 1)
        raise UserError(
            f"{mask_name}: the foreground ({n_fg} voxels) covers {pct:.0f}% of the body (voxels above "
            f"{AIR_HU:.0f} HU), more than {100 * MAX_BODY_FRACTION:.0f}%; {hint}"
        )


def lesions_from_mask(
    image: Volume,
    mask: Volume,
    label: int | None = None,
    patient_id: str = "",
    lesion_class: str = "",
    *,
    first_number: int = 1,
    image_ref: str = "",
    mask_ref: str = "",
    mask_name: str = "mask",
    min_voxels: int = 1,
) -> list[LesionWithMask]:
    """Lesions of one mask.

    ``label`` None or 0 on a binary mask (one non-zero value): every 3-D connected
    component (26-connectivity) of ``mask > 0`` is a lesion, in raster order of its
    first voxel (z, then y, x), numbered from ``first_number``.
    ``label`` None or 0 on a multi-label mask (several non-zero values): each label
    value is one lesion and **keeps its value as the lesion number** (label 5 is
    ``{patient_id}-L05``, ``first_number`` is not used): the user's labels stay the ids.
    ``label`` N: the voxels equal to N form **one** lesion, even when they fall
    into several components (the annotator grouped them; a note is logged).

    Args:
        image: CT volume (HU).
        mask: Mask on the same grid as ``image`` (check geometry first, e.g. ``io.check_geometry``).
        label: Label value, or None/0 for connected components.
        patient_id: Patient identifier (used in ``lesion_id``).
        lesion_class: Class name.
        first_number: Number of the first lesion (``{patient_id}-L{nn}``).
        image_ref: Image reference stored in the records.
        mask_ref: Mask reference stored in the records.
        mask_name: How the mask is named in error messages.
        min_voxels: Components with fewer voxels are dropped (speckle).

    Returns:
        ``(Lesion, LesionMask)`` pairs: each lesion's voxels as a crop of its bounding box.

    Raises:
        UserError: Shape mismatch, empty mask, label absent, or nothing left after ``min_voxels``.
    """
    if image.shape != mask.shape:
        raise UserError(
            f"{mask_name}: shape {mask.shape} (z, y, x) differs from the image's {image.shape}; "
            "give the mask drawn on this image"
        )
    arr = mask.array
    box = _foreground_box(arr)
    if box is None:
        raise UserError(
            f"{mask_name}: the mask is empty (no voxel > 0); give a mask that contains the lesion(s)"
        )
    check_mask_foreground(image, mask, mask_name, box=box)
    label = int(label) if label else None
    offset = tuple(s.start for s in box)
    # Everything below works inside the foreground's box: a full-size int32 label image of
    # a 512x512x900 CT would take ~1 GB, and full-size passes dominate the time.
    values = arr[box]
    fg = values > 0
    lesions: list[tuple[np.ndarray, tuple[int, int, int]]] = []  # (crop, offset)
    numbers: list[int] | None = None  # lesion numbers when they are the mask's labels
    present = np.unique(values[fg]) if label is None else None
    if present is not None and len(present) > 1:
        # A multi-label mask: each label is one lesion, numbered by its own value.
        if len(present) > MAX_COMPONENTS or np.any(present != np.round(present)):
            raise UserError(
                f"{mask_name}: {len(present)} different non-zero values (e.g. {present[0]:g}, {present[1]:g}); "
                "a label mask holds a few whole-number lesion labels: give the lesion mask, or select "
                "one lesion with its label"
            )
        numbers = []
        for value in present:
            sel = values == value
            sub = _foreground_box(sel)
            assert sub is not None
            crop = sel[sub]
            if int(crop.sum()) < min_voxels:
                log.info("%s: dropped label %g, smaller than %d voxels", mask_name, value, min_voxels)
                continue
            lesions.append((crop, tuple(o + s.start for o, s in zip(offset, sub, strict=True))))
            numbers.append(int(value))
        if not lesions:
            raise UserError(
                f"{mask_name}: all {len(present)} labels are smaller than min_voxels={min_voxels}; lower min_voxels"
            )
    elif label is None:
        comp, n = ndimage.label(fg, structure=np.ones((3, 3, 3), dtype=bool))
        if n > MAX_COMPONENTS:
            raise UserError(
                f"{mask_name}: {n} separate connected components, more than {MAX_COMPONENTS} lesions is not "
                f"plausible (a noisy or thresholded image rather than a lesion mask?); give the lesion mask, "
                f"or select one lesion with its label"
            )
        sizes = np.bincount(comp.ravel(), minlength=n + 1)  # voxels per component, in one pass
        for k, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sizes[k] >= min_voxels:
                crop = comp[sl] == k
                lesions.append((crop, tuple(o + s.start for o, s in zip(offset, sl, strict=True))))
        n_small = int(np.count_nonzero(sizes[1:] < min_voxels))
        if n_small:
            log.info("%s: dropped %d component(s) smaller than %d voxels", mask_name, n_small, min_voxels)
        if not lesions:
            raise UserError(
                f"{mask_name}: all {n} component(s) are smaller than min_voxels={min_voxels}; lower min_voxels"
            )
    else:
        sel = values == label
        if not sel.any():
            present = np.unique(values[fg])
            shown = ", ".join(f"{v:g}" for v in present[:20]) + (" ..." if len(present) > 20 else "")
            raise UserError(
                f"{mask_name}: label {label} is not in the mask; labels present: {shown}; "
                "fix the label column, or leave it empty to use every connected component"
            )
        sub = _foreground_box(sel)
        assert sub is not None
        crop = sel[sub]
        _, n = ndimage.label(crop, structure=np.ones((3, 3, 3), dtype=bool))
        if n > 1:
            log.info("%s: label %d has %d separate parts; treated as one lesion", mask_name, label, n)
        if int(crop.sum()) < min_voxels:
            raise UserError(
                f"{mask_name}: label {label} has {int(crop.sum())} voxels, fewer than min_voxels={min_voxels}; "
                "lower min_voxels"
            )
        lesions.append((crop, tuple(o + s.start for o, s in zip(offset, sub, strict=True))))

    out: list[LesionWithMask] = []
    for i, (crop, off) in enumerate(lesions):
        m = _measure(image, crop, off)
        lesion = Lesion(
            lesion_id=_lesion_id(patient_id, numbers[i] if numbers is not None else first_number + i),
            patient_id=patient_id,
            lesion_class=lesion_class,
            image=image_ref,
            mask=mask_ref,
            label=numbers[i] if numbers is not None else label,
            source="mask",
            **m,
        )
        assert crop.shape == tuple(h - lo for lo, h in zip(off, m["bbox_zyx"][3:], strict=True))
        out.append((lesion, LesionMask(crop, tuple(int(o) for o in off), tuple(image.shape))))
    return out


# ----------------------------------------------------------------------------- clicks


def physical_bounds(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The volume's extent in LPS mm: ``(min_xyz, max_xyz)`` over the outer voxel faces."""
    shape = np.asarray(volume.shape, dtype=float)
    corners = np.array([[z, y, x] for z in (0, 1) for y in (0, 1) for x in (0, 1)], dtype=float)
    pts = volume.index_to_physical(corners * shape - 0.5)
    return pts.min(axis=0), pts.max(axis=0)


#: Largest lesion diameter accepted for a click, mm (a whole adult liver is about 150-200 mm wide).
MAX_DIAMETER_MM = 300.0


def check_diameter(diameter_mm, name: str = "--diameter", image: Volume | None = None) -> float:
    """Refuse a click diameter that is not a finite positive number of mm, or implausibly large.

    Args:
        diameter_mm: The diameter in mm.
        name: How the value is named in the message (e.g. ``"--diameter"``).
        image: When given, the diameter must also not exceed the image's largest extent.

    Returns:
        The diameter as a float.

    Raises:
        UserError: Naming ``name`` and the value.
    """
    try:
        d = float(diameter_mm)
    except (TypeError, ValueError):
        d = math.nan
    if not (math.isfinite(d) and d > 0):
        raise UserError(f"{name} {diameter_mm!r}: must be a positive, finite number of mm (e.g. 15)")
    if d > MAX_DIAMETER_MM:
        raise UserError(
            f"{name} {d:g} mm: larger than any plausible liver lesion (at most {MAX_DIAMETER_MM:g} mm); "
            f"give the lesion's diameter in mm (not um or another unit), e.g. 15"
        )
    if image is not None:
        lo, hi = physical_bounds(image)
        extent = float(np.max(hi - lo))
        if d > extent:
            raise UserError(
                f"{name} {d:g} mm: larger than the image itself (largest extent {extent:.1f} mm); "
                f"give the lesion's diameter in mm, e.g. 15"
            )
    return d


def _fmt_xyz(p: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in p) + ")"


def lesion_from_click(
    image: Volume,
    point_xyz_mm: Sequence[float],
    diameter_mm: float,
    patient_id: str = "",
    lesion_class: str = "",
    *,
    lesion_id: str | None = None,
    image_ref: str = "",
    point_name: str = "point",
    method: str = "grow",
) -> LesionWithMask:
    """A lesion around a clicked LPS point, grown from it within ``diameter_mm`` (:mod:`liverlesion.click`).

    ``method="grow"`` (the default) grows the lesion from the click, bounded by intensity and by
    the diameter; where no edge is found it is capped at the sphere of the diameter, and where
    growing fails it is that sphere (each with a one-line warning). ``method="sphere"`` gives the
    sphere directly. The sphere is round in millimetres (an ellipsoid in voxels when the spacing
    is anisotropic); parts outside the volume are clipped with a warning; the voxel nearest the
    point is always included, so a tiny diameter still gives a lesion. The record's
    ``measurement`` says how it was made; a click's measurements are always estimates.

    Args:
        image: CT volume (HU).
        point_xyz_mm: Click position ``(x, y, z)`` in LPS mm (DICOM patient coordinates).
        diameter_mm: Lesion diameter in mm (> 0).
        patient_id: Patient identifier.
        lesion_class: Class name.
        lesion_id: Identifier (default ``{patient_id}-L01``).
        image_ref: Image reference stored in the record.
        point_name: How the point is named in error messages.
        method: ``"grow"`` or ``"sphere"``.

    Returns:
        ``(Lesion, LesionMask)``: the lesion's voxels inside the image, as a crop.

    Raises:
        UserError: Bad diameter or method, point outside the volume, or point in air.
    """
    if method not in ("grow", "sphere"):
        raise UserError(f"click method {method!r}: expected 'grow' or 'sphere'")
    point = np.asarray(point_xyz_mm, dtype=float).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise UserError(f"{point_name} {tuple(point_xyz_mm)}: expected three finite numbers x,y,z in LPS mm")
    check_diameter(diameter_mm, f"{point_name} diameter", image)
    centre = image.physical_to_index(point)
    if not image.contains_index(centre):
        lo, hi = physical_bounds(image)
        extent = ", ".join(f"{a} {mn:.1f}..{mx:.1f}" for a, mn, mx in zip("xyz", lo, hi, strict=True))
        hint = "check the coordinates are LPS mm (DICOM patient coordinates) for this image"
        flipped = point * np.array([-1.0, -1.0, 1.0])
        if image.contains_index(image.physical_to_index(flipped)):
            hint = (
                f"it looks like RAS coordinates (e.g. from 3D Slicer): negate x and y to use LPS, "
                f"i.e. {_fmt_xyz(flipped)}"
            )
        raise UserError(
            f"{point_name} {_fmt_xyz(point)} mm is outside the image, whose LPS extent is {extent} mm; {hint}"
        )
    near = np.clip(np.round(centre).astype(int), 0, np.asarray(image.shape) - 1)
    # Median of the 3x3x3 neighbourhood: robust to noise and a single odd voxel.
    nb = image.array[tuple(slice(max(c - 1, 0), c + 2) for c in near)]
    hu_at = float(np.median(nb))
    if hu_at < AIR_HU:
        raise UserError(
            f"{point_name} {_fmt_xyz(point)} mm is in air (HU {hu_at:.0f} < {AIR_HU:.0f}): outside the body "
            "(or in lung / bowel gas); check the coordinates are LPS mm on this image"
        )
    if method == "sphere":
        region = sphere_region(image, centre, diameter_mm, f"{point_name} {_fmt_xyz(point)} mm")
    else:
        region = grow_from_click(image, centre, diameter_mm, f"{point_name} {_fmt_xyz(point)} mm")
    crop, off = region.crop, region.offset
    m = _measure(image, crop, off)
    lesion = Lesion(
        lesion_id=lesion_id or _lesion_id(patient_id, 1),
        patient_id=patient_id,
        lesion_class=lesion_class,
        image=image_ref,
        mask="",
        label=None,
        source="click",
        **m,
        measurement=region.measurement,
    )
    return lesion, LesionMask(crop, tuple(int(o) for o in off), tuple(image.shape))


# ----------------------------------------------------------------------------- manifests


def _text(value) -> str:
    """A manifest cell as text ("" for None / NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    return str(value)


def _as_manifest(manifest: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    if isinstance(manifest, pd.DataFrame):
        return manifest
    from liverlesion.manifest import read_manifest

    return read_manifest(manifest)


def iter_manifest_lesions(
    manifest: str | os.PathLike | pd.DataFrame,
    tolerance: float = 1e-3,
    series: str | None = None,
    progress: bool = True,
    min_voxels: int = 1,
) -> Iterator[tuple[Volume, list[LesionWithMask]]]:
    """Read each image of a manifest once and yield it with its lesions.

    Rows are grouped by image (and series); each image and each mask file is read
    once; masks are checked against the image (``io.check_geometry``). Images come
    in order of first appearance in the manifest. Lesion IDs are
    ``{patient_id}-L{nn}``, numbered per patient in that processing order (rows in
    manifest order within an image), which equals manifest order whenever a
    patient's rows for one image are contiguous, and is stable across runs.

    Args:
        manifest: Manifest path, or a DataFrame from :func:`liverlesion.manifest.read_manifest`.
        tolerance: Geometry tolerance in mm between image and mask.
        series: SeriesInstanceUID for rows whose ``series`` is empty.
        progress: Show a progress bar over images (stderr).
        min_voxels: Mask components with fewer voxels are dropped.

    Yields:
        ``(image, [(Lesion, LesionMask), ...])``, one image at a time.
    """
    from tqdm.auto import tqdm

    from liverlesion.io import check_tolerance, read_volume
    from liverlesion.progress import progress_disabled

    check_tolerance(tolerance)  # before reading any image
    df = _as_manifest(manifest)
    groups: dict[tuple[str, str], list] = {}
    for rec in df.itertuples(index=False):
        key = (_text(rec.image_path), _text(getattr(rec, "series", "")) or (series or ""))
        groups.setdefault(key, []).append(rec)
    counters: dict[str, int] = {}
    seen: set[str] = set()  # lesion ids so far: a label mask's ids are its labels and may collide
    # `with` closes the bar when an error propagates, so the message starts on its own line.
    with tqdm(
        groups.items(),
        desc="lesions",
        unit="image",
        disable=not progress or progress_disabled(),
        file=sys.stderr,
    ) as bar:
        for (image_path, image_series), recs in bar:
            image = read_volume(
                image_path,
                series=image_series or None,
                kind="image",
                name=f"manifest row {recs[0].row} image",
            )
            yield image, _image_lesions(image, recs, counters, tolerance, min_voxels, seen)


def _image_lesions(
    image: Volume,
    recs: list,
    counters: dict[str, int],
    tolerance: float,
    min_voxels: int,
    seen: set[str] | None = None,
) -> list[LesionWithMask]:
    """Lesions of the manifest rows ``recs`` that share ``image``; ``counters`` numbers them per patient."""
    from liverlesion.dicom_seg import is_seg, seg_lesions
    from liverlesion.io import check_geometry, read_volume

    masks: dict[str, Volume] = {}  # a mask file shared by several rows (labels) is read once
    found: list[LesionWithMask] = []
    for rec in recs:
        pid = str(rec.patient_id)
        number = counters.get(pid, 0) + 1
        mask_path = _text(rec.mask_path)
        if mask_path and is_seg(mask_path):  # a DICOM SEG: its label selects segments
            items = seg_lesions(
                image,
                mask_path,
                rec.label,
                pid,
                str(rec.lesion_class),
                tolerance=tolerance,
                first_number=number,
                image_ref=str(rec.image),
                mask_ref=str(rec.mask),
                name=f"manifest row {rec.row} mask",
                image_name=f"manifest row {rec.row} image",
                min_voxels=min_voxels,
            )
        elif mask_path:
            mask = masks.get(mask_path)
            if mask is None:
                mask = read_volume(mask_path, kind="mask", name=f"manifest row {rec.row} mask")
                check_geometry(
                    image,
                    mask,
                    tolerance=tolerance,
                    image_name=f"manifest row {rec.row} image",
                    mask_name=f"manifest row {rec.row} mask",
                )
                masks[mask_path] = mask
            label = None if pd.isna(rec.label) else int(rec.label)
            items = lesions_from_mask(
                image,
                mask,
                label,
                pid,
                str(rec.lesion_class),
                first_number=number,
                image_ref=str(rec.image),
                mask_ref=str(rec.mask),
                mask_name=f"manifest row {rec.row} mask {rec.mask!r}",
                min_voxels=min_voxels,
            )
        else:
            items = [
                lesion_from_click(
                    image,
                    (rec.x_mm, rec.y_mm, rec.z_mm),
                    float(rec.diameter_mm),
                    pid,
                    str(rec.lesion_class),
                    lesion_id=_lesion_id(pid, number),
                    image_ref=str(rec.image),
                    point_name=f"manifest row {rec.row} click",
                )
            ]
        # A multi-label mask numbers its lesions by label: later rows continue after the largest.
        used = [int(str(les.lesion_id).rsplit("-L", 1)[1]) for les, _ in items]
        counters[pid] = max([number - 1 + len(items), *used])
        if seen is not None:
            for les, _ in items:
                if les.lesion_id in seen:
                    raise UserError(
                        f"manifest row {rec.row}: lesion id {les.lesion_id} is already taken by an earlier row "
                        "(a multi-label mask keeps its labels as lesion numbers); put the label mask's row "
                        "first for this patient, or select one label per row"
                    )
                seen.add(les.lesion_id)
        found.extend(items)
    return found


def lesion_table(
    manifest: str | os.PathLike | pd.DataFrame,
    tolerance: float = 1e-3,
    series: str | None = None,
    progress: bool = True,
    min_voxels: int = 1,
) -> pd.DataFrame:
    """The lesion table of a manifest (columns :data:`LESION_COLUMNS`), in lesion-ID order per image."""
    rows = [
        lesion.to_row()
        for _, items in iter_manifest_lesions(manifest, tolerance, series, progress, min_voxels)
        for lesion, _ in items
    ]
    table = pd.DataFrame(rows, columns=list(LESION_COLUMNS))
    table["label"] = table["label"].astype("Int64")
    return table


def summarize_lesions(table: pd.DataFrame) -> dict:
    """Summary numbers of a lesion table (patients, classes, sizes)."""
    d = table["max_axial_diameter_mm"].astype(float)
    per_patient = table.groupby("patient_id").size()
    return {
        "n_lesions": int(len(table)),
        "n_patients": int(table["patient_id"].nunique()),
        "lesions_per_class": {
            str(k): int(v) for k, v in table["lesion_class"].value_counts().sort_index().items()
        },
        "patients_per_class": {
            str(k): int(v)
            for k, v in table.groupby("lesion_class")["patient_id"].nunique().sort_index().items()
        },
        "lesions_per_patient": {
            "min": int(per_patient.min()),
            "median": float(per_patient.median()),
            "max": int(per_patient.max()),
        },
        "diameter_mm": {
            "median": float(d.median()),
            "q1": float(d.quantile(0.25)),
            "q3": float(d.quantile(0.75)),
            "lt10": int((d < 10).sum()),
            "10to20": int(((d >= 10) & (d <= 20)).sum()),
            "gt20": int((d > 20).sum()),
        },
        "volume_ml": {"min": float(table["volume_ml"].min()), "max": float(table["volume_ml"].max())},
    }


_SHOWN = (
    ("lesion_id", "lesion", "{}"),
    ("patient_id", "patient", "{}"),
    ("lesion_class", "class", "{}"),
    ("source", "source", "{}"),
    ("n_voxels", "voxels", "{}"),
    ("volume_ml", "mL", "{:.2f}"),
    ("max_axial_diameter_mm", "diam mm", "{:.1f}"),
    ("min_axis_mm", "min axis mm", "{:.1f}"),
    ("hu_mean", "HU mean", "{:.0f}"),
    ("hu_std", "HU sd", "{:.0f}"),
)


def _display_rows(table: pd.DataFrame, max_rows: int) -> list[list[str] | None]:
    """Formatted rows; None marks the gap when only the first/last rows are shown."""
    cols = [c for c, _, _ in _SHOWN]
    fmt = [
        [f.format(v) for (_, _, f), v in zip(_SHOWN, r, strict=True)]
        for r in table[cols].itertuples(index=False)
    ]
    if len(fmt) <= max_rows:
        return list(fmt)
    head = max_rows // 2
    return [*fmt[:head], None, *fmt[len(fmt) - (max_rows - head) :]]


def _summary_lines(s: dict) -> list[str]:
    dm = s["diameter_mm"]
    lpp = s["lesions_per_patient"]
    classes = ", ".join(
        f"{k} {v} (in {s['patients_per_class'][k]} patient{'s' if s['patients_per_class'][k] != 1 else ''})"
        for k, v in s["lesions_per_class"].items()
    )
    return [
        f"patients: {s['n_patients']}   lesions: {s['n_lesions']}",
        f"lesions per class: {classes}",
        f"lesions per patient: min {lpp['min']}, median {lpp['median']:g}, max {lpp['max']}",
        f"max axial diameter: median {dm['median']:.1f} mm (IQR {dm['q1']:.1f}-{dm['q3']:.1f}); "
        f"<10 mm: {dm['lt10']}, 10-20 mm: {dm['10to20']}, >20 mm: {dm['gt20']}",
        f"volume: {s['volume_ml']['min']:.3g}-{s['volume_ml']['max']:.3g} mL",
    ]


def print_lesion_table(table: pd.DataFrame, max_rows: int = 20, file=None) -> None:
    """Print a compact lesion table (first/last rows when long) and its summary."""
    file = file or sys.stdout
    rows = _display_rows(table, max_rows)
    hidden = len(table) - sum(r is not None for r in rows)
    lines = _summary_lines(summarize_lesions(table)) if len(table) else ["no lesions"]
    if "measurement" in table and (
        n_est := int(table["measurement"].astype(str).str.startswith("estimated").sum())
    ):
        lines.append(
            f"{n_est} lesion(s) from clicks: sizes and HU estimated from the click, not measured on a mask"
        )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: plain text
        widths = [max([len(h)] + [len(r[i]) for r in rows if r]) for i, (_, h, _) in enumerate(_SHOWN)]
        print("  ".join(h.rjust(w) for (_, h, _), w in zip(_SHOWN, widths, strict=True)), file=file)
        for r in rows:
            text = (
                f"... {hidden} more lesions ..."
                if r is None
                else "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True))
            )
            print(text, file=file)
        print("\n".join(lines), file=file)
        print(f"({DISCLAIMER})", file=file)
        return
    console = Console(file=file, width=max(120, Console(file=file).width), highlight=False)
    t = Table(title=f"Lesions ({len(table)})", title_justify="left", show_edge=False, pad_edge=False)
    for i, (_, header, _) in enumerate(_SHOWN):
        t.add_column(header, justify="left" if i < 4 else "right", no_wrap=True)
    for r in rows:
        if r is None:
            t.add_row(f"... {hidden} more", *[""] * (len(_SHOWN) - 1))
        else:
            t.add_row(*r)
    console.print(t)
    for line in lines:
        console.print(line, markup=False)
    console.print(f"({DISCLAIMER})", markup=False)


def inspect_manifest(
    manifest: str | os.PathLike,
    out: str | os.PathLike | None = None,
    tolerance: float = 1e-3,
    series: str | None = None,
) -> pd.DataFrame:
    """Compute the lesion table of a manifest, print it with a summary, optionally write it.

    Args:
        manifest: Manifest CSV.
        out: Write the lesion table here as CSV (atomically).
        tolerance: Geometry tolerance in mm between image and mask.
        series: SeriesInstanceUID for rows whose ``series`` is empty.

    Returns:
        The lesion table.
    """
    from liverlesion.fileio import write_csv

    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise UserError(f"--out {out}: is a folder; give a CSV file path, e.g. {out / 'lesions.csv'}")
        if out.resolve() == Path(manifest).resolve():
            raise UserError(f"--out {out}: is the manifest itself; give another file name, e.g. lesions.csv")
    table = lesion_table(manifest, tolerance=tolerance, series=series)
    if out is not None:
        write_csv(out, table)
    print_lesion_table(table)
    if out is not None:
        print(f"wrote {out}")
    return table
