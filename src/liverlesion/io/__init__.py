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

The package's modules, one job each:

* :mod:`~liverlesion.io.reader`: :func:`read_volume`, dispatching on the path, and :func:`read_grid`,
  the same dispatch and checks from the headers alone (a manifest's pre-pass);
* :mod:`~liverlesion.io.dicom`: DICOM series reading, :func:`list_series`, the DicomReference;
* :mod:`~liverlesion.io.scan`: the DICOM header scan and series selection;
* :mod:`~liverlesion.io.archive`: zip archives (unsafe entries, extraction);
* :mod:`~liverlesion.io.itk`: NIfTI / NRRD / MetaImage reading (header and truncation checks), :func:`write_volume`;
* :mod:`~liverlesion.io.common`: suffixes and the checks every reader shares;
* :mod:`~liverlesion.io.geometry`: :func:`check_geometry` (image vs mask) and :func:`check_tolerance`.
"""

from liverlesion.io.archive import check_zip_members, unsafe_zip_member
from liverlesion.io.common import MAX_VOXELS, SITK_SUFFIXES, WRITE_SUFFIXES, file_suffix
from liverlesion.io.dicom import list_series
from liverlesion.io.geometry import check_geometry, check_tolerance
from liverlesion.io.itk import write_volume
from liverlesion.io.reader import read_grid, read_volume

__all__ = [
    "read_volume",
    "read_grid",
    "list_series",
    "check_geometry",
    "check_tolerance",
    "write_volume",
    "check_zip_members",
    "unsafe_zip_member",
    "file_suffix",
    "SITK_SUFFIXES",
    "WRITE_SUFFIXES",
    "MAX_VOXELS",
]
