"""Read CT volumes and masks (DICOM folder or zip, NIfTI, NRRD, MetaImage) into :class:`Volume`.

Every reader returns the canonical orientation documented in :mod:`liverlesion.volume`
(array ``[z, y, x]``, identity LPS direction where the image is axis-aligned).
CT images come back in HU as float32; masks keep their integer labels.

DICOM headers are read with pydicom (pixel data deferred, not loaded) to find, select, sort and
check the series; pixels are decoded by SimpleITK/GDCM, which also applies the
rescale slope/intercept (so we never apply it a second time).

A DICOM volume carries a :class:`~liverlesion.volume.DicomReference` in ``Volume.dicom``;
its ``header`` is a pydicom Dataset with identifying tags (for the DICOM SR writer): never
print, log or serialise it. ``Volume.meta`` holds only non-identifying facts.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion.errors import UserError
from liverlesion.volume import DicomReference, Volume

log = logging.getLogger(__name__)

__all__ = ["read_volume", "list_series", "check_geometry", "check_tolerance", "write_volume", "SITK_SUFFIXES"]

# Suffixes read directly by SimpleITK, with the format name stored in meta["format"].
SITK_SUFFIXES = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
}
# Formats write_volume produces as a single file (so the write can be atomic);
# .nhdr/.mhd would leave a separate data file beside the header.
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

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
_SCAN_TAGS = (
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
    "PixelData",  # the three _PIXEL_TAGS
    "FloatPixelData",
    "DoubleFloatPixelData",
)

# Relative tolerances for "same plane" checks on DICOM headers.
_ORIENTATION_TOL = 1e-3
_PIXEL_SPACING_TOL = 1e-3


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in (".nii.gz", *SITK_SUFFIXES):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def _fmt(values, nd: int = 3) -> str:
    return "(" + ", ".join(f"{float(v):.{nd}f}".rstrip("0").rstrip(".") for v in values) + ")"


# --------------------------------------------------------------------------- public API


def read_volume(
    path: str | os.PathLike,
    series: str | None = None,
    kind: str = "image",
    name: str | None = None,
    slice_tolerance: float = 0.1,
) -> Volume:
    """Read a CT image or a mask into a canonical LPS :class:`Volume`.

    Args:
        path: DICOM series folder, ``.zip`` of one, a single (multi-frame) DICOM file,
            or a NIfTI / NRRD / MetaImage file.
        series: SeriesInstanceUID to read when a DICOM folder holds several series.
        kind: ``"image"`` (CT in HU, float32, modality checked) or ``"mask"``
            (integer labels, dtype kept, no modality check).
        name: How to call this input in error messages (e.g. ``"--image"``); defaults to the path.
        slice_tolerance: Allowed deviation of each DICOM slice gap from the median gap,
            relative to the median.

    Returns:
        The volume, with non-identifying ``meta`` (and, for DICOM, the typed reference ``dicom``).

    Raises:
        UserError: Missing/unreadable input, non-CT modality, several series without
            ``series``, missing or uneven slices, mixed geometry, NaN voxels, 2-D or 4-D images.
    """
    if kind not in ("image", "mask"):
        raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
    path = Path(path).expanduser()
    label = name or str(path)
    if not path.exists():
        raise UserError(
            f"{label}: {path} does not exist; check the path (relative paths start from the current folder)"
        )
    if path.is_dir():
        return _read_dicom_folder(path, series, kind, label, slice_tolerance, source=path, fmt="dicom")
    suffix = _suffix(path)
    if suffix in SITK_SUFFIXES:
        return _read_sitk_file(path, kind, label, SITK_SUFFIXES[suffix])
    if suffix == ".zip" or (suffix not in (".dcm", ".ima", "") and zipfile.is_zipfile(path)):
        with _extracted_zip(path, label) as folder:
            return _read_dicom_folder(
                folder, series, kind, label, slice_tolerance, source=path, fmt="dicom-zip"
            )
    return _read_dicom_file(path, series, kind, label, slice_tolerance)


def list_series(path: str | os.PathLike, name: str | None = None) -> list[dict[str, Any]]:
    """List the image series in a DICOM folder or zip.

    Args:
        path: DICOM folder, ``.zip`` of DICOM files, or one DICOM file.
        name: How to call this input in error messages; defaults to the path.

    Returns:
        One dict per series: ``uid``, ``description``, ``modality``, ``n_slices``
        (frames for a multi-frame file) and ``folder`` (name of the innermost sub-folder
        holding it, ``"."`` for ``path`` itself; useful when SeriesDescription is empty), sorted by UID.
    """
    path = Path(path).expanduser()
    label = name or str(path)
    if not path.exists():
        raise UserError(f"{label}: {path} does not exist; check the path")
    if path.is_dir():
        return [s.summary() for s in _scan_dicom(path, label).values()]
    if _suffix(path) == ".zip" or zipfile.is_zipfile(path):
        with _extracted_zip(path, label) as folder:
            return [s.summary() for s in _scan_dicom(folder, label).values()]
    if _suffix(path) in SITK_SUFFIXES:
        raise UserError(
            f"{label}: {path} is a {SITK_SUFFIXES[_suffix(path)]} file, not DICOM; it holds a single volume"
        )
    ds = _read_header(path)
    if ds is None or not _is_image(ds):
        raise UserError(f"{label}: {path} is not a DICOM image file; pass a DICOM series folder or .zip")
    return [_Series(str(ds.get("SeriesInstanceUID", "")), [(path, ds)]).summary()]


def check_geometry(
    image: Volume,
    mask: Volume,
    tolerance: float = 1e-3,
    image_name: str = "image",
    mask_name: str = "mask",
) -> None:
    """Check that a mask lies on exactly the image's voxel grid.

    Args:
        image: The CT volume.
        mask: The mask volume.
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

    def describe(v: Volume) -> str:
        text = f"shape {tuple(v.shape)} spacing {_fmt(v.spacing, 4)} origin {_fmt(v.origin, 3)}"
        if direction_diff > tolerance:
            text += f" direction {_fmt(v.direction.ravel(), 3)}"
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


