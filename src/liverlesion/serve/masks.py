"""An uploaded mask for the viewer and the one-shot form: a label volume, or a DICOM SEG read by ``dicom_seg``.

A DICOM SEG (a ``.dcm`` mask upload) is read through :mod:`liverlesion.dicom_seg` only, so it is
checked as ``predict --mask`` checks it: the referenced series must be the CT's, each frame must lie
on the CT's voxel grid, overlapping selected segments are refused. The form's ``label`` is then a
segment selector (a number, a SegmentLabel, or a pattern such as ``Tumor*``), validated from the SEG's
header before any pixel is read; for a label volume it stays a whole number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from liverlesion.dicom_seg import seg_mask
from liverlesion.errors import UserError
from liverlesion.io import read_volume
from liverlesion.seg_select import (
    Segment,
    check_seg_selector,
    parse_selector,
    read_seg_segments,
    select_segments,
)
from liverlesion.volume import Volume

__all__ = ["OVERLAP_HINT", "check_label", "read_mask", "resolve_segment_label"]

#: What to do about overlapping segments, in the page's words (not the CLI's).
OVERLAP_HINT = (
    "choose segments that do not overlap in the label field (a segment number or label, or a pattern "
    "such as Tumor*)"
)


def check_label(mask_path: Path | None, text: str, mask_name: str, field: str = "label") -> tuple[bool, Any]:
    """Before reading any volume: is the mask a DICOM SEG, and does ``text`` fit it.

    The equivalent of :func:`liverlesion.seg_select.check_cli_mask_label` with the form's names.

    Args:
        mask_path: The saved mask upload (a ``.dcm`` one is a DICOM SEG), or None.
        text: The form's label field ("" for none).
        mask_name: How the mask is named in messages (``mask file 'x.dcm'``).
        field: How the label field is named in messages.

    Returns:
        ``(is_seg, label)``: a segment selector (None, number or text) for a SEG, else None or an int.

    Raises:
        UserError: A SEG that is not one, has no segments or no such segment; a label that is not a
            whole number for a label volume; a label without a mask.
    """
    text = (text or "").strip()
    if mask_path is None:
        if text:
            raise UserError(
                f"{field} {text!r}: selects a lesion in the mask; upload a mask or clear the label"
            )
        return False, None
    if mask_path.suffix.lower() == ".dcm":
        selector = parse_selector(text)
        check_seg_selector(mask_path, selector, mask_name)
        return True, selector
    if not text:
        return False, None
    selector = parse_selector(text)
    if not isinstance(selector, int) or selector < 0:
        raise UserError(
            f"{field} {text!r}: not a whole number; enter the lesion's value in the mask (a segment label such "
            "as Tumor_1 only works with a DICOM SEG mask)"
        )
    return False, selector


def read_mask(
    mask_path: Path, image: Volume, is_seg: bool, selector: Any, mask_name: str, image_name: str
) -> tuple[Volume, int | None, dict[int, str]]:
    """Read the mask upload onto ``image``'s grid.

    Returns:
        ``(mask, label, segments)``: for a SEG, the label map of the selected segments (value =
        segment number), the segment number when ``selector`` names one segment (else None), and
        ``{number: SegmentLabel}`` of the selected segments; for a label volume, the volume as read,
        ``selector`` and ``{}``.

    Raises:
        UserError: Unreadable mask; a SEG of another series, off the CT's grid, with overlapping or
            empty selected segments.
    """
    if not is_seg:
        return read_volume(mask_path, kind="mask", name=mask_name), selector, {}
    chosen = select_segments(read_seg_segments(mask_path, mask_name), selector, mask_name)
    labels, label = seg_mask(
        mask_path,
        image,
        selector,
        tolerance=1e-3,
        name=mask_name,
        image_name=image_name,
        overlap_hint=OVERLAP_HINT,
    )
    return labels, label, {s.number: s.label for s in chosen}


def resolve_segment_label(text: str, segments: dict[int, str], field: str = "label") -> list[int]:
    """The segment numbers a text label (SegmentLabel or pattern) picks among ``segments``.

    Raises:
        UserError: No segment of the study matches, listing those there are.
    """
    segs = [Segment(n, lab) for n, lab in sorted(segments.items())]
    return [s.number for s in select_segments(segs, text, f"{field} {text!r}")]
