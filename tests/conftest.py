"""Shared fixtures: tiny synthetic CT volumes as arrays, NIfTI files and a DICOM series.

Pure helpers (usable outside fixtures) are in ``tests/helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_ct_array, write_dicom_series
from liverlesion.volume import Volume

# Real CT (patient 1 of 3D-IRCADb-01), next to the repo; tests skip when it is absent.
IRCAD_PATIENT1 = Path(__file__).resolve().parents[2] / "shared/data/3Dircadb1/3Dircadb1.1"


@pytest.fixture
def ircad_patient1() -> Path:
    """Path to the real 3D-IRCADb-01 patient 1 folder (skips the test when absent)."""
    if not (IRCAD_PATIENT1 / "PATIENT_DICOM").is_dir():
        pytest.skip(f"real data not found at {IRCAD_PATIENT1} (see shared/data/README.md)")
    return IRCAD_PATIENT1


@pytest.fixture
def tiny_ct() -> tuple[Volume, Volume]:
    """(image, mask): 24x48x48 CT, 2.5x1x1 mm, a 6 mm water-density sphere in soft tissue."""
    return make_ct_array()


@pytest.fixture
def tiny_nifti(tmp_path: Path, tiny_ct) -> tuple[Path, Path]:
    """Paths to ``image.nii.gz`` and ``mask.nii.gz`` holding ``tiny_ct``."""
    from liverlesion.io import write_volume

    image, mask = tiny_ct
    return write_volume(image, tmp_path / "image.nii.gz"), write_volume(mask, tmp_path / "mask.nii.gz")


@pytest.fixture
def tiny_dicom_dir(tmp_path: Path, tiny_ct) -> Path:
    """A folder holding ``tiny_ct``'s image as a CT DICOM series (uint16, intercept -1024, shuffled names)."""
    image, _ = tiny_ct
    folder = tmp_path / "dicom"
    write_dicom_series(image, folder)
    return folder