def write_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a volume atomically as NIfTI (.nii/.nii.gz), NRRD (.nrrd) or MetaImage (.mha).

    Args:
        volume: The volume to write (its geometry is kept).
        path: Destination; the format follows the extension.

    Returns:
        The written path.
    """
    import SimpleITK as sitk

    from liverlesion.fileio import atomic_path

    path = Path(path)
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise UserError(
            f"{path}: cannot write this format (suffix {_suffix(path) or 'none'!r}); use one of {', '.join(WRITE_SUFFIXES)}"
        )
    img = volume.to_sitk()
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=not path.name.lower().endswith(".nii"))
    return path


# --------------------------------------------------------------------------- SimpleITK files


def _read_sitk_file(path: Path, kind: str, label: str, fmt: str) -> Volume:
    import SimpleITK as sitk

    if fmt == "nifti":
        _check_nifti_complete(path, label)  # before ITK, which zero-fills truncated data silently
        _check_nifti_voxel_size(path, label)  # before ITK, which "repairs" it with a warning
    elif path.name.lower().endswith(".mha"):
        _check_metaimage_complete(path, label)  # before ITK, whose MetaIO prints to stderr
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        log.debug("%s: ITK could not read %s: %s", label, path, exc)
        raise UserError(
            f"{label}: {path} could not be read as a {fmt} image (corrupt, truncated or not an image file); "
            f"re-export it or copy it again"
        ) from None
    if fmt == "nifti":
        _check_nifti_finite(path, label)
    img = _check_dimensions(img, label, path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(
            f"{label}: {path} has {img.GetNumberOfComponentsPerPixel()} values per voxel (colour or vector image); "
            f"a grey-level {'CT' if kind == 'image' else 'label'} volume is needed"
        )
    meta = {
        "modality": None,  # not recorded by these formats; the user vouches it is CT
        "series_description": None,
        "manufacturer": None,
        "source": str(path),
        "format": fmt,
    }
    vol = _to_volume(img, meta)
    vol.array = _convert_array(vol.array, kind, label, path)
    return vol


_META_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


def _check_metaimage_complete(path: Path, label: str) -> None:
    """Refuse an uncompressed ``.mha`` whose pixel data is shorter than its header says."""
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    end = head.find(b"ElementDataFile")
    if end < 0:
        return  # not a MetaImage header we understand: leave the judgement to ITK
    line_end = head.find(b"\n", end)
    if line_end < 0:
        return
    fields = {}
    for line in head[:line_end].decode("latin-1", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    if (
        fields.get("ElementDataFile", "").upper() != "LOCAL"
        or fields.get("CompressedData", "False") == "True"
    ):
        return
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        size = _META_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return
    expected = math.prod(dims) * channels * size
    actual = path.stat().st_size - (line_end + 1)
    if actual < expected:
        raise UserError(
            f"{label}: {path} is truncated: its header promises {expected} bytes of pixel data but the file "
            f"holds {actual}; copy or export it again"
        )


def _to_volume(img, meta: dict[str, Any]) -> Volume:
    """Canonical LPS Volume; skips ``DICOMOrient`` (a full copy) when it would change nothing."""
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    # DICOMOrient only permutes and flips axes, so it changes nothing when each index axis
    # already runs along +x, +y, +z (identity, or slightly oblique: with a diagonal above 0.9
    # the closest axis is unambiguous). Most axial CT is in this case.
    already_lps = bool(np.all(np.diag(direction) > 0.9))
    return Volume.from_sitk(img, meta=meta, reorient=not already_lps)


def _check_nifti_voxel_size(path: Path, label: str) -> None:
    """Refuse zero/negative/non-finite NIfTI voxel sizes: ITK reads 0 as 1 mm and -s as s, silently."""
    pixdim = _nifti_voxel_size(path)
    if pixdim is not None and not all(math.isfinite(v) and v > 0 for v in pixdim):
        raise UserError(
            f"{label}: {path} has voxel size (NIfTI pixdim x, y, z) {_fmt(pixdim, 4)}: zero, negative or "
            f"non-finite sizes are invalid (they would silently be read as 1 mm or their absolute value); fix the "
            f"header with the true spacing (e.g. nibabel: img.header.set_zooms(...), then nib.save) or re-export the image"
        )


def _check_nifti_finite(path: Path, label: str) -> None:
    """Refuse NaN/inf in NIfTI files: ITK's NIfTI reader silently turns NaN into 0."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception:  # unreadable by nibabel: ITK read it, so leave the judgement to it
        return
    if img.get_data_dtype().kind != "f":
        return
    data = np.asanyarray(img.dataobj.get_unscaled())
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise UserError(
            f"{label}: {path} has {bad} NaN/inf voxels of {data.size}; fix the file "
            f"(e.g. replace them with -1024 HU for an image or 0 for a mask) and try again"
        )


