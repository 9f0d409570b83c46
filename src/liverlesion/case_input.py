"""Checks of what a caller hands the classifier: the CT volume, a click point, a mask, the minimum size.

Each refuses bad input with one :class:`~liverlesion.errors.UserError` line naming the input,
before any work is done (``predict``, the Python API and ``serve`` share them).
"""

from __future__ import annotations

import math

import numpy as np

from liverlesion.errors import UserError
from liverlesion.io import check_geometry
from liverlesion.volume import Volume

__all__ = ["check_ct_volume", "check_min_size", "mask_volume", "parse_point"]

# Spacing beyond this is not a CT voxel (mm); usually a unit error (cm / m) in a converted file.
_MAX_SPACING_MM = 50.0
# Finer than any clinical CT (ultra-high-resolution CT: 0.15-0.25 mm): spacing in metres or a broken header. Left
# through, a 16 mm lesion crop spans millions of voxels (at 1e-5 mm predict ran out of memory after a long wait).
_MIN_SPACING_MM = 0.05
# A CT in HU spans hundreds (fat -100 to contrast-filled vessels 200, air -1000); normalised or
# rescaled intensities (z-scores, [-1, 1], HU / 1000) span a few units.
_MIN_HU_SPAN = 100.0
# Beyond any HU a scanner stores (int16 padding -32768 less an intercept; metal ~30000): a wrong scale factor.
_MAX_ABS_HU = 1e5
# A volume of whole numbers 0..255 is a label mask (a CT without its rescale still spans 0 to 1000s).
_MAX_MASK_LABEL = 255
# Inverted intensities (a negative rescale slope, e.g. NIfTI scl_slope -1): air, the lungs and the padding
# outside the body become +1000 HU or more. In real CT only bone, contrast and metal exceed +500 HU, a few
# per cent of the voxels (3D-IRCADb patient 1: 0.6%), always far fewer than the air below -500 HU (46% there).
# So: refuse when over _INVERTED_MIN_FRACTION of the voxels are above +_AIR_LIKE_HU and they outnumber the
# voxels below -_AIR_LIKE_HU by _INVERTED_RATIO.
# A tight crop with no air (under _AIRLESS_FRACTION of its voxels below -_AIR_LIKE_HU) is told by its median
# instead: air-free crops centred in the liver of 3D-IRCADb patient 1 (744 of 8-64 mm) had medians of +48 HU
# or more (the parenchyma), so their inversions -48 or less; only crops of mostly fat, which hold no liver to
# classify, reach below _AIRLESS_MIN_MEDIAN_HU.
_AIR_LIKE_HU = 500.0
_INVERTED_MIN_FRACTION = 0.10
_INVERTED_RATIO = 2.0
_AIRLESS_FRACTION = 0.01
_AIRLESS_MIN_MEDIAN_HU = -40.0


def parse_point(text: str, name: str = "--point") -> tuple[float, float, float]:
    """Parse ``"x,y,z"`` (LPS mm) into three finite floats.

    Raises:
        UserError: Not three comma-separated finite numbers.
    """
    parts = [p.strip() for p in str(text).strip().strip("()[]").split(",")]
    if len(parts) != 3 or not all(parts):
        raise UserError(
            f'{name} {text!r}: expected three comma-separated numbers x,y,z in LPS mm, e.g. {name} "-12.5,40,101"'
        )
    try:
        values = tuple(float(p) for p in parts)
    except ValueError as exc:
        raise UserError(
            f'{name} {text!r}: not numbers; expected x,y,z in LPS mm, e.g. {name} "-12.5,40,101"'
        ) from exc
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{name} {text!r}: coordinates must be finite numbers (x,y,z in LPS mm)")
    return values  # type: ignore[return-value]


