"""DICOM header scan: read headers (pixel data deferred), group image files into series, pick one.

Only the tags in :data:`SCAN_TAGS` are read here; :mod:`liverlesion.io.dicom` reads the pixels.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liverlesion.errors import UserError
from liverlesion.progress import progress_disabled

log = logging.getLogger(__name__)


# SOP classes that hold no pixel volume even though some carry Rows/Columns.
_NON_IMAGE_MODALITIES = {"SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC", "SEG"}
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DEFER_SIZE = 64 * 1024
# The tags the header scan needs to find, select, sort and check a series. pydicom seeks
# past all others (20-40 % faster on a typical 250-element CT header; vendor private
# blocks are skipped unread); the first file of the chosen series is then read in full
# for ``Volume.dicom.header``.
SCAN_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "ImageType",
    "Modality",
    "Manufacturer",
    "SeriesDescription",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "PixelSpacing",
    "BitsAllocated",
    "RescaleSlope",  # checked before decoding: GDCM quietly reads a slope of 0 as 1
    "RescaleIntercept",
    "PixelData",  # the three _PIXEL_TAGS
    "FloatPixelData",
    "DoubleFloatPixelData",
)


# --------------------------------------------------------------------------- DICOM headers


@dataclass
class DicomSeries:
    uid: str
    files: list[tuple[Path, Any]] = field(default_factory=list)  # (path, pydicom header)
    folder: str = ""  # sub-folder holding the files, relative to the scanned root ("." for the root)

    @property
    def first(self):
        return self.files[0][1]

    def n_frames(self) -> int:
        return sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in self.files)

    def summary(self) -> dict[str, Any]:
        ds = self.first
        return {
            "uid": self.uid,
            "description": str(ds.get("SeriesDescription", "") or ""),
            "modality": str(ds.get("Modality", "") or ""),
            "n_slices": self.n_frames(),
            "folder": self.folder,
        }


@functools.cache
def _scan_tags() -> list:
    """:data:`SCAN_TAGS` as pydicom tags (converting keywords on every file costs measurable time)."""
    from pydicom.tag import Tag

    return [Tag(keyword) for keyword in SCAN_TAGS]


def _may_be_bare_dataset(path: Path) -> bool:
    """Whether a file without the DICM preamble can start a data set that holds a SOPInstanceUID.

    Tags come in ascending order, so such a data set starts in group 0x0002 to 0x0008 (either
    byte order). Anything else is refused here, unparsed: forcing pydicom through a large
    non-DICOM file (e.g. zeros, read as millions of empty elements) takes minutes.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return len(head) == 2 and any(1 <= int.from_bytes(head, order) <= 8 for order in ("little", "big"))