def _nifti_header(path: Path):
    """The NIfTI-1/2 header exactly as stored, or None when nibabel cannot parse it."""
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            first = f.read(4)
            f.seek(0)
            sizes = {int.from_bytes(first, "little"), int.from_bytes(first, "big")}
            if not sizes & {348, 540}:
                return None
            return (Nifti2Header if 540 in sizes else Nifti1Header).from_fileobj(f, check=False)
    except Exception:
        return None


#: Largest volume read (voxels): 2**30 float32 voxels are 4 GiB, far above a thin-slice abdominal CT
#: (512 x 512 x 1500 = 0.4 G voxels). A header claiming more is corrupt or not a single CT volume.
MAX_VOXELS = 2**30


def _check_voxel_count(n_voxels: int, shape: tuple, label: str, path: Path) -> None:
    if n_voxels > MAX_VOXELS:
        raise UserError(
            f"{label}: {path} has {n_voxels:.3g} voxels (size {shape}), more than the {MAX_VOXELS:.3g} this tool "
            f"reads (a corrupt header, or not one CT volume); crop or downsample the image, or check the file"
        )


def _check_nifti_complete(path: Path, label: str) -> None:
    """Refuse a NIfTI file that is not one, or whose voxel data is shorter than its header says.

    ITK reads a truncated ``.nii``/``.nii.gz`` without complaint and fills the missing voxels
    with zeros; here the decompressed stream is counted (not kept) and compared with
    ``vox_offset + voxels x bytes per voxel``.
    """
    import gzip
    import zlib

    header = _nifti_header(path)
    if header is None:
        raise UserError(
            f"{label}: {path} is not a NIfTI image (no NIfTI-1/2 header found; a corrupt download, or another "
            f"format with a .nii name); re-export or copy the file again"
        )
    try:
        shape = header.get_data_shape()
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except Exception as exc:
        raise UserError(
            f"{label}: {path} has an invalid NIfTI header ({_first_line(exc)}); re-export the image"
        ) from exc
    n_voxels = int(np.prod(shape, dtype=np.int64))
    _check_voxel_count(n_voxels, tuple(shape), label, path)
    expected = offset + n_voxels * itemsize
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            size = 0
            with gzip.open(path, "rb") as f:
                while size < expected:
                    chunk = f.read(min(1 << 22, expected - size))
                    if not chunk:
                        break
                    size += len(chunk)
        else:
            size = path.stat().st_size
    except (EOFError, OSError, zlib.error) as exc:
        raise UserError(
            f"{label}: {path} is truncated or corrupt (the compressed data ends early or is damaged: "
            f"{_first_line(exc)}); copy or export the file again"
        ) from exc
    if size < expected:
        raise UserError(
            f"{label}: {path} is truncated: its header describes {expected} bytes (shape {tuple(shape)}, "
            f"{itemsize} bytes per voxel) but the file holds {size}; copy or export the file again"
        )


