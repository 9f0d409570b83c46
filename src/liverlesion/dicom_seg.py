"""DICOM Segmentation (SEG) objects as lesion masks: read with highdicom onto a CT's voxel grid.

Reading. A SEG works wherever a mask works (manifest ``mask`` column, ``predict --mask``,
``serve`` through :func:`seg_mask`). It is recognised by its SOP Class UID (Segmentation
Storage, ``1.2.840.10008.5.1.4.1.1.66.4``), never by its name. A *selector* (empty, a segment
number, a SegmentLabel or a label pattern) chooses segments; the header checks and the selectors
are :mod:`liverlesion.seg_select`.

The selected segments are painted into a label map on the CT grid whose values are the
segment numbers, so everything downstream (lesions, patches, SR) works unchanged. A number,
or an exact label naming one segment, makes that segment **one lesion** (as label N of a label
mask); an empty selector, a pattern, or a label several segments share gives **one lesion per
connected component** of the selected segments' union (as an empty label). Either way each
lesion is referred to by the segment that holds it (its ``label`` is that segment number).
A label map cannot hold overlapping segments: when selected segments overlap the SEG is
refused, naming them (select one segment per manifest row instead).

Each SEG frame is placed by its own ImagePositionPatient / ImageOrientationPatient /
PixelSpacing onto the CT voxel grid, so a SEG on a subset of slices, in any in-plane
orientation, works; a frame off the grid is refused. For a DICOM CT the SEG must reference
the CT's SeriesInstanceUID (otherwise it is refused, naming both UIDs). For a NIfTI/NRRD CT
there is no UID to compare: the frames are placed by physical position alone and a warning
says so.

Writing is :mod:`liverlesion.seg_write`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion.errors import UserError
from liverlesion.seg_select import (
    Segment,
    Selector,
    names_one_segment,
    read_seg_header,
    read_seg_segments,
    segment_listing,
    select_segments,
)
from liverlesion.volume import Volume

log = logging.getLogger(__name__)

__all__ = [
    "referenced_series",
    "seg_labelmap",
    "seg_mask",
    "seg_lesions",
    "segment_of",
    "union_if_several",
    "label_by_segment",
]

_OVERLAP_HINT = "select one segment per manifest row (label column, or --label)"


# ----------------------------------------------------------------------------- reading


def _referenced_series(ds) -> list[str]:
    uids = [str(i.get("SeriesInstanceUID", "")) for i in ds.get("ReferencedSeriesSequence", []) or []]
    for study in ds.get("StudiesContainingOtherReferencedInstancesSequence", []) or []:
        uids += [str(i.get("SeriesInstanceUID", "")) for i in study.get("ReferencedSeriesSequence", []) or []]
    return [u for u in dict.fromkeys(uids) if u]


def referenced_series(path: str | os.PathLike, name: str = "mask") -> list[str]:
    """The SeriesInstanceUIDs a SEG file references (header only)."""
    return _referenced_series(read_seg_header(Path(path), name))


def _check_reference(ds, image: Volume, path: Path, name: str, image_name: str) -> None:
    refs = _referenced_series(ds)
    ref = image.dicom
    ct_series = ref.series_instance_uid if ref is not None else None
    if ct_series is None:
        log.warning(
            "%s %s: %s is not a DICOM series, so the SEG's referenced series cannot be checked; "
            "its frames are placed by physical position (LPS mm) alone",
            name,
            path,
            image_name,
        )
        return
    if refs:
        if ct_series not in refs:
            raise UserError(
                f"{name} {path}: the DICOM SEG references series {', '.join(refs)} but {image_name} is series "
                f"{ct_series}; give the CT series the SEG was drawn on, or the SEG of this CT"
            )
        return
    seg_for = str(ds.get("FrameOfReferenceUID", "") or "")
    if seg_for and ref.frame_of_reference_uid and seg_for != ref.frame_of_reference_uid:
        raise UserError(
            f"{name} {path}: the DICOM SEG references no series and its frame of reference {seg_for} is not "
            f"{image_name}'s {ref.frame_of_reference_uid}; give the CT series the SEG was drawn on"
        )
    log.warning("%s %s: the DICOM SEG names no referenced series; placed by physical position", name, path)


def _group(ds, frame_item, keyword: str, path: Path, name: str):
    if frame_item is not None and keyword in frame_item:
        return frame_item[keyword].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and keyword in shared[0]:
        return shared[0][keyword].value[0]
    raise UserError(
        f"{name} {path}: the DICOM SEG lacks {keyword} (frame geometry); re-export it from the segmentation tool"
    )


def _frame_pixels(ds, path: Path, name: str) -> np.ndarray:
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as e:  # noqa: BLE001 - truncated / undecodable pixel data
        raise UserError(
            f"{name} {path}: the DICOM SEG's pixel data cannot be decoded ({e}); the file may be truncated: "
            "copy or export it again"
        ) from e
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[0] != n:
        raise UserError(
            f"{name} {path}: the DICOM SEG says {n} frames but holds {pixels.shape[0]}; copy or export it again"
        )
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        return pixels >= 0.5 * float(ds.get("MaximumFractionalValue", 255) or 255)
    return pixels > 0


def _unit_axis(step: np.ndarray) -> tuple[int, int] | None:
    """(axis, sign) when ``step`` (CT index units) is one in-plane voxel along a CT axis."""
    k = int(np.argmax(np.abs(step)))
    target = np.zeros(3)
    target[k] = np.sign(step[k])
    if k == 0 or np.max(np.abs(step - target)) > 1e-3:
        return None
    return k, int(target[k])


def seg_labelmap(
    path: str | os.PathLike,
    image: Volume,
    selector: Selector = None,
    *,
    tolerance: float = 1e-3,
    name: str = "mask",
    image_name: str = "image",
    overlap_hint: str = _OVERLAP_HINT,
) -> tuple[Volume, list[Segment]]:
    """Read a SEG onto the CT grid as a label map (value = segment number) of the selected segments.

    Args:
        path: The SEG file.
        image: The CT the SEG was drawn on.
        selector: Which segments (see the module docstring).
        tolerance: Largest distance (mm) of a frame's position from the CT voxel grid.
        name: How the SEG is named in messages.
        image_name: How the CT is named in messages.
        overlap_hint: What the message on overlapping segments tells the user to do.

    Returns:
        ``(labels, segments)``: an integer Volume on ``image``'s grid and the selected segments.

    Raises:
        UserError: Not a SEG, no segments, no match, wrong series, frames off the grid or outside
            the CT, undecodable pixels, or overlapping selected segments.
    """
    import highdicom as hd

    path = Path(path)
    segs = read_seg_segments(path, name)
    chosen = select_segments(segs, selector, name)
    try:
        ds = hd.seg.segread(path)
    except Exception as e:  # noqa: BLE001 - highdicom rejects a malformed SEG
        raise UserError(f"{name} {path}: not a valid DICOM SEG ({e}); re-export the segmentation") from e
    _check_reference(ds, image, path, name, image_name)
    wanted = {s.number: s for s in chosen}
    pixels = _frame_pixels(ds, path, name)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []) or [])
    if len(per_frame) != pixels.shape[0]:
        raise UserError(
            f"{name} {path}: the DICOM SEG has {pixels.shape[0]} frames but {len(per_frame)} frame descriptions; "
            "re-export it"
        )
    labels = np.zeros(image.shape, dtype=np.uint16 if max(wanted) > 255 else np.uint8)
    spacing = np.asarray(image.spacing)
    overlaps: dict[tuple[int, int], int] = {}
    for f, item in enumerate(per_frame):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number not in wanted or not pixels[f].any():
            continue
        iop = np.asarray(
            _group(ds, item, "PlaneOrientationSequence", path, name).ImageOrientationPatient, float
        )
        row_sp, col_sp = (
            float(v) for v in _group(ds, item, "PixelMeasuresSequence", path, name).PixelSpacing
        )
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        origin = image.physical_to_index(ipp)
        along_col = image.physical_to_index(ipp + iop[:3] * col_sp) - origin  # one column step
        along_row = image.physical_to_index(ipp + iop[3:] * row_sp) - origin  # one row step
        start = np.round(origin)
        off_mm = float(np.max(np.abs(origin - start) * spacing))
        col_axis, row_axis = _unit_axis(along_col), _unit_axis(along_row)
        if col_axis is None or row_axis is None or col_axis[0] == row_axis[0] or off_mm > tolerance:
            why = (
                f"its position is {off_mm:.4g} mm off the CT voxel grid (tolerance {tolerance:g} mm)"
                if col_axis and row_axis and col_axis[0] != row_axis[0]
                else "its pixel spacing or orientation differs from the CT's"
            )
            raise UserError(
                f"{name} {path}: frame {f + 1} (segment {wanted[number]}) does not lie on {image_name}'s voxel grid: "
                f"{why}; resample the segmentation onto this CT (nearest neighbour), or raise --tolerance if it is "
                "only rounding"
            )
        rr, cc = np.nonzero(pixels[f])
        idx = np.zeros((len(rr), 3), dtype=np.int64)
        idx[:] = start.astype(np.int64)
        idx[:, row_axis[0]] += row_axis[1] * rr
        idx[:, col_axis[0]] += col_axis[1] * cc
        inside = np.all((idx >= 0) & (idx < np.asarray(image.shape)), axis=1)
        if not inside.all():
            raise UserError(
                f"{name} {path}: frame {f + 1} (segment {wanted[number]}) has {int((~inside).sum())} voxel(s) outside "
                f"{image_name} (shape {image.shape} z,y,x); give the CT series the SEG was drawn on"
            )
        z, y, x = idx.T
        current = labels[z, y, x]
        clash = (current != 0) & (current != number)
        if clash.any():
            for other, n in zip(*np.unique(current[clash], return_counts=True), strict=True):
                key = (int(other), number)
                overlaps[key] = overlaps.get(key, 0) + int(n)
        labels[z, y, x] = number
    if overlaps:
        (a, b), n = next(iter(overlaps.items()))
        more = f" (and {len(overlaps) - 1} more pair(s))" if len(overlaps) > 1 else ""
        raise UserError(
            f"{name} {path}: segments {wanted[a]} and {wanted[b]} overlap in {n} voxel(s){more}; one mask cannot "
            f"hold overlapping lesions: {overlap_hint}"
        )
    volume = image.with_array(labels, source=str(path), format="dicom-seg")
    return volume, chosen


def seg_mask(
    path: str | os.PathLike,
    image: Volume,
    selector: Selector = None,
    *,
    tolerance: float = 1e-3,
    name: str = "mask",
    image_name: str = "image",
    overlap_hint: str = _OVERLAP_HINT,
) -> tuple[Volume, int | None]:
    """A SEG as ``(mask, label)`` for :func:`liverlesion.lesions.lesions_from_mask` (and ``serve``).

    ``label`` is the segment number when a number or an exact label selects one segment (one
    lesion), else None (every connected component is a lesion: an empty selector, a pattern,
    or a label that several segments share).
    """
    labels, chosen = seg_labelmap(
        path,
        image,
        selector,
        tolerance=tolerance,
        name=name,
        image_name=image_name,
        overlap_hint=overlap_hint,
    )
    if len(chosen) == 1 and names_one_segment(selector):
        if not labels.array.any():
            raise UserError(
                f"{name} {path}: segment {chosen[0]} is empty on {image_name}; choose another segment"
            )
        return labels, chosen[0].number
    if not labels.array.any():
        raise UserError(
            f"{name} {path}: the selected segments ({segment_listing(chosen)}) are all empty on {image_name}; "
            "choose other segments"
        )
    return labels, None


def segment_of(lesion_mask: Any, labels: Volume) -> int:
    """The segment number holding most of a lesion's voxels (a ``LesionMask`` on ``labels``' grid)."""
    values = labels.array[lesion_mask.slices][lesion_mask.crop]
    counts = np.bincount(values.astype(np.int64))
    counts[0] = 0
    return int(np.argmax(counts))


def union_if_several(labels: Volume, label: int | None) -> Volume:
    """The mask that lesions are cut from: the label map for one segment, the union of several.

    Several segments give one lesion per connected component of their union (a multi-label mask
    would give one per label); :func:`label_by_segment` then names each lesion's segment.
    """
    return labels if label is not None else labels.with_array((labels.array > 0).astype(np.uint8))


def label_by_segment(items: list, labels: Volume) -> list:
    """Set each lesion's ``label`` to the segment number it came from."""
    for lesion, lmask in items:
        lesion.label = segment_of(lmask, labels)
    return items


def seg_lesions(
    image: Volume,
    path: str | os.PathLike,
    selector: Selector = None,
    patient_id: str = "",
    lesion_class: str = "",
    *,
    tolerance: float = 1e-3,
    first_number: int = 1,
    image_ref: str = "",
    mask_ref: str = "",
    name: str = "mask",
    image_name: str = "image",
    min_voxels: int = 1,
) -> list:
    """Lesions of a SEG on ``image``: one per selected segment, or per connected component of several.

    Returns:
        ``(Lesion, LesionMask)`` pairs as :func:`liverlesion.lesions.lesions_from_mask` gives them,
        each ``Lesion.label`` being the segment number it came from.
    """
    from liverlesion.lesions import lesions_from_mask  # local: heavy (scipy)

    labels, label = seg_mask(path, image, selector, tolerance=tolerance, name=name, image_name=image_name)
    items = lesions_from_mask(
        image,
        union_if_several(labels, label),
        label,
        patient_id,
        lesion_class,
        first_number=first_number,
        image_ref=image_ref,
        mask_ref=mask_ref,
        mask_name=f"{name} {mask_ref!r}" if mask_ref else name,
        min_voxels=min_voxels,
    )
    return label_by_segment(items, labels)
