"""Read a DICOM series (folder, zip or one multi-frame file) into a :class:`Volume`: slice order and
spacing checks, pixel decoding by SimpleITK/GDCM, and the :class:`~liverlesion.volume.DicomReference`.

Its ``header`` is a pydicom Dataset with identifying tags (for the DICOM SR writer): never print,
log or serialise it.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion.errors import UserError
from liverlesion.io.archive import extracted_zip
from liverlesion.io.common import (
    SITK_SUFFIXES,
    check_dimensions,
    check_voxel_count,
    convert_array,
    file_suffix,
    first_line,
    format_values,
    header_grid,
    native_stderr_to_log,
    sitk_to_volume,
)
from liverlesion.io.scan import (
    DicomSeries,
    check_pixel_data,
    describe_series,
    is_image,
    read_header,
    scan_dicom,
    select_series,
)
from liverlesion.volume import DicomReference, Grid, Volume

log = logging.getLogger(__name__)


# Relative tolerances for "same plane" checks on DICOM headers.
_ORIENTATION_TOL = 1e-3
_PIXEL_SPACING_TOL = 1e-3


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
        return [s.summary() for s in scan_dicom(path, label).values()]
    if file_suffix(path) == ".zip" or zipfile.is_zipfile(path):
        with extracted_zip(path, label) as folder:
            return [s.summary() for s in scan_dicom(folder, label).values()]
    if file_suffix(path) in SITK_SUFFIXES:
        raise UserError(
            f"{label}: {path} is a {SITK_SUFFIXES[file_suffix(path)]} file, not DICOM; it holds a single volume"
        )
    ds = read_header(path)
    if ds is None or not is_image(ds):
        raise UserError(f"{label}: {path} is not a DICOM image file; pass a DICOM series folder or .zip")
    return [DicomSeries(str(ds.get("SeriesInstanceUID", "")), [(path, ds)]).summary()]


# --------------------------------------------------------------------------- DICOM reading


def _rtstruct_mask(label: str, path: Path, folder: bool = False) -> str:
    """A mask given as RT Structure Set contours: a common export, and not a label image."""
    return (
        f"{label}: {path} {'holds only' if folder else 'is'} a DICOM RT Structure Set (RTSTRUCT: contours), "
        "which liverlesion does not read; "
        "give the lesions as a label mask (NIfTI, NRRD, MHA) or a DICOM SEG, e.g. converted with "
        "3D Slicer (SlicerRT) or rt-utils"
    )


def read_dicom_file(
    path: Path, series: str | None, kind: str, label: str, slice_tolerance: float, header_only: bool = False
) -> Volume | Grid | None:
    """Read one (multi-frame) DICOM file; ``header_only``: its header checks only (see :func:`_read_series`)."""
    ds = read_header(path)
    if ds is None:
        raise UserError(
            f"{label}: {path} is not a readable image (not DICOM, truncated or corrupt, and not .nii/.nii.gz/.nrrd/.mha/.zip); "
            f"check the file or pass the DICOM series folder"
        )
    if not is_image(ds):
        if kind == "mask" and str(ds.get("Modality", "")) == "RTSTRUCT":
            raise UserError(_rtstruct_mask(label, path))
        what = (
            f"a DICOM {ds.Modality} object" if "Modality" in ds else "an incomplete (truncated?) DICOM file"
        )
        instead = (
            "the CT series folder"
            if kind == "image"
            else "the lesion mask (a NIfTI / NRRD / MetaImage label image, a DICOM SEG or a DICOM mask series)"
        )
        raise UserError(
            f"{label}: {path} is {what} without an image; pass {instead} instead "
            f"(or copy the file again if it is truncated)"
        )
    if int(ds.get("NumberOfFrames", 1) or 1) <= 1:
        raise UserError(
            f"{label}: {path} is a single DICOM slice (a 2-D image); a 3-D volume is needed: "
            f"pass the folder that holds the whole series (e.g. {path.parent})"
        )
    s = DicomSeries(str(ds.SeriesInstanceUID), [(path, ds)])
    if series is not None and series.strip() != s.uid:
        raise UserError(
            f"{label}: series {series!r} is not in {path}; it holds series {describe_series({s.uid: s})}"
        )
    return _read_series(s, kind, label, path, slice_tolerance, fmt="dicom", header_only=header_only)


def read_dicom_folder(
    folder: Path,
    series: str | None,
    kind: str,
    label: str,
    slice_tolerance: float,
    source: Path,
    fmt: str,
    header_only: bool = False,
) -> Volume | Grid | None:
    """Read the series of a DICOM folder; ``header_only``: its grid from the headers (see :func:`_read_series`)."""
    found, skipped = scan_dicom(folder, label, with_skipped=True)
    if kind == "mask" and not found and skipped.get("non-image RTSTRUCT"):
        raise UserError(_rtstruct_mask(label, source, folder=True))
    chosen = select_series(found, series, label, source, skipped)
    return _read_series(chosen, kind, label, source, slice_tolerance, fmt=fmt, header_only=header_only)


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


def _floats(ds, keyword: str, n: int, label: str, f: Path, positive: bool = False) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
        assert arr.shape == (n,) and np.isfinite(arr).all()
        assert not positive or (arr > 0).all()
    except Exception as exc:
        raise UserError(
            f"{label}: DICOM file {f} has a missing or invalid {keyword} ({value!r}); "
            f"the slice geometry cannot be known: re-export the series"
        ) from exc
    return arr


def _check_rescale(ds, label: str, f: Path) -> None:
    """A slope of 0 or a non-number would make every HU the intercept (GDCM then quietly uses 1)."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if value is None or str(value).strip() == "":
            continue  # absent: stored values are HU already (slope 1, intercept 0)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not np.isfinite(number) or (keyword == "RescaleSlope" and number == 0):
            raise UserError(
                f"{label}: DICOM file {f} has an invalid {keyword} ({str(value).strip()!r}); Hounsfield units "
                "cannot be computed from it: re-export the series from the scanner or PACS"
            )