def _nifti_voxel_size(path: Path) -> list[float] | None:
    """The spatial ``pixdim`` values exactly as stored (None when nibabel cannot parse the header).

    ``nib.load`` cannot be used for this: it repairs zero and negative pixdim values on load.
    """
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            first = f.read(4)
            f.seek(0)
            sizes = {int.from_bytes(first, "little"), int.from_bytes(first, "big")}
            header = (Nifti2Header if 540 in sizes else Nifti1Header).from_fileobj(f, check=False)
        n_spatial = min(max(int(header["dim"][0]), 1), 3)
        return [float(v) for v in header["pixdim"][1 : 1 + n_spatial]]  # pixdim[0] is qfac, not a size
    except Exception:  # not a header nibabel can parse: leave the judgement to ITK
        return None


def _check_dimensions(img, label: str, path: Path):
    """Return a 3-D image; refuse 2-D and 4-D (dropping trailing length-1 dimensions)."""
    import SimpleITK as sitk

    size = list(img.GetSize())
    if img.GetDimension() == 4 and size[3] == 1:
        img = sitk.Extract(img, [*size[:3], 0], [0, 0, 0, 0])
        size = size[:3]
    if img.GetDimension() > 3:
        raise UserError(
            f"{label}: {path} is a {img.GetDimension()}-D image of size {tuple(size)} (e.g. several phases or time points); "
            f"a single 3-D volume is needed: split it and pass one volume"
        )
    if img.GetDimension() < 3 or min(size) < 2:
        raise UserError(
            f"{label}: {path} is a 2-D image (a single slice, size {tuple(size)}); a 3-D volume is needed: "
            f"pass the whole series or volume"
        )
    return img


def _convert_array(array: np.ndarray, kind: str, label: str, path: Path) -> np.ndarray:
    """HU float32 for images; integer labels for masks. Refuse NaN/inf."""
    # One reduction (no full-size temporary) rules out NaN/inf in the common case; a
    # non-finite sum (NaN/inf present, or float32 overflow) falls back to counting.
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array.sum()):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise UserError(
                f"{label}: {path} has {bad} NaN/inf voxels of {array.size}; fix the file "
                f"(e.g. replace them with -1024 HU for an image or 0 for a mask) and try again"
            )
    if kind == "image":
        if array.dtype.kind not in "iuf" or array.dtype == np.bool_:
            raise UserError(f"{label}: {path} has voxel type {array.dtype}; a numeric CT image is needed")
        return array.astype(np.float32, copy=False)
    if array.size and array.dtype.kind in "if" and float(array.min()) < 0:
        raise UserError(
            f"{label}: {path} is a mask with negative values (down to {float(array.min()):g}): it looks like a "
            f"CT image in HU, not a label mask (0 = background, 1, 2, ... = lesions); pass the lesion mask "
            f"(were the image and the mask swapped?)"
        )
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(array == np.round(array)):
            raise UserError(
                f"{label}: {path} is a mask with non-integer values (e.g. {float(array[array != np.round(array)][0]):g}); "
                f"a label mask must hold whole numbers (0 = background, 1, 2, ... = lesions): threshold or round it "
                f"(or did you pass an image as the mask?)"
            )
        lo, hi = float(array.min()), float(array.max())
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return array.astype(dtype)
        raise UserError(f"{label}: {path} is a mask with label values up to {hi:g}; this is not a label mask")
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    return array


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK errors put the useful sentence last.
    return (lines[-1] if lines else type(exc).__name__)[:200]


# --------------------------------------------------------------------------- DICOM headers


@dataclass
class _Series:
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
    """:data:`_SCAN_TAGS` as pydicom tags (converting keywords on every file costs measurable time)."""
    from pydicom.tag import Tag

    return [Tag(keyword) for keyword in _SCAN_TAGS]


