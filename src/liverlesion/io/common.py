"""What the ITK and DICOM readers share: file suffixes, the canonical-orientation shortcut, and the
size, dimension and voxel-value checks every volume passes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion.errors import UserError
from liverlesion.volume import Grid, Volume

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


log = logging.getLogger(__name__)


@contextlib.contextmanager
def native_stderr_to_log(what: str) -> Iterator[None]:
    """Send what C libraries write straight to file descriptor 2 (GDCM's and OpenJPEG's lines, one per
    slice, e.g. "Expected a SOC marker") to the debug log, so a failed read ends in our one line."""
    fd = 2  # where C libraries write, whatever sys.stderr is in Python
    try:
        os.fstat(fd)
    except OSError:  # no descriptor 2 (a detached service): nothing to redirect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            text = sink.read(1 << 16).decode("utf-8", "replace").strip()
            if text:
                log.debug("%s: native library output: %s", what, text)


def file_suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in (".nii.gz", *SITK_SUFFIXES):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def format_values(values, nd: int = 3) -> str:
    return "(" + ", ".join(f"{float(v):.{nd}f}".rstrip("0").rstrip(".") for v in values) + ")"


def needs_reorient(direction) -> bool:
    """Whether reading reorients a volume with these direction cosines to canonical LPS (``DICOMOrient``).

    DICOMOrient only permutes and flips axes, so it changes nothing when each index axis
    already runs along +x, +y, +z (identity, or slightly oblique: with a diagonal above 0.9
    the closest axis is unambiguous). Most axial CT is in this case.
    """
    return not bool(np.all(np.diag(np.asarray(direction, dtype=float).reshape(3, 3)) > 0.9))


def sitk_to_volume(img, meta: dict[str, Any]) -> Volume:
    """Canonical LPS Volume; skips ``DICOMOrient`` (a full copy) when it would change nothing."""
    return Volume.from_sitk(img, meta=meta, reorient=needs_reorient(img.GetDirection()))


def header_grid(size_xyz, spacing_xyz, origin_xyz, direction) -> Grid:
    """The grid :func:`sitk_to_volume` gives an image with this header, without its voxels.

    The same reorientation: none where :func:`needs_reorient` says so, else the axis permutation and
    flips that SimpleITK's ``DICOMOrient`` picks (asked of a 2x2x2 image with this direction), applied
    to the size, spacing and origin (the physical position of the new first voxel).
    """
    size = np.asarray(size_xyz, dtype=int)
    spacing = np.asarray(spacing_xyz, dtype=float)
    origin = np.asarray(origin_xyz, dtype=float)
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if needs_reorient(d):
        import SimpleITK as sitk

        probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
        probe.SetDirection(tuple(d.ravel()))
        new_d = np.asarray(sitk.DICOMOrient(probe, "LPS").GetDirection(), dtype=float).reshape(3, 3)
        signed = np.linalg.solve(d, new_d)  # d @ signed = new_d: a signed permutation of the axes
        perm = np.argmax(np.abs(signed), axis=0)  # new index axis j is old axis perm[j] ...
        flip = signed[perm, np.arange(3)] < 0  # ... running backwards where flip[j]
        corner = np.zeros(3)  # the old index of the new first voxel
        corner[perm[flip]] = size[perm[flip]] - 1
        origin = origin + d @ (corner * spacing)
        size, spacing, d = size[perm], spacing[perm], new_d
    return Grid(tuple(size[::-1]), tuple(spacing[::-1]), tuple(origin), d)


#: Largest volume read (voxels): 2**30 float32 voxels are 4 GiB, far above a thin-slice abdominal CT
#: (512 x 512 x 1500 = 0.4 G voxels). A header claiming more is corrupt or not a single CT volume.
MAX_VOXELS = 2**30


def check_voxel_count(n_voxels: int, shape: tuple, label: str, path: Path) -> None:
    if n_voxels > MAX_VOXELS:
        raise UserError(
            f"{label}: {path} has {n_voxels:.3g} voxels (size {shape}), more than the {MAX_VOXELS:.3g} this tool "
            f"reads (a corrupt header, or not one CT volume); crop or downsample the image, or check the file"
        )


def check_dimensions(img, label: str, path: Path):
    """Return a 3-D image; refuse 2-D and 4-D (dropping trailing length-1 dimensions)."""
    import SimpleITK as sitk

    size = list(img.GetSize())
    if check_size(size, label, path) != len(size):  # 4-D with one time point
        img = sitk.Extract(img, [*size[:3], 0], [0, 0, 0, 0])
    return img


def check_size(size, label: str, path: Path) -> int:
    """Refuse an image size (x, y, z, ...: from a loaded image or a header) that is not one 3-D volume.

    Returns:
        The dimensions to keep: 3 (a 4-D size with one time point keeps its first three).
    """
    size = list(size)
    if len(size) == 4 and size[3] == 1:
        size = size[:3]
    if len(size) > 3:
        raise UserError(
            f"{label}: {path} is a {len(size)}-D image of size {tuple(size)} (e.g. several phases or time points); "
            f"a single 3-D volume is needed: split it and pass one volume"
        )
    if len(size) < 3 or min(size) < 2:
        raise UserError(
            f"{label}: {path} is a 2-D image (a single slice, size {tuple(size)}); a 3-D volume is needed: "
            f"pass the whole series or volume"
        )
    return 3


def convert_array(array: np.ndarray, kind: str, label: str, path: Path) -> np.ndarray:
    """HU float32 for images; integer labels for masks. Refuse NaN/inf."""
    # One reduction (no full-size temporary) rules out NaN/inf in the common case; a
    # non-finite sum (NaN/inf present, or float32 overflow) falls back to counting.
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is expected: no RuntimeWarning lines
        total = array.sum() if np.issubdtype(array.dtype, np.floating) else 0.0
    if not np.isfinite(total):
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


def first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK errors put the useful sentence last.
    return (lines[-1] if lines else type(exc).__name__)[:200]
