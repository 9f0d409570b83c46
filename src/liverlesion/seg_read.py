"""Read a DICOM SEG (Segmentation object) as a lesion label mask on its CT's grid, with highdicom.

Each segment becomes the label of its number (segment 3 -> label 3 -> lesion ``case-L03``). The
SEG's frames are assembled into a volume by highdicom (``Segmentation.get_volume``) and put on the
CT's voxel grid by their patient coordinates (nearest neighbour), so a SEG that covers only some
slices, or stores them in another order, lands where it belongs.
"""

from __future__ import annotations

import os

import numpy as np

from liverlesion.errors import UserError
from liverlesion.volume import Volume

__all__ = ["read_seg_mask"]

_MAX_SEGMENTS = 500


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_seg_mask(path: str | os.PathLike, image: Volume, name: str = "mask") -> Volume:
    """The segments of a DICOM SEG as a label volume on ``image``'s grid.

    Args:
        path: The SEG file (``.dcm``).
        image: The CT the segmentation was drawn on.
        name: How the SEG is named in error messages.

    Returns:
        ``image.with_array(labels)``: uint16, each voxel its segment number (0 outside); where
        segments overlap, the higher number wins.

    Raises:
        UserError: Not a DICOM SEG, drawn on another frame of reference, frames that do not form
            a volume, or no segment voxel inside the CT.
    """
    import highdicom as hd
    import SimpleITK as sitk

    try:
        seg = hd.seg.segread(path)
    except Exception as e:
        raise UserError(
            f"{name}: not a DICOM SEG ({_first_line(e)}); give the Segmentation object drawn on this CT, "
            "or a NIfTI mask"
        ) from None
    ref = image.dicom
    seg_for = str(getattr(seg, "FrameOfReferenceUID", "") or "")
    if ref is not None and ref.frame_of_reference_uid and seg_for and seg_for != ref.frame_of_reference_uid:
        raise UserError(
            f"{name}: drawn on another frame of reference than the CT (a SEG of another series or "
            "scan); give the SEG drawn on this CT"
        )
    numbers = [int(n) for n in seg.segment_numbers]
    if not numbers or max(numbers) > _MAX_SEGMENTS:
        raise UserError(
            f"{name}: segment numbers {numbers[:5]}...: expected 1..{_MAX_SEGMENTS} lesion segments"
        )
    try:
        vol = seg.get_volume(combine_segments=True, relabel=False, skip_overlap_checks=True, dtype=np.uint16)
    except Exception as e:
        raise UserError(
            f"{name}: its frames do not form a volume ({_first_line(e)}); export the segmentation as NIfTI"
        ) from None
    arr = np.asarray(vol.array)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise UserError(
            f"{name}: frames of shape {arr.shape} do not form one 3-D label volume; export as NIfTI"
        )
    aff = np.asarray(vol.affine, dtype=float)
    steps = aff[:3, :3]  # column c: the LPS step of array axis c (slice, row, column)
    spacing = np.linalg.norm(steps, axis=0)
    units = steps / spacing
    src = sitk.GetImageFromArray(
        np.ascontiguousarray(arr)
    )  # sitk's (x, y, z) = the array's (col, row, slice)
    src.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    src.SetOrigin(tuple(float(o) for o in aff[:3, 3]))
    src.SetDirection(tuple(float(v) for v in units[:, ::-1].ravel()))
    grid = sitk.Image([int(n) for n in image.shape[::-1]], sitk.sitkUInt8)
    grid.SetSpacing(image.spacing_xyz)
    grid.SetOrigin(image.origin)
    grid.SetDirection(tuple(float(v) for v in image.direction.ravel()))
    out = sitk.Resample(src, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    labels = sitk.GetArrayFromImage(out)
    if not labels.any():
        raise UserError(f"{name}: no segment voxel falls inside the CT; give the SEG drawn on this CT")
    return image.with_array(labels.astype(np.uint16), source=str(path), format="DICOM SEG")
