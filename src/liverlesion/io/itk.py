"""Single-file volumes read and written by SimpleITK (NIfTI, NRRD, MetaImage), with the header and
truncation checks that must run before ITK (which zero-fills or "repairs" silently).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from liverlesion.errors import UserError
from liverlesion.fileio import atomic_path
from liverlesion.io.common import (
    WRITE_SUFFIXES,
    check_dimensions,
    check_size,
    check_voxel_count,
    convert_array,
    file_suffix,
    first_line,
    format_values,
    header_grid,
    sitk_to_volume,
)
from liverlesion.volume import Grid, Volume

log = logging.getLogger(__name__)


def write_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a volume atomically as NIfTI (.nii/.nii.gz), NRRD (.nrrd) or MetaImage (.mha).

    Args:
        volume: The volume to write (its geometry is kept).
        path: Destination; the format follows the extension.

    Returns:
        The written path.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise UserError(
            f"{path}: cannot write this format (suffix {file_suffix(path) or 'none'!r}); use one of {', '.join(WRITE_SUFFIXES)}"
        )
    img = volume.to_sitk()
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=not path.name.lower().endswith(".nii"))
    return path


def read_sitk_file(
    path: Path, kind: str, label: str, fmt: str, header_only: bool = False
) -> Volume | Grid | None:
    """Read a NIfTI / NRRD / MetaImage file; with ``header_only``, its :class:`Grid` from the header alone.

    The header-only read makes every check of the full read that needs no voxel data (the header,
    the file size the header promises, 3-D, one value per voxel), with the same messages; a
    ``.nii.gz`` is not decompressed, so a truncated one is found by the full read only. It returns
    None for a 4-D file with one time point, whose 3-D direction ITK guesses on extraction.
    """
    import SimpleITK as sitk

    if fmt == "nifti":
        # before ITK, which zero-fills truncated data silently
        _check_nifti_complete(path, label, read_data=not header_only)
        _check_nifti_voxel_size(path, label)  # before ITK, which "repairs" it with a warning
        _check_nifti_orientation(path, label)  # before ITK, whose SVD prints a matrix dump on NaN
    elif path.name.lower().endswith((".mha", ".mhd")):
        _check_metaimage_complete(path, label)  # before ITK, whose MetaIO prints to stderr
    elif fmt == "nrrd":
        _check_nrrd_complete(path, label)  # before ITK, whose error names neither file
    try:
        if header_only:
            img = sitk.ImageFileReader()
            img.SetFileName(str(path))
            img.ReadImageInformation()
        else:
            img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        log.debug("%s: ITK could not read %s: %s", label, path, exc)
        if "orthonormal" in str(exc):  # a sheared or skewed affine (sform / qform): not a damaged file
            raise UserError(
                f"{label}: {path} has a sheared or skewed orientation (its voxel axes are not at right angles), "
                f"which cannot be read as a CT grid; resample it onto an orthogonal grid (e.g. 3D Slicer or "
                f"nibabel's resample_to_output) or re-export it from DICOM with dcm2niix"
            ) from None
        raise UserError(
            f"{label}: {path} could not be read as a {fmt} image (corrupt, truncated or not an image file); "
            f"re-export it or copy it again"
        ) from None
    if header_only:
        size = img.GetSize()
        check_size(size, label, path)
        _check_components(img.GetNumberOfComponents(), kind, label, path)
        _check_pixel_type(img.GetPixelID(), kind, label, path)
        if len(size) != 3:
            return None
        return header_grid(size, img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    if fmt == "nifti":
        _check_nifti_finite(path, label)
    img = check_dimensions(img, label, path)
    _check_components(img.GetNumberOfComponentsPerPixel(), kind, label, path)
    _check_pixel_type(img.GetPixelID(), kind, label, path)
    meta = {
        "modality": None,  # not recorded by these formats; the user vouches it is CT
        "series_description": None,
        "manufacturer": None,
        "source": str(path),
        "format": fmt,
    }
    vol = sitk_to_volume(img, meta)
    vol.array = convert_array(vol.array, kind, label, path)
    return vol


def _check_components(n: int, kind: str, label: str, path: Path) -> None:
    if n != 1:
        raise UserError(
            f"{label}: {path} has {n} values per voxel (colour or vector image); "
            f"a grey-level {'CT' if kind == 'image' else 'label'} volume is needed"
        )


def _check_pixel_type(pixel_id: int, kind: str, label: str, path: Path) -> None:
    """Refuse a CT stored as signed 8-bit values (after any scaling the header asks for): HU from -1024
    to 3071 cannot fit in -128..127, so these are wrapped or windowed display values. (Unsigned 8-bit
    is refused by the CT check as having no negative values.)"""
    import SimpleITK as sitk

    if kind == "image" and pixel_id == sitk.sitkInt8:
        raise UserError(
            f"{label}: {path} stores signed 8-bit values (-128 to 127), which cannot hold Hounsfield units "
            "(air -1000, bone above 300): a windowed or display export, not the CT; re-export the CT with its "
            "16-bit values (e.g. from DICOM with dcm2niix)"
        )


_META_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


def _detached_data_file(path: Path, label: str, data_name: str, field: str, one_file: str) -> Path:
    """The pixel data file a detached header (``.mhd``, ``.nhdr``) names, refused when missing."""
    data = Path(data_name) if Path(data_name).is_absolute() else path.parent / data_name
    if not data.is_file():
        raise UserError(
            f"{label}: {path}: its pixel data file {data_name!r} ({field}) is missing, looked for "
            f"{data}; copy it next to the header, or export the image as one {one_file} / .nii.gz file"
        )
    return data


def _refuse_short_data(path: Path, label: str, data: Path, actual: int, expected: int) -> None:
    """Refuse pixel data (in ``data``: the header's own file or a detached one) shorter than promised."""
    if actual < expected:
        raise UserError(
            f"{label}: {path} is truncated: its header promises {expected} bytes of pixel data but "
            f"{'the file' if data == path else data} holds {actual}; copy or export it again"
        )


def _check_metaimage_complete(path: Path, label: str) -> None:
    """Refuse a MetaImage whose pixel data is missing, or (uncompressed) shorter than its header says:
    after the header in a ``.mha``, in the ``ElementDataFile`` next to a ``.mhd``."""
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
    data_name = fields.get("ElementDataFile", "")
    if data_name.upper() == "LOCAL":
        data, actual = path, path.stat().st_size - (line_end + 1)
    elif data_name and data_name.upper() != "LIST" and "%" not in data_name and " " not in data_name:
        # one detached file (not a list of slices or a name pattern)
        data = _detached_data_file(path, label, data_name, "ElementDataFile", ".mha")
        actual = data.stat().st_size
    else:
        return
    if fields.get("CompressedData", "False") == "True":
        try:  # ITK writes the compressed size; a file cut short holds less (ITK would print to stderr)
            expected = int(fields["CompressedDataSize"])
        except (KeyError, ValueError):
            return
        _refuse_short_data(path, label, data, actual, expected)
        return
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        size = _META_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return
    _refuse_short_data(path, label, data, actual, math.prod(dims) * channels * size)


_NRRD_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(
        ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
         "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(
        ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(
        ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
         "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
         "double"), 8),
}  # fmt: skip