def read_header(path: Path, full: bool = False):
    """pydicom header (large values such as pixel data deferred), or None when the file is not DICOM.

    Args:
        path: The file.
        full: Keep every tag; by default only :data:`SCAN_TAGS` (and the file meta).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    # Deferring large values (pixel data) reads headers fast and still tells us where the
    # pixel data lies, so truncated files can be caught before decoding (GDCM reads them silently).
    tags = None if full else _scan_tags()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # malformed vendor tags are common and harmless here
        try:
            return pydicom.dcmread(path, defer_size=_DEFER_SIZE, specific_tags=tags)
        except InvalidDicomError:
            pass
        except Exception:  # truncated/corrupt DICOM: treat like junk, reported by the caller
            return None
        # Old files without the 128-byte preamble: accept only if they look like an image header.
        if not _may_be_bare_dataset(path):
            return None
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE, force=True, specific_tags=tags)
            if "SOPInstanceUID" in ds and "Rows" in ds and "SeriesInstanceUID" in ds:
                return ds
        except Exception:
            pass
    return None


def check_pixel_data(f: Path, ds, label: str, path: Path) -> None:
    """Refuse files whose pixel data is missing or shorter than the header says (truncated copies)."""
    from pydicom.pixels.utils import get_expected_length

    el = None
    for tag in _PIXEL_TAGS:
        el = ds.get_item(tag, keep_deferred=True)
        if el is not None:
            break
    if el is None:
        raise UserError(
            f"{label}: DICOM file {f.name} in {path} has no pixel data; remove it or re-export the series"
        )
    deferred = getattr(el, "value", None) is None and hasattr(el, "value_tell")
    length = el.length if deferred else len(el.value or b"")
    truncated = deferred and length != _UNDEFINED_LENGTH and el.value_tell + length > f.stat().st_size
    ts = getattr(getattr(ds, "file_meta", None), "get", lambda *_: None)("TransferSyntaxUID")
    if not truncated and length != _UNDEFINED_LENGTH and (ts is None or not ts.is_compressed):
        try:
            truncated = length < get_expected_length(ds, "bytes")
        except (AttributeError, KeyError, TypeError, ValueError):
            pass  # header too incomplete to know; the decoder will complain
    if truncated:
        raise UserError(
            f"{label}: DICOM file {f.name} in {path} is truncated or corrupt (pixel data shorter than its header "
            f"says); copy the series again from the source"
        )


def is_image(ds) -> bool:
    if str(ds.get("Modality", "")).upper() in _NON_IMAGE_MODALITIES:
        return False
    if (
        getattr(ds, "file_meta", None) is not None
        and ds.file_meta.get("MediaStorageSOPClassUID") == _DICOMDIR_SOP_CLASS
    ):
        return False
    return "Rows" in ds and "Columns" in ds and "SeriesInstanceUID" in ds


def _is_localizer(ds) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type


def scan_dicom(folder: Path, label: str, with_skipped: bool = False):
    """Group the image files under ``folder`` (recursively) by SeriesInstanceUID."""
    from tqdm import tqdm

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    series: dict[str, DicomSeries] = {}
    skipped: Counter[str] = Counter()
    for f in tqdm(
        files,
        desc=f"reading DICOM headers ({folder.name})",
        unit="file",
        leave=False,
        disable=len(files) < 50 or progress_disabled(),
    ):
        if f.name.upper() == "DICOMDIR":
            skipped["DICOMDIR"] += 1
            continue
        ds = read_header(f)
        if ds is None:
            # a zip in the folder (or in the .zip given) is not opened: say so rather than 'not DICOM'
            skipped[
                "zip archive (unzip it first)" if zipfile.is_zipfile(f) else "not DICOM or unreadable"
            ] += 1
            continue
        if not is_image(ds):
            skipped[f"non-image {ds.get('Modality', 'object')}"] += 1
            continue
        if _is_localizer(ds):
            skipped["localizer"] += 1
            continue
        uid = str(ds.SeriesInstanceUID)
        series.setdefault(uid, DicomSeries(uid)).files.append((f, ds))
    if skipped:
        log.info("%s: skipped %s", label, ", ".join(f"{n} {what}" for what, n in skipped.items()))
    for s in series.values():
        # Folder names often say what a series is when SeriesDescription is empty (e.g. IRCAD masks).
        # Only the innermost name: PACS exports put patient names in the outer folders.
        common = Path(os.path.commonpath([str(f.parent) for f, _ in s.files]))
        s.folder = common.name if common != folder else "."
    out = dict(sorted(series.items()))
    return (out, skipped) if with_skipped else out


def describe_series(series: dict[str, DicomSeries]) -> str:
    parts = []
    for s in series.values():
        d = s.summary()
        where = f", in {d['folder']}" if d["folder"] not in ("", ".") else ""
        parts.append(
            f"{d['uid']} ('{d['description']}', {d['modality'] or '?'}, {d['n_slices']} slices{where})"
        )
    return "; ".join(parts)


def select_series(
    series: dict[str, DicomSeries], wanted: str | None, label: str, path: Path, skipped
) -> DicomSeries:
    if not series:
        what = (
            f" (skipped: {', '.join(f'{n} {w}' for w, n in skipped.items())})"
            if skipped
            else " (it is empty)"
        )
        raise UserError(
            f"{label}: no DICOM image series found in {path}{what}; pass a folder or .zip holding CT DICOM slices"
        )
    if wanted is not None:
        wanted = wanted.strip()
        if wanted not in series:
            raise UserError(
                f"{label}: series {wanted!r} is not in {path}; available series: {describe_series(series)}; "
                f"pass one of these UIDs with --series"
            )
        return series[wanted]
    if len(series) > 1:
        raise UserError(
            f"{label}: {path} holds {len(series)} image series: {describe_series(series)}; "
            f"choose one with --series UID (or the manifest's series column)"
        )
    return next(iter(series.values()))
