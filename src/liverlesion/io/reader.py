"""Read any supported CT image or mask: dispatch on the path to the DICOM or ITK reader."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from liverlesion.errors import UserError
from liverlesion.io.archive import extracted_zip
from liverlesion.io.common import SITK_SUFFIXES, file_suffix
from liverlesion.io.dicom import read_dicom_file, read_dicom_folder
from liverlesion.io.itk import read_sitk_file
from liverlesion.volume import Volume


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
        return read_dicom_folder(path, series, kind, label, slice_tolerance, source=path, fmt="dicom")
    suffix = file_suffix(path)
    if suffix in SITK_SUFFIXES:
        return read_sitk_file(path, kind, label, SITK_SUFFIXES[suffix])
    if suffix == ".zip" or (suffix not in (".dcm", ".ima", "") and zipfile.is_zipfile(path)):
        with extracted_zip(path, label) as folder:
            return read_dicom_folder(
                folder, series, kind, label, slice_tolerance, source=path, fmt="dicom-zip"
            )
    return read_dicom_file(path, series, kind, label, slice_tolerance)