def _check_nrrd_complete(path: Path, label: str) -> None:
    """Refuse a NRRD whose pixel data is missing, or (raw encoding) shorter than its header says: the
    ``data file`` next to a detached header (``.nhdr``), or the data after an attached header."""
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    if not head.startswith(b"NRRD000"):
        return  # not a NRRD header we understand: leave the judgement to ITK
    fields: dict[str, str] = {}
    end = len(head)  # a detached header may end at the end of the file
    pos = head.find(b"\n") + 1
    while 0 < pos < len(head):
        nl = head.find(b"\n", pos)
        line = head[pos : nl if nl >= 0 else len(head)].decode("latin-1").rstrip("\r")
        if not line.strip():
            end = nl + 1 if nl >= 0 else len(head)
            break
        key, sep, value = line.partition(": ")
        if sep and not line.startswith("#") and ":=" not in key:
            fields[key.strip().lower().replace("datafile", "data file")] = value.strip()
        pos = nl + 1 if nl >= 0 else len(head)
    data_name = fields.get("data file", "")
    if data_name:
        if " " in data_name or "%" in data_name:
            return  # a LIST of files or a name pattern: leave the judgement to ITK
        data = _detached_data_file(path, label, data_name, "NRRD 'data file'", ".nrrd")
        actual = data.stat().st_size
    else:
        data, actual = path, path.stat().st_size - end
    if fields.get("encoding", "").lower() != "raw" or fields.get("byte skip", "0") != "0":
        return
    if fields.get("line skip", "0") != "0":
        return
    try:
        dims = [int(v) for v in fields["sizes"].split()]
        size = _NRRD_BYTES[" ".join(fields["type"].lower().split())]
    except (KeyError, ValueError):
        return
    _refuse_short_data(path, label, data, actual, math.prod(dims) * size)


