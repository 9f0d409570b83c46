"""Read any supported CT image or mask: dispatch on the path to the DICOM or ITK reader."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from liverlesion.errors import UserError
from liverlesion.io.archive import check_zip, extracted_zip
from liverlesion.io.common import SITK_SUFFIXES, file_suffix
from liverlesion.io.dicom import read_dicom_file, read_dicom_folder
from liverlesion.io.itk import read_sitk_file
from liverlesion.volume import Grid, Volume


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
    return _read(path, series, kind, name, slice_tolerance, header_only=False)


def read_grid(
    path: str | os.PathLike,
    series: str | None = None,
    kind: str = "image",
    name: str | None = None,
    slice_tolerance: float = 0.1,
) -> Grid | None:
    """The voxel grid :func:`read_volume` would give, from the file headers alone (no voxel data read).

    The same dispatch and the same checks as :func:`read_volume`, up to the voxels, with the same
    messages: the path exists and its headers are readable; a NIfTI / NRRD / MetaImage header
    (SimpleITK ``ReadImageInformation``) says one 3-D grey-level volume, and an uncompressed file
    holds the bytes its header promises; a DICOM series (the header scan) is one CT series of
    complete slices on a regular grid. For a look at every input of a manifest before any is read.

    Returns:
        The :class:`Grid` (shape, spacing, origin, direction after the same reorientation), or None
        where the headers alone cannot give it cheaply (a zip: only its index is checked; a
        multi-frame DICOM file; a 4-D file with one time point): the full read checks those.

    Raises:
        UserError: What :func:`read_volume` would raise for the same header problem.
    """
    return _read(path, series, kind, name, slice_tolerance, header_only=True)


def _read(
    path: str | os.PathLike,
    series: str | None,
    kind: str,
    name: str | None,
    slice_tolerance: float,
    header_only: bool,
) -> Volume | Grid | None:
    if kind not in ("image", "mask"):
        raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
    path = Path(path).expanduser()
    label = name or str(path)
    if not path.exists():
        raise UserError(
            f"{label}: {path} does not exist; check the path (relative paths start from the current folder)"
        )
    if path.is_dir():
        return read_dicom_folder(
            path, series, kind, label, slice_tolerance, source=path, fmt="dicom", header_only=header_only
        )
    suffix = file_suffix(path)
    if suffix in SITK_SUFFIXES:
        return read_sitk_file(path, kind, label, SITK_SUFFIXES[suffix], header_only=header_only)
    if suffix == ".zip" or (suffix not in (".dcm", ".ima", "") and zipfile.is_zipfile(path)):
        if header_only:  # the headers are inside compressed entries: check the archive's index only
            check_zip(path, label)
            return None
        with extracted_zip(path, label) as folder:
            return read_dicom_folder(
                folder, series, kind, label, slice_tolerance, source=path, fmt="dicom-zip"
            )
    return read_dicom_file(path, series, kind, label, slice_tolerance, header_only=header_only)