def check_ct_volume(volume: Volume, name: str = "image") -> None:
    """Refuse volumes that cannot be CT in Hounsfield units with usable geometry.

    Readers already refuse 2-D images, non-CT DICOM modalities and NIfTI headers with zero or
    negative voxel sizes; this catches what reaches us as an in-memory Volume: bad or absurd spacing, a non-CT
    modality recorded in ``meta``, and values that were never rescaled to HU.

    Raises:
        UserError: One line naming ``name``.
    """
    spacing = np.asarray(volume.spacing, dtype=float)
    if (
        not np.all(np.isfinite(spacing))
        or np.any(spacing < _MIN_SPACING_MM)
        or np.any(spacing > _MAX_SPACING_MM)
    ):
        raise UserError(
            f"{name}: voxel spacing {tuple(float(f'{s:.4g}') for s in spacing)} mm (z, y, x) is not a CT geometry "
            f"(each must be {_MIN_SPACING_MM:g} to {_MAX_SPACING_MM:g} mm); the file's header is broken or not in mm: "
            "re-export the CT with its real spacing (e.g. from DICOM with dcm2niix)"
        )
    if not np.all(np.isfinite(volume.direction)) or abs(abs(np.linalg.det(volume.direction)) - 1) > 1e-2:
        raise UserError(
            f"{name}: direction matrix {np.round(volume.direction.ravel(), 3).tolist()} is not a rotation; "
            "re-export the CT with valid orientation"
        )
    modality = str(volume.meta.get("modality") or "").upper()
    if modality and modality != "CT":
        raise UserError(
            f"{name}: modality {modality}, not CT; this tool works on CT in Hounsfield units: pass a CT series"
        )
    if min(volume.shape) < 2:
        raise UserError(
            f"{name}: shape {volume.shape} (z, y, x) is not a 3-D volume; pass the whole CT series"
        )
    lo, hi = float(np.min(volume.array)), float(np.max(volume.array))
    why = (
        f"whole numbers from {lo:g} to {hi:g} only, as in a label mask (were the image and the mask swapped?)"
        if lo >= 0 and hi <= _MAX_MASK_LABEL and np.array_equal(volume.array, np.round(volume.array))
        else "no negative values"
        if lo >= 0
        else f"values span only {hi - lo:.3g}"
        if hi - lo < _MIN_HU_SPAN
        else f"values beyond +-{_MAX_ABS_HU:g}"
        if max(-lo, hi) > _MAX_ABS_HU
        else None
    )
    if why and volume.meta.get("rescale_absent"):
        why += ", and the DICOM series has no RescaleSlope or RescaleIntercept to convert its stored values"
    if why:
        raise UserError(
            f"{name}: {why} (min {lo:g}, max {hi:g}); CT in Hounsfield units has air near -1000 and fat near "
            "-100, so this is not CT in HU (rescale slope/intercept not applied or wrong, intensities normalised, "
            "or not a CT): convert it to HU"
        )
    _check_not_inverted(volume.array, name)


def _check_not_inverted(array: np.ndarray, name: str) -> None:
    """Refuse intensities that look inverted: air brighter than tissue, or, in a crop with no air, a median
    below any crop around the liver's (see ``_AIR_LIKE_HU``)."""
    sample = array[:, ::2, ::2]  # a quarter of the voxels: fractions of a few per cent are stable
    bright = float(np.count_nonzero(sample > _AIR_LIKE_HU)) / max(sample.size, 1)
    dark = float(np.count_nonzero(sample < -_AIR_LIKE_HU)) / max(sample.size, 1)
    if bright >= _INVERTED_MIN_FRACTION and bright > _INVERTED_RATIO * dark:
        raise UserError(
            f"{name}: intensities look inverted: {100 * bright:.0f}% of the voxels are above "
            f"+{_AIR_LIKE_HU:g} and only {100 * dark:.2g}% below -{_AIR_LIKE_HU:g}, where CT in Hounsfield "
            "units has air (around the body, in the lungs) near -1000, darker than tissue; the rescale slope is "
            "probably negative (e.g. NIfTI scl_slope < 0): re-export the CT in HU with a positive slope"
        )
    if dark < _AIRLESS_FRACTION:
        median = float(np.median(sample))
        if median < _AIRLESS_MIN_MEDIAN_HU:
            raise UserError(
                f"{name}: a crop with no air whose median is {median:g} HU, where one around the liver is above "
                "0 HU: "
                "the intensities look inverted (a negative rescale slope, e.g. NIfTI scl_slope < 0) or the crop "
                "holds no liver; pass the CT in HU with a positive slope, cropped around the liver or not at all"
            )


def check_min_size(min_size_mm: float) -> None:
    """Refuse a minimum lesion size that is not 0 or a positive number of mm.

    Raises:
        UserError: One line naming ``--min-size-mm``.
    """
    if not (math.isfinite(float(min_size_mm)) and min_size_mm >= 0):
        raise UserError(f"--min-size-mm {min_size_mm}: must be 0 or a positive number of mm (default 5)")


def mask_volume(
    volume: Volume, mask: Volume | np.ndarray, tolerance: float, image_name: str, mask_name: str
) -> Volume:
    """The lesion mask as a Volume on ``volume``'s grid (a Volume is checked, an array given its geometry).

    Raises:
        UserError: Geometry or shape differs from the image.
    """
    if isinstance(mask, Volume):
        check_geometry(volume, mask, tolerance=tolerance, image_name=image_name, mask_name=mask_name)
        return mask
    arr = np.asarray(mask)
    if arr.shape != volume.shape:
        raise UserError(
            f"{mask_name}: array shape {arr.shape} (z, y, x) differs from {image_name}'s {volume.shape}; "
            "give the mask drawn on this image"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    return volume.with_array(arr, source="")