def _check_nifti_voxel_size(path: Path, label: str) -> None:
    """Refuse zero/negative/non-finite NIfTI voxel sizes: ITK reads 0 as 1 mm and -s as s, silently."""
    pixdim = _nifti_voxel_size(path)
    if pixdim is not None and not all(math.isfinite(v) and v > 0 for v in pixdim):
        raise UserError(
            f"{label}: {path} has voxel size (NIfTI pixdim x, y, z) {format_values(pixdim, 4)}: zero, negative or "
            f"non-finite sizes are invalid (they would silently be read as 1 mm or their absolute value); fix the "
            f"header with the true spacing (e.g. nibabel: img.header.set_zooms(...), then nib.save) or re-export the image"
        )


def _check_nifti_orientation(path: Path, label: str) -> None:
    """Refuse NaN/inf in the NIfTI orientation (the qform / sform in use)."""
    header = _nifti_header(path)
    if header is None:
        return
    fields = []
    if int(header["qform_code"]) > 0:
        fields += ["quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"]
    if int(header["sform_code"]) > 0:
        fields += ["srow_x", "srow_y", "srow_z"]
    bad = [f for f in fields if not np.all(np.isfinite(np.asarray(header[f], dtype=float)))]
    if bad:
        raise UserError(
            f"{label}: {path} has NaN/inf in its orientation (NIfTI header {', '.join(bad)}); the header is "
            "damaged: re-export the image (e.g. from DICOM with dcm2niix)"
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


def _refuse_misnamed_nifti(path: Path, label: str) -> None:
    """Refuse a NIfTI whose name says the wrong compression (the reader picks it by the name alone)."""
    with open(path, "rb") as f:
        head = f.read(4)
    gzipped = head[:2] == b"\x1f\x8b"
    named_gz = path.name.lower().endswith(".gz")
    if gzipped and not named_gz:
        raise UserError(
            f"{label}: {path} is gzip-compressed but named .nii; rename it to {path.name}.gz (or gunzip it)"
        )
    if (
        not gzipped
        and named_gz
        and {int.from_bytes(head, "little"), int.from_bytes(head, "big")} & {348, 540}
    ):
        raise UserError(
            f"{label}: {path} is an uncompressed NIfTI image named .nii.gz; rename it to "
            f"{path.name[:-3]} (or gzip it)"
        )


def _check_nifti_complete(path: Path, label: str, read_data: bool = True) -> None:
    """Refuse a NIfTI file that is not one, or whose voxel data is shorter than its header says.

    ITK reads a truncated ``.nii``/``.nii.gz`` without complaint and fills the missing voxels
    with zeros, and reads a damaged ``.nii.gz`` as garbage; here the decompressed stream is read to
    its end, so gzip verifies its CRC-32, counted (not kept) and compared with ``vox_offset + voxels
    x bytes per voxel``. Without ``read_data`` (a header-only check) a ``.nii.gz`` is not
    decompressed: only its header is checked.
    """
    import gzip
    import zlib

    header = _nifti_header(path)
    if header is None:
        _refuse_misnamed_nifti(path, label)
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
            f"{label}: {path} has an invalid NIfTI header ({first_line(exc)}); re-export the image"
        ) from exc
    n_voxels = int(np.prod(shape, dtype=np.int64))
    check_voxel_count(n_voxels, tuple(shape), label, path)
    expected = offset + n_voxels * itemsize
    name = path.name.lower()
    try:
        if name.endswith(".gz") and not read_data:
            return
        if name.endswith(".gz"):
            size = 0
            with gzip.open(path, "rb") as f:  # to the end: gzip checks the CRC-32 there
                while chunk := f.read(1 << 22):
                    size += len(chunk)
        else:
            size = path.stat().st_size
    except (EOFError, OSError, zlib.error) as exc:
        raise UserError(
            f"{label}: {path} is truncated or corrupt (the compressed data ends early or is damaged: "
            f"{first_line(exc)}); copy or export the file again"
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
