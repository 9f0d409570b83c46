"""What a DICOM SEG holds and which of its segments a selector picks: header only, no pixels.

A SEG is recognised by its SOP Class UID (Segmentation Storage, ``1.2.840.10008.5.1.4.1.1.66.4``),
never by its name. A *selector* chooses segments:

* empty / ``0``: every segment;
* a number ``N``: segment number N;
* a text: every segment whose SegmentLabel equals it (case-insensitive), or matches it as a
  shell pattern when it holds ``*``, ``?`` or ``[`` (``Tumor*`` selects ``Tumor_1``, ``Tumor_2``, ...).

A number, or an exact label naming one segment, names **one lesion**; an empty selector, a
pattern, or a label several segments share gives one lesion per connected component (see
:mod:`liverlesion.dicom_seg`, which reads the pixels onto the CT grid). The checks here
(:func:`check_seg_selector`, :func:`check_manifest_seg`, :func:`check_cli_mask_label`) run
before any work.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion.errors import UserError

__all__ = [
    "SEG_SOP_CLASS_UID",
    "Selector",
    "Segment",
    "is_seg",
    "read_seg_header",
    "read_seg_segments",
    "parse_selector",
    "segment_listing",
    "select_segments",
    "names_one_segment",
    "check_seg_selector",
    "check_manifest_seg",
    "check_cli_mask_label",
]

#: Segmentation Storage.
SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
_PATTERN_CHARS = set("*?[")

Selector = int | str | None


@dataclass(frozen=True)
class Segment:
    """One segment of a SEG: its number and SegmentLabel."""

    number: int
    label: str

    def __str__(self) -> str:
        return f"{self.number} {self.label!r}"


# ----------------------------------------------------------------------------- header


def is_seg(path: str | os.PathLike) -> bool:
    """True when ``path`` is a single DICOM file of SOP class Segmentation Storage (reads one tag)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    if not p.is_file():
        return False
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError):
        return False
    return _says_seg(ds)


def sop_classes(ds) -> tuple[str, str]:
    """``(SOPClassUID, the file meta's MediaStorageSOPClassUID)``, "" where absent: a file cut short may
    hold only its meta's."""
    meta = getattr(ds, "file_meta", None)
    meta_uid = str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else ""
    return str(ds.get("SOPClassUID", "") or ""), meta_uid


def _says_seg(ds) -> bool:
    """The dataset's SOPClassUID, or its file meta's, is SEG's."""
    return SEG_SOP_CLASS_UID in sop_classes(ds)


def read_seg_header(path: Path, name: str):
    """The header of a DICOM file (its pixel data, when any, is left unread).

    Raises:
        UserError: Not a readable DICOM file, or a SEG that ends before its pixel data.
    """
    import pydicom

    try:  # the whole file is parsed, so a SEG cut short shows; values over 1 KiB (the pixels) stay unread
        ds = pydicom.dcmread(path, defer_size=1024)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise UserError(
            f"{name} {path}: not a readable DICOM SEG file ({e}); re-export the segmentation"
        ) from e
    # pydicom reads a file cut short (an interrupted copy or download) without complaint, up to where it
    # ends: what is missing then looked like a SEG without segments or a malformed one.
    if _says_seg(ds) and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UserError(
            f"{name} {path}: the DICOM SEG file ends before its pixel data ({path.stat().st_size} bytes: "
            "truncated, e.g. an interrupted copy or download); copy or export it again"
        )
    return ds


def _segments(ds, path: Path, name: str) -> list[Segment]:
    items = list(ds.get("SegmentSequence", []) or [])
    if not items:
        raise UserError(
            f"{name} {path}: the DICOM SEG has no segments (empty SegmentSequence); "
            "re-export the segmentation with at least one segment"
        )
    segs = []
    for item in items:
        number = int(item.get("SegmentNumber", 0) or 0)
        segs.append(Segment(number, str(item.get("SegmentLabel", "") or "").strip()))
    return segs


def read_seg_segments(path: str | os.PathLike, name: str = "mask") -> list[Segment]:
    """The segments of a SEG file (number and label), from its header only.

    Raises:
        UserError: Not a SEG, unreadable, or no segments.
    """
    path = Path(path)
    ds = read_seg_header(path, name)
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS_UID:
        raise UserError(
            f"{name} {path}: is DICOM but not a Segmentation (SOP class {ds.get('SOPClassUID', 'missing')}); "
            "give a DICOM SEG or a label-mask volume"
        )
    return _segments(ds, path, name)


