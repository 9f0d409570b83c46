"""Image-vs-mask geometry: does a mask lie on the image's voxel grid (within a tolerance in mm)."""

from __future__ import annotations

import math

import numpy as np

from liverlesion.errors import UserError
from liverlesion.io.common import format_values
from liverlesion.volume import Grid, Volume


def check_geometry(
    image: Volume | Grid,
    mask: Volume | Grid,
    tolerance: float = 1e-3,
    image_name: str = "image",
    mask_name: str = "mask",
) -> None:
    """Check that a mask lies on exactly the image's voxel grid.

    The one comparison for loaded volumes and for the grids their headers give (``io.read_grid``):
    the same rules and the same message either way.

    Args:
        image: The CT volume, or its header's :class:`~liverlesion.volume.Grid`.
        mask: The mask volume, or its header's grid.
        tolerance: Largest allowed absolute difference in spacing/origin (mm) and direction cosines.
        image_name: How to call the image in the message (e.g. ``"--image"``).
        mask_name: How to call the mask in the message.

    Raises:
        UserError: One line with both geometries and how to fix it (or a bad ``tolerance``).
    """
    check_tolerance(tolerance)
    problems = []
    if tuple(image.shape) != tuple(mask.shape):
        problems.append("shape")
    spacing_diff = float(np.max(np.abs(np.subtract(image.spacing, mask.spacing))))
    origin_diff = float(np.max(np.abs(np.subtract(image.origin, mask.origin))))
    direction_diff = float(np.max(np.abs(image.direction - mask.direction)))
    if spacing_diff > tolerance:
        problems.append(f"spacing (differs by {spacing_diff:.4g} mm)")
    if origin_diff > tolerance:
        problems.append(f"origin (differs by {origin_diff:.4g} mm)")
    if direction_diff > tolerance:
        problems.append(f"direction (differs by {direction_diff:.4g})")
    if not problems:
        return

    def describe(v: Volume | Grid) -> str:
        text = f"shape {tuple(v.shape)} spacing {format_values(v.spacing, 4)} origin {format_values(v.origin, 3)}"
        if direction_diff > tolerance:
            text += f" direction {format_values(v.direction.ravel(), 3)}"
        return text

    only_rounding = "shape" not in problems and max(spacing_diff, origin_diff, direction_diff) < 0.05
    hint = (
        f"if this is only rounding, raise --tolerance (now {tolerance:g}) above {max(spacing_diff, origin_diff):.3g}; "
        if only_rounding
        else ""
    )
    raise UserError(
        f"{mask_name} does not match {image_name} in {', '.join(problems)}: "
        f"{image_name} {describe(image)} (z,y,x / x,y,z mm, LPS); {mask_name} {describe(mask)}; "
        f"{hint}otherwise resample the mask onto the image grid with nearest-neighbour, e.g. "
        f"SimpleITK.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0), and check it is the mask of this image"
    )


def check_tolerance(tolerance: float, name: str = "--tolerance") -> None:
    """Refuse a geometry tolerance that is negative or not a finite number (mm).

    Raises:
        UserError: Naming ``name`` and the value.
    """
    try:
        ok = math.isfinite(float(tolerance)) and float(tolerance) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(
            f"{name} {tolerance!r}: must be a finite number of mm, 0 or more (e.g. 0.001, or 0.01 for rounded headers)"
        )