def _read_header(path: Path, full: bool = False):
    """pydicom header (large values such as pixel data deferred), or None when the file is not DICOM.

    Args:
        path: The file.
        full: Keep every tag; by default only :data:`_SCAN_TAGS` (and the file meta).
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
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE, force=True, specific_tags=tags)
            if "SOPInstanceUID" in ds and "Rows" in ds and "SeriesInstanceUID" in ds:
                return ds
        except Exception:
            pass
    return None


def _check_pixel_data(f: Path, ds, label: str, path: Path) -> None:
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


def _is_image(ds) -> bool:
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


def _scan_dicom(folder: Path, label: str, with_skipped: bool = False):
    """Group the image files under ``folder`` (recursively) by SeriesInstanceUID."""
    from tqdm import tqdm

    from liverlesion.progress import progress_disabled

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    series: dict[str, _Series] = {}
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
        ds = _read_header(f)
        if ds is None:
            skipped["not DICOM or unreadable"] += 1
            continue
        if not _is_image(ds):
            skipped[f"non-image {ds.get('Modality', 'object')}"] += 1
            continue
        if _is_localizer(ds):
            skipped["localizer"] += 1
            continue
        uid = str(ds.SeriesInstanceUID)
        series.setdefault(uid, _Series(uid)).files.append((f, ds))
    if skipped:
        log.info("%s: skipped %s", label, ", ".join(f"{n} {what}" for what, n in skipped.items()))
    for s in series.values():
        # Folder names often say what a series is when SeriesDescription is empty (e.g. IRCAD masks).
        # Only the innermost name: PACS exports put patient names in the outer folders.
        common = Path(os.path.commonpath([str(f.parent) for f, _ in s.files]))
        s.folder = common.name if common != folder else "."
    out = dict(sorted(series.items()))
    return (out, skipped) if with_skipped else out


def _describe_series(series: dict[str, _Series]) -> str:
    parts = []
    for s in series.values():
        d = s.summary()
        where = f", in {d['folder']}" if d["folder"] not in ("", ".") else ""
        parts.append(
            f"{d['uid']} ('{d['description']}', {d['modality'] or '?'}, {d['n_slices']} slices{where})"
        )
    return "; ".join(parts)


def _select_series(
    series: dict[str, _Series], wanted: str | None, label: str, path: Path, skipped
) -> _Series:
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
                f"{label}: series {wanted!r} is not in {path}; available series: {_describe_series(series)}; "
                f"pass one of these UIDs with --series"
            )
        return series[wanted]
    if len(series) > 1:
        raise UserError(
            f"{label}: {path} holds {len(series)} image series: {_describe_series(series)}; "
            f"choose one with --series UID (or the manifest's series column)"
        )
    return next(iter(series.values()))


# --------------------------------------------------------------------------- DICOM reading


def _read_dicom_file(path: Path, series: str | None, kind: str, label: str, slice_tolerance: float) -> Volume:
    ds = _read_header(path)
    if ds is None:
        raise UserError(
            f"{label}: {path} is not a readable image (not DICOM, truncated or corrupt, and not .nii/.nii.gz/.nrrd/.mha/.zip); "
            f"check the file or pass the DICOM series folder"
        )
    if not _is_image(ds):
        what = (
            f"a DICOM {ds.Modality} object" if "Modality" in ds else "an incomplete (truncated?) DICOM file"
        )
        raise UserError(
            f"{label}: {path} is {what} without an image; pass the CT series folder instead "
            f"(or copy the file again if it is truncated)"
        )
    if int(ds.get("NumberOfFrames", 1) or 1) <= 1:
        raise UserError(
            f"{label}: {path} is a single DICOM slice (a 2-D image); a 3-D volume is needed: "
            f"pass the folder that holds the whole series (e.g. {path.parent})"
        )
    s = _Series(str(ds.SeriesInstanceUID), [(path, ds)])
    if series is not None and series.strip() != s.uid:
        raise UserError(
            f"{label}: series {series!r} is not in {path}; it holds series {_describe_series({s.uid: s})}"
        )
    return _read_series(s, kind, label, path, slice_tolerance, fmt="dicom")


def _read_dicom_folder(
    folder: Path, series: str | None, kind: str, label: str, slice_tolerance: float, source: Path, fmt: str
) -> Volume:
    found, skipped = _scan_dicom(folder, label, with_skipped=True)
    chosen = _select_series(found, series, label, source, skipped)
    return _read_series(chosen, kind, label, source, slice_tolerance, fmt=fmt)


def _check_modality(ds, kind: str, label: str, path: Path) -> None:
    if kind != "image":
        return
    modality = str(ds.get("Modality", "") or "").upper()
    if modality == "CT":
        return
    if not modality:
        log.warning("%s: DICOM Modality is missing; assuming CT", label)
        return
    raise UserError(
        f"{label}: series in {path} has modality {modality}, not CT; this tool works on CT in Hounsfield units: "
        f"pass a CT series (use --series to choose one)"
    )


def _floats(ds, keyword: str, n: int, label: str, f: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
        assert arr.shape == (n,)
    except Exception as exc:
        raise UserError(
            f"{label}: DICOM file {f} has a missing or invalid {keyword} ({value!r}); "
            f"the slice geometry cannot be known: re-export the series"
        ) from exc
    return arr


def _read_series(s: _Series, kind: str, label: str, path: Path, slice_tolerance: float, fmt: str) -> Volume:
    ds0 = s.first
    _check_modality(ds0, kind, label, path)
    for f, ds in s.files:
        _check_pixel_data(f, ds, label, path)
    multi = [f for f, ds in s.files if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        if len(s.files) > 1:
            raise UserError(
                f"{label}: series {s.uid} in {path} mixes {len(multi)} multi-frame file(s) with other files; "
                f"pass a folder holding one multi-frame file or one classic slice series"
            )
        # The per-frame geometry sequences were not parsed by the scan.
        full = _read_header(s.files[0][0], full=True)
        return _read_multiframe(_Series(s.uid, [(s.files[0][0], full or s.first)]), kind, label, path, fmt)
    rows, cols = int(ds0.get("Rows", 0) or 0), int(ds0.get("Columns", 0) or 0)
    _check_voxel_count(rows * cols * len(s.files), (len(s.files), rows, cols), label, path)
    files, geometry = _sort_and_check_slices(s, label, path, slice_tolerance)
    img = _read_pixels([f for f, _ in files], kind, label, path)
    spacing_xy, positions, direction, gap = geometry
    # Our header-derived geometry is authoritative (ITK derives spacing from the first two slices only).
    img.SetSpacing((float(spacing_xy[0]), float(spacing_xy[1]), float(gap)))
    img.SetOrigin(tuple(float(v) for v in positions[0]))
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    return _finish_dicom(img, files, positions, kind, label, path, fmt)


def _sort_and_check_slices(s: _Series, label: str, path: Path, tol: float):
    """Sort slices along the slice normal and check that they form one regular 3-D grid.

    Returns:
        The sorted ``(path, header)`` pairs and ``(pixel spacing (x, y), sorted positions (n, 3),
        direction, slice gap)``.
    """
    files = s.files
    if len(files) < 2:
        raise UserError(
            f"{label}: series {s.uid} in {path} has a single slice (a 2-D image); a 3-D volume is needed: "
            f"pass the folder that holds the whole series"
        )
    sizes = Counter((int(ds.Rows), int(ds.Columns)) for _, ds in files)
    if len(sizes) > 1:
        raise UserError(
            f"{label}: series {s.uid} in {path} mixes image sizes {dict(sizes)} (rows, columns: slices); "
            f"one series must be one volume: remove the odd slices or pick another series with --series"
        )
    orients = [_floats(ds, "ImageOrientationPatient", 6, label, f) for f, ds in files]
    ref = orients[0]
    odd = [i for i, o in enumerate(orients) if np.max(np.abs(o - ref)) > _ORIENTATION_TOL]
    if odd:
        raise UserError(
            f"{label}: series {s.uid} in {path} mixes slice orientations ({len(odd)} of {len(files)} slices differ "
            f"from {_fmt(ref, 3)}, e.g. {files[odd[0]][0].name}: {_fmt(orients[odd[0]], 3)}); "
            f"one series must be one volume: remove the odd slices or pick another series with --series"
        )
    spacings = [_floats(ds, "PixelSpacing", 2, label, f) for f, ds in files]
    if any(np.max(np.abs(sp - spacings[0])) > _PIXEL_SPACING_TOL * spacings[0].max() for sp in spacings):
        raise UserError(
            f"{label}: series {s.uid} in {path} mixes pixel spacings {sorted({_fmt(sp, 4) for sp in spacings})}; "
            f"one series must be one volume: pick another series with --series"
        )
    row, col = ref[:3], ref[3:]
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise UserError(
            f"{label}: series {s.uid} in {path} has an invalid ImageOrientationPatient {_fmt(ref, 4)}; re-export it"
        )
    positions = np.asarray([_floats(ds, "ImagePositionPatient", 3, label, f) for f, ds in files])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    files = [files[i] for i in order]
    depth = depth[order]
    positions = positions[order]
    gaps = np.diff(depth)
    median = float(np.median(gaps))
    dup = np.flatnonzero(gaps < 1e-3 * max(median, 1e-3))
    if len(dup) or median <= 0:
        raise UserError(
            f"{label}: series {s.uid} in {path} has {len(dup) + 1 if len(dup) else len(files)} slices at the same position "
            f"(e.g. {_fmt(positions[dup[0] if len(dup) else 0], 2)} mm): it holds several volumes (phases, echoes or a "
            f"repeated acquisition); split them into separate folders or series and pass one"
        )
    bad = np.flatnonzero(np.abs(gaps - median) > tol * median)
    if len(bad):
        i = int(bad[0])
        missing = max(int(round(gaps[i] / median)) - 1, 0)
        what = f"about {missing} missing slice(s)" if missing else "uneven slice spacing"
        raise UserError(
            f"{label}: series {s.uid} in {path} has {what}: gap of {gaps[i]:.3f} mm (median {median:.3f} mm) between "
            f"slices at {depth[i]:.2f} and {depth[i + 1]:.2f} mm along the slice normal (after {files[i][0].name}; "
            f"{len(bad)} irregular gap(s) in all); re-export the complete series "
            f"(tolerance {tol:g} of the median gap)"
        )
    direction = np.column_stack([row, col, normal])  # columns: x, y, z index axes in LPS
    return files, (spacings[0][::-1], positions, direction, median)


def _read_pixels(files: list[Path], kind: str, label: str, path: Path):
    """Decode the sorted slices with SimpleITK; GDCM applies RescaleSlope/Intercept once."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    if kind == "image":
        # Float output keeps fractional slopes exact; ITK applies each slice's own rescale.
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise UserError(
            f"{label}: the DICOM slices in {path} could not be decoded (truncated/corrupt file or unsupported "
            f"compression): re-export the series uncompressed ({_first_line(exc)})"
        ) from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(
            f"{label}: series in {path} is a colour image (e.g. a screenshot); pass the CT series"
        )
    return img


