"""Lesion records from masks or clicks (the lesions of a manifest: :mod:`liverlesion.manifest_lesions`).

A lesion is a set of voxels of one image: a connected component of a mask, one
label of a label mask, or a region grown from a clicked point (``lesion_from_click``,
in :mod:`liverlesion.click`). Each is measured in
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
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from liverlesion.errors import UserError
from liverlesion.lesion_measure import measure_lesion
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
AIR_THRESHOLD_HU = -500.0


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


def make_lesion_id(patient_id: str, number: int) -> str:
    return f"{patient_id}-L{number:02d}"


def foreground_box(arr: np.ndarray) -> tuple[slice, slice, slice] | None:
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


# ----------------------------------------------------------------------------- lesion source

#: The problems :func:`lesion_source_problem` reports, in the order it checks them.
LESION_SOURCE_PROBLEMS = (
    "both",  # a mask and a point
    "neither",  # no mask and no point
    "label-without-mask",  # a label selects a lesion in a mask
    "point-without-diameter",  # a click needs the lesion's diameter
    "diameter-without-point",  # a diameter only goes with a click
)


def lesion_source_problem(
    mask_given: bool,
    point_given: bool,
    label_given: bool = False,
    diameter_given: bool | None = None,
    require_one: bool = True,
) -> str | None:
    """The rule every front end (Python API, CLI, web form) applies to a lesion's source.

    A lesion comes from exactly one of a mask or a clicked point; a label selects a lesion in a
    mask; a point needs a diameter and a diameter goes with a point. Each front end words the
    message for its own inputs (options, arguments, form fields).

    Args:
        mask_given: A mask was given.
        point_given: A point (click) was given.
        label_given: A label was given.
        diameter_given: A diameter was given (None: not checked here).
        require_one: Check that exactly one of mask / point is given (False where a caller has
            another source too, e.g. ``--manifest``, and checked that itself).

    Returns:
        None when the combination is valid, else the first problem found, one of
        :data:`LESION_SOURCE_PROBLEMS`.
    """
    if require_one and mask_given and point_given:
        return "both"
    if require_one and not mask_given and not point_given:
        return "neither"
    if label_given and not mask_given:
        return "label-without-mask"
    if diameter_given is not None and point_given and not diameter_given:
        return "point-without-diameter"
    if diameter_given and not point_given:
        return "diameter-without-point"
    return None


# ----------------------------------------------------------------------------- masks

#: A lesion mask whose foreground covers more than this fraction of the body (voxels above
#: :data:`AIR_THRESHOLD_HU`) is not a lesion mask (a body/organ mask, or an image passed as the mask).
MAX_BODY_FRACTION = 0.5
#: More connected components than this in a lesion mask is not plausible.
MAX_COMPONENTS = 500
#: A mask lesion of at least this many voxels whose mean HU is below :data:`AIR_THRESHOLD_HU` lies in
#: air (outside the body, lung or gas): the mask is not drawn on this image (another patient's, or
#: flipped / shifted). Fewer voxels: a speck, which the size rule reports as too small to characterise.
MIN_AIR_LESION_VOXELS = 10


def check_mask_foreground(
    image: Volume, mask: Volume, mask_name: str = "mask", box: tuple[slice, slice, slice] | None = None
) -> None:
    """Refuse masks that cannot be lesion masks, cheaply (before any per-lesion work).

    Refused: foreground touching all six faces of the volume (e.g. a mask that is 1
    everywhere), and foreground covering more than :data:`MAX_BODY_FRACTION` of the body
    (voxels above :data:`AIR_THRESHOLD_HU` in ``image``).

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
        box = foreground_box(arr)
    if box is None:
        return
    hint = (
        "give the lesion mask (lesions > 0, background 0), not a liver/body mask or an image; "
        "check --image and --mask are not swapped"
    )
    if tuple(s.stop - s.start for s in box) == tuple(arr.shape):
        raise UserError(f"{mask_name}: the foreground touches all six faces of the volume; {hint}")
    n_fg = int(np.count_nonzero(arr[box] > 0))
    n_body = int(np.count_nonzero(image.array > AIR_THRESHOLD_HU))
    if n_fg > MAX_BODY_FRACTION * max(n_body, 1):
        pct = 100.0 * n_fg / max(n_body, 1)
        raise UserError(
            f"{mask_name}: the foreground ({n_fg} voxels) covers {pct:.0f}% of the body (voxels above "
            f"{AIR_THRESHOLD_HU:.0f} HU), more than {100 * MAX_BODY_FRACTION:.0f}%; {hint}"
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
    box = foreground_box(arr)
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
            sub = foreground_box(sel)
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
        sub = foreground_box(sel)
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
        m = measure_lesion(image, crop, off)
        lesion_id = make_lesion_id(patient_id, numbers[i] if numbers is not None else first_number + i)
        if m["n_voxels"] >= MIN_AIR_LESION_VOXELS and m["hu_mean"] < AIR_THRESHOLD_HU:
            which = (
                f"label {numbers[i] if numbers is not None else label}"
                if numbers is not None or label is not None
                else f"component {i + 1} of {len(lesions)}"
            )
            raise UserError(
                f"{mask_name}: lesion {lesion_id} ({which}, {m['n_voxels']} voxels at LPS "
                f"{tuple(round(float(c), 1) for c in m['centroid_mm'])} mm) lies in air: its mean is "
                f"{m['hu_mean']:.0f} HU, below {AIR_THRESHOLD_HU:.0f} HU, where a lesion is tissue; the mask "
                "does not fit this image (another patient's or series' mask, or flipped / shifted): give the "
                "mask drawn on this image, or remove that lesion from it"
            )
        lesion = Lesion(
            lesion_id=lesion_id,
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