def parse_selector(value: Any) -> Selector:
    """A manifest/CLI label as a segment selector: None (every segment), a number, or a text."""
    if value is None:
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if isinstance(value, (int, np.integer)):
        return int(value) or None
    text = str(value).strip()
    if not text:
        return None
    try:
        f = float(text)
    except ValueError:
        return text
    if f.is_integer():
        return int(f) or None
    return text


def segment_listing(segs: Sequence[Segment]) -> str:
    """The segments as ``1 'Tumor_1', 2 'Tumor_2'``, at most 20 shown (for error messages)."""
    shown = ", ".join(str(s) for s in segs[:20])
    return shown + (f", ... ({len(segs)} in all)" if len(segs) > 20 else "")


def select_segments(segs: Sequence[Segment], selector: Selector, name: str = "mask") -> list[Segment]:
    """The segments a selector picks (see the module docstring).

    Raises:
        UserError: No segment matches, naming the segments there are.
    """
    selector = parse_selector(selector)
    if selector is None:
        return list(segs)
    if isinstance(selector, int):
        chosen = [s for s in segs if s.number == selector]
        what = f"segment number {selector}"
    elif _PATTERN_CHARS & set(selector):
        chosen = [s for s in segs if fnmatch.fnmatchcase(s.label.casefold(), selector.casefold())]
        what = f"segment label pattern {selector!r}"
    else:
        chosen = [s for s in segs if s.label.casefold() == selector.casefold()]
        what = f"segment label {selector!r}"
    if not chosen:
        raise UserError(
            f"{name}: the DICOM SEG has no {what}; its segments are {segment_listing(segs)}; "
            "give a segment number or label from this list (or leave the label empty for every segment)"
        )
    return chosen


def check_seg_selector(path: str | os.PathLike, selector: Selector, name: str = "mask") -> list[Segment]:
    """Before any work: the SEG's header has segments and ``selector`` picks at least one."""
    return select_segments(read_seg_segments(path, name), selector, name)


def check_manifest_seg(mask_path: str | os.PathLike, label: Any, name: str) -> None:
    """For a manifest row whose mask is a DICOM SEG: its header has segments and the label picks some."""
    if is_seg(mask_path):
        check_seg_selector(mask_path, parse_selector(label), name)


def names_one_segment(selector: Selector) -> bool:
    """A number or an exact label (not empty, not a pattern): it names one segment, one lesion."""
    selector = parse_selector(selector)
    return isinstance(selector, int) or (isinstance(selector, str) and not _PATTERN_CHARS & set(selector))


#: A folder with more files than this is a mask series, not the folder of a SEG (one file per series).
_SEG_FOLDER_MAX_FILES = 16


def _segs_only_folder(path: Path) -> list[Path]:
    """The SEG files of a folder holding nothing but SEG files (TCIA's N.000000-Segmentation-NNNNN/1-1.dcm)."""
    if not path.is_dir():
        return []
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files or len(files) > _SEG_FOLDER_MAX_FILES:
        return []
    segs = [f for f in files if is_seg(f)]
    return segs if len(segs) == len(files) else []


def check_cli_mask_label(
    mask: str | os.PathLike | None, label: Any, option: str = "--label"
) -> tuple[bool, Selector]:
    """Before any work: is ``mask`` a DICOM SEG, and is ``label`` valid for it.

    Returns:
        ``(mask_is_seg, label)``: the label as a segment selector for a SEG, else as an integer.

    Raises:
        UserError: A text label for a non-SEG mask, a negative label, a SEG that has no such segment, or a
            folder holding only a SEG (its file is the mask).
    """
    if mask is not None and (segs := _segs_only_folder(Path(mask))):
        raise UserError(
            f"--mask {mask}: is a folder holding a DICOM SEG ({', '.join(f.name for f in segs[:3])}), not a mask "
            f"series; pass the SEG file itself: --mask {segs[0]}"
        )
    mask_is_seg = mask is not None and is_seg(mask)
    if mask_is_seg:
        selector = parse_selector(label)
        check_seg_selector(mask, selector, "--mask")
        return True, selector
    if label is None:
        return False, None
    selector = parse_selector(label)
    if selector is None:
        return False, None
    if not isinstance(selector, int):
        raise UserError(
            f"{option} {label}: not an integer; give the mask label value (e.g. 1), or, with a DICOM SEG --mask, "
            "a segment number or label"
        )
    if selector < 0:
        raise UserError(f"{option} {label}: is negative; give the mask label value (e.g. 1)")
    return False, selector