def _read_multiframe(s: _Series, kind: str, label: str, path: Path, fmt: str) -> Volume:
    """A single multi-frame (enhanced CT) file; SimpleITK/GDCM decodes frames and geometry."""
    import SimpleITK as sitk

    f, ds = s.files[0]
    try:
        img = sitk.ReadImage(str(f), sitk.sitkFloat32 if kind == "image" else sitk.sitkUnknown)
    except RuntimeError as exc:
        raise UserError(
            f"{label}: the multi-frame DICOM file {f} could not be decoded; convert it to a classic slice series "
            f"or NIfTI (e.g. with dcm2niix) and try again ({_first_line(exc)})"
        ) from exc
    img = _check_dimensions(img, label, f)
    positions = _multiframe_positions(ds)
    if positions is not None and len(positions) == img.GetSize()[2]:
        # GDCM keeps the file's frame order; check it is a regular grid as ITK assumes.
        normal = np.asarray(img.GetDirection()).reshape(3, 3)[:, 2]
        depth = positions @ normal
        gaps = np.diff(depth)
        if len(gaps) and (np.any(gaps <= 0) or np.ptp(gaps) > 0.1 * np.median(gaps)):
            raise UserError(
                f"{label}: the frames of the multi-frame file {f} are not evenly spaced in order along the slice "
                f"normal; convert it to a classic slice series or NIfTI (e.g. with dcm2niix)"
            )
    return _finish_dicom(img, [(f, ds)], positions, kind, label, path, fmt, header_is_full=True)