def _read_series(
    s: DicomSeries,
    kind: str,
    label: str,
    path: Path,
    slice_tolerance: float,
    fmt: str,
    header_only: bool = False,
) -> Volume | Grid | None:
    """Check a series' headers and decode its pixels.

    With ``header_only``, stop after the header checks (modality, pixel data lengths, rescale, slice
    grid) and return the :class:`Grid` the full read would give; None for a multi-frame file, whose
    per-frame geometry needs its full header.
    """
    ds0 = s.first
    _check_modality(ds0, kind, label, path)
    for f, ds in s.files:
        check_pixel_data(f, ds, label, path)
        if kind == "image":
            _check_rescale(ds, label, f)
    multi = [f for f, ds in s.files if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        if len(s.files) > 1:
            raise UserError(
                f"{label}: series {s.uid} in {path} mixes {len(multi)} multi-frame file(s) with other files; "
                f"pass a folder holding one multi-frame file or one classic slice series"
            )
        if header_only:
            return None
        # The per-frame geometry sequences were not parsed by the scan.
        full = read_header(s.files[0][0], full=True)
        return _read_multiframe(
            DicomSeries(s.uid, [(s.files[0][0], full or s.first)]), kind, label, path, fmt
        )
    rows, cols = int(ds0.get("Rows", 0) or 0), int(ds0.get("Columns", 0) or 0)
    check_voxel_count(rows * cols * len(s.files), (len(s.files), rows, cols), label, path)
    files, (spacing_xy, positions, direction, gap) = _sort_and_check_slices(s, label, path, slice_tolerance)
    if header_only:
        return header_grid((cols, rows, len(files)), (*spacing_xy, gap), positions[0], direction)
    img = _read_pixels([f for f, _ in files], kind, label, path)
    # Our header-derived geometry is authoritative (ITK derives spacing from the first two slices only).
    img.SetSpacing((float(spacing_xy[0]), float(spacing_xy[1]), float(gap)))
    img.SetOrigin(tuple(float(v) for v in positions[0]))
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    return _finish_dicom(img, files, positions, kind, label, path, fmt)


def _sort_and_check_slices(s: DicomSeries, label: str, path: Path, tol: float):
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
            f"from {format_values(ref, 3)}, e.g. {files[odd[0]][0].name}: {format_values(orients[odd[0]], 3)}); "
            f"one series must be one volume: remove the odd slices or pick another series with --series"
        )
    spacings = [_floats(ds, "PixelSpacing", 2, label, f, positive=True) for f, ds in files]
    if any(np.max(np.abs(sp - spacings[0])) > _PIXEL_SPACING_TOL * spacings[0].max() for sp in spacings):
        raise UserError(
            f"{label}: series {s.uid} in {path} mixes pixel spacings {sorted({format_values(sp, 4) for sp in spacings})}; "
            f"one series must be one volume: pick another series with --series"
        )
    row, col = ref[:3], ref[3:]
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise UserError(
            f"{label}: series {s.uid} in {path} has an invalid ImageOrientationPatient {format_values(ref, 4)}; re-export it"
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
            f"(e.g. {format_values(positions[dup[0] if len(dup) else 0], 2)} mm): it holds several volumes (phases, echoes or a "
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
    # Gantry tilt: slices square to their normal but each shifted in-plane, so the grid is sheared and
    # an orthogonal volume built from it would put every slice but the first in the wrong place.
    step = positions[-1] - positions[0]
    shift = float(np.linalg.norm(step - (step @ normal) * normal))
    if shift > 0.5 * float(spacings[0].min()):
        angle = float(np.degrees(np.arctan2(shift, depth[-1] - depth[0])))
        raise UserError(
            f"{label}: series {s.uid} in {path} is sheared (gantry tilt of about {angle:.1f} degrees: the last slice "
            f"is shifted {shift:.1f} mm in-plane from the first); liverlesion reads "
            f"orthogonal grids only: convert the series with dcm2niix, which corrects gantry tilt, and pass the NIfTI"
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
        with native_stderr_to_log(label):
            img = reader.Execute()
    except RuntimeError as exc:
        raise UserError(
            f"{label}: the DICOM slices in {path} could not be decoded (truncated/corrupt file or unsupported "
            f"compression): re-export the series uncompressed ({first_line(exc)})"
        ) from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(
            f"{label}: series in {path} is a colour image (e.g. a screenshot); pass the CT series"
        )
    return img


def _read_multiframe(s: DicomSeries, kind: str, label: str, path: Path, fmt: str) -> Volume:
    """A single multi-frame (enhanced CT) file; SimpleITK/GDCM decodes frames and geometry."""
    import SimpleITK as sitk

    f, ds = s.files[0]
    try:
        with native_stderr_to_log(label):
            img = sitk.ReadImage(str(f), sitk.sitkFloat32 if kind == "image" else sitk.sitkUnknown)
    except RuntimeError as exc:
        raise UserError(
            f"{label}: the multi-frame DICOM file {f} could not be decoded; convert it to a classic slice series "
            f"or NIfTI (e.g. with dcm2niix) and try again ({first_line(exc)})"
        ) from exc
    img = check_dimensions(img, label, f)
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
    ds0 = files[0][1] if header_is_full else (read_header(files[0][0], full=True) or files[0][1])
    meta = {
        "modality": str(ds0.get("Modality", "") or "") or None,
        "series_description": str(ds0.get("SeriesDescription", "") or "") or None,
        "manufacturer": str(ds0.get("Manufacturer", "") or "") or None,
        "source": str(path),
        "format": fmt,
    }
    if all(str(ds0.get(k, "") or "").strip() == "" for k in ("RescaleSlope", "RescaleIntercept")):
        meta["rescale_absent"] = True  # stored values taken as HU: check_ct_volume names it if they are not
    vol = sitk_to_volume(img, meta)
    vol.array = convert_array(vol.array, kind, label, path)
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