def _multiframe_positions(ds) -> np.ndarray | None:
    try:
        return np.asarray(
            [
                [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
                for fg in ds.PerFrameFunctionalGroupsSequence
            ]
        )
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def _finish_dicom(
    img, files, positions, kind: str, label: str, path: Path, fmt: str, header_is_full: bool = False
) -> Volume:
    # The scan kept only the tags it needs; the reference header (for DICOM SR) wants them all.
    ds0 = files[0][1] if header_is_full else (_read_header(files[0][0], full=True) or files[0][1])
    meta = {
        "modality": str(ds0.get("Modality", "") or "") or None,
        "series_description": str(ds0.get("SeriesDescription", "") or "") or None,
        "manufacturer": str(ds0.get("Manufacturer", "") or "") or None,
        "source": str(path),
        "format": fmt,
    }
    vol = _to_volume(img, meta)
    vol.array = _convert_array(vol.array, kind, label, path)
    sop_uids = [str(ds.get("SOPInstanceUID", "")) for _, ds in files]
    per_slice = False
    if len(files) > 1 and positions is not None:
        # Report the SOP instances in the array's slice order (reorientation may flip z).
        # That only holds when each file is one array z-slice (axial-ish acquisitions);
        # a sagittal/coronal series is reoriented so its files become array x/y planes.
        z = vol.physical_to_index(positions)[:, 0]
        per_slice = len(files) == vol.shape[0] and len(np.unique(np.round(z))) == len(files)
        if per_slice:
            sop_uids = [sop_uids[i] for i in np.argsort(z, kind="stable")]
    header = ds0.copy()
    for tag in list(header.keys()):
        el = header.get_item(tag, keep_deferred=True)
        # Drop pixel data, and values still deferred (they would reopen a file that may be gone).
        if tag.group == 0x7FE0 or (getattr(el, "value", 0) is None and hasattr(el, "value_tell")):
            del header[tag]
    vol.dicom = DicomReference(
        study_instance_uid=str(ds0.get("StudyInstanceUID", "")) or None,
        series_instance_uid=str(ds0.get("SeriesInstanceUID", "")) or None,
        frame_of_reference_uid=str(ds0.get("FrameOfReferenceUID", "")) or None,
        sop_class_uid=str(ds0.get("SOPClassUID", "")) or None,
        sop_instance_uids=tuple(sop_uids),
        slices_along_array_z=bool(per_slice),
        header=header,
    )
    return vol


def unsafe_zip_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry must not be extracted (None when it is safe).

    Entries whose names leave the archive's folder (``..`` parts, absolute paths, drive
    letters, backslash-rooted names) and symbolic links are refused: extracting them
    could write or read outside the target folder.
    """
    import stat

    name = info.filename.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/"):
        return "an absolute path"
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        return "a Windows drive letter"
    if any(p == ".." for p in parts):
        return "a '..' component (it points outside the archive)"
    if any(":" in p for p in parts):
        return "a ':' in a name (a drive or stream name)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def check_zip_members(zf: zipfile.ZipFile, label: str, path: Path) -> list[zipfile.ZipInfo]:
    """The file entries of an open zip, after refusing unsafe entry names (see :func:`unsafe_zip_member`).

    Raises:
        UserError: Naming the first unsafe entry.
    """
    infos = zf.infolist()
    for info in infos:
        why = unsafe_zip_member(info)
        if why is not None:
            raise UserError(
                f"{label}: {path} has an entry {info.filename!r} with {why}; refusing to read the archive: "
                f"re-create the zip from the DICOM folder itself (e.g. zip -r series.zip SERIES_FOLDER)"
            )
    return [i for i in infos if not i.is_dir()]


class _extracted_zip:
    """Context manager: extract a zip to a private temporary folder, removed afterwards.

    Entry names are checked first (no writes or reads outside the temporary folder) and the
    total uncompressed size is compared with the free space there.
    """

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label
        self._tmp: str | None = None

    def __enter__(self) -> Path:
        import shutil

        self._tmp = tempfile.mkdtemp(prefix="liverlesion-zip-")  # mode 0700
        try:
            with zipfile.ZipFile(self.path) as zf:
                members = check_zip_members(zf, self.label, self.path)
                total = sum(i.file_size for i in members)
                free = shutil.disk_usage(self._tmp).free
                if total > free:
                    raise UserError(
                        f"{self.label}: {self.path} unpacks to {total / 1e9:.1f} GB but the temporary folder "
                        f"{tempfile.gettempdir()} has {free / 1e9:.1f} GB free; set TMPDIR to a larger disk or "
                        f"pass the unzipped folder"
                    )
                for info in members:
                    zf.extract(info, self._tmp)
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, ValueError) as exc:
            self._cleanup()
            raise UserError(
                f"{self.label}: {self.path} is not a readable zip file ({exc}); re-create it or pass the unzipped folder"
            ) from exc
        except BaseException:
            self._cleanup()
            raise
        return Path(self._tmp)

    def _cleanup(self) -> None:
        import shutil

        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __exit__(self, *exc_info) -> None:
        self._cleanup()
