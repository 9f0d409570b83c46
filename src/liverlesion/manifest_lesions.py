"""The lesions of a manifest: check every image's and mask's header first, then read each image once,
its masks / SEGs / clicks, and number the lesions per patient; :func:`lesion_table` is the table of them (columns ``LESION_COLUMNS``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from liverlesion.case_input import check_ct_volume
from liverlesion.click import lesion_from_click
from liverlesion.dicom_seg import seg_lesions
from liverlesion.errors import UserError
from liverlesion.io import SITK_SUFFIXES, check_geometry, check_tolerance, file_suffix, read_grid, read_volume
from liverlesion.lesions import (
    LESION_COLUMNS,
    LesionWithMask,
    lesions_from_mask,
    make_lesion_id,
)
from liverlesion.manifest import read_manifest
from liverlesion.progress import progress_disabled
from liverlesion.seg_select import is_seg
from liverlesion.volume import Grid, Volume


def _text(value) -> str:
    """A manifest cell as text ("" for None / NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    return str(value)


def _as_manifest(manifest: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    if isinstance(manifest, pd.DataFrame):
        return manifest
    return read_manifest(manifest)


def iter_manifest_lesions(
    manifest: str | os.PathLike | pd.DataFrame,
    tolerance: float = 1e-3,
    series: str | None = None,
    progress: bool = True,
    min_voxels: int = 1,
    check_progress: bool | None = None,
    desc: str = "lesions",
    check_headers: bool = True,
) -> Iterator[tuple[Volume, list[LesionWithMask]]]:
    """Check every image's and mask's header, then read each image of a manifest once and yield it with its lesions.

    The header check (:func:`check_manifest_headers`) runs when this is called, before any voxel
    is read: a mask on another grid than its image, an unreadable or truncated header, a 2-D or
    4-D image in the last row is refused with the message the full read would give, before the
    first image is read. Then rows are grouped by image (and series); each image and each mask
    file is read once; masks are checked against the image (``io.check_geometry``). Images come
    in order of first appearance in the manifest. Lesion IDs are
    ``{patient_id}-L{nn}``, numbered per patient in that processing order (rows in
    manifest order within an image), which equals manifest order whenever a
    patient's rows for one image are contiguous, and is stable across runs.

    Args:
        manifest: Manifest path, or a DataFrame from :func:`liverlesion.manifest.read_manifest`.
        tolerance: Geometry tolerance in mm between image and mask.
        series: SeriesInstanceUID for rows whose ``series`` is empty.
        progress: Show a progress bar over images (stderr).
        min_voxels: Mask components with fewer voxels are dropped.
        check_progress: Show the header check's progress bar (default: as ``progress``).
        desc: The progress bar's label.
        check_headers: Run the header check (False: a second pass over inputs already read in full).

    Returns:
        An iterator of ``(image, [(Lesion, LesionMask), ...])``, one image at a time.
    """
    check_tolerance(tolerance)  # before reading any image
    groups = _image_groups(_as_manifest(manifest), series)
    if check_headers:
        check_manifest_headers(
            groups, tolerance, progress=progress if check_progress is None else check_progress
        )
    return _iter_images(groups, tolerance, progress, min_voxels, desc)


def _image_groups(df: pd.DataFrame, series: str | None) -> dict[tuple[str, str], list]:
    """The manifest rows by (image path, series), in order of first appearance.

    Raises:
        UserError: ``series`` given, but no row it would apply to (an empty ``series`` cell) has a DICOM
            image: it would be ignored, and the user would believe a series had been chosen.
    """
    if series:
        takers = [rec for rec in df.itertuples(index=False) if not _text(getattr(rec, "series", ""))]
        if all(file_suffix(Path(_text(rec.image_path))) in SITK_SUFFIXES for rec in takers):
            raise UserError(
                f"--series {series}: no manifest row it applies to (those with an empty series cell) has a DICOM "
                "image, so it would choose nothing (a NIfTI, NRRD or MetaImage file holds one volume); drop --series"
            )
    groups: dict[tuple[str, str], list] = {}
    for rec in df.itertuples(index=False):
        key = (_text(rec.image_path), _text(getattr(rec, "series", "")) or (series or ""))
        groups.setdefault(key, []).append(rec)
    return groups


def check_manifest_headers(
    groups: dict[tuple[str, str], list], tolerance: float, progress: bool = True
) -> None:
    """Look at every image and mask of a manifest through its header alone, before any voxel is read.

    For each image (``io.read_grid``: readable header, one 3-D volume, a complete DICOM series, an
    uncompressed file as long as its header says) and each label-mask file, whose grid must match its
    image's (``io.check_geometry``, the full read's comparison); a DICOM SEG and a click row have no
    mask grid, so only their image is looked at. The names in the messages are the full read's
    (``manifest row N image`` / ``mask``), so a problem reads the same whichever finds it; what the
    headers cannot show (voxel values, a truncated ``.nii.gz``, a zip's or a SEG's contents) is left
    to the full read.

    Args:
        groups: The manifest rows by image (:func:`_image_groups`).
        tolerance: Geometry tolerance in mm between image and mask.
        progress: Show a progress bar over images (stderr).
    """
    masks: dict[str, Grid | None] = {}  # a mask file's header is read once
    with _images_bar(groups, "checking headers", progress, leave=False) as bar:
        for (image_path, image_series), recs in bar:
            name = f"manifest row {recs[0].row} image"
            image = read_grid(image_path, series=image_series or None, kind="image", name=name)
            checked: set[str] = set()  # as the full read: each mask once per image, at its first row
            for rec in recs:
                mask_path = _text(rec.mask_path)
                if not mask_path or mask_path in checked or is_seg(mask_path):
                    continue
                checked.add(mask_path)
                if mask_path not in masks:
                    masks[mask_path] = read_grid(mask_path, kind="mask", name=f"manifest row {rec.row} mask")
                mask = masks[mask_path]
                if image is not None and mask is not None:
                    check_geometry(image, mask, tolerance=tolerance, **_geometry_names(rec))


def _images_bar(groups: dict[tuple[str, str], list], desc: str, progress: bool, leave: bool = True) -> tqdm:
    """A progress bar over a manifest's images (stderr; a terminal only). Used as ``with``: it closes when
    an error propagates, so the message starts on its own line."""
    return tqdm(
        groups.items(),
        desc=desc,
        unit="image",
        leave=leave,
        disable=not progress or progress_disabled(),
        file=sys.stderr,
    )


def _geometry_names(rec) -> dict[str, str]:
    """How ``check_geometry`` names a row's image and mask, in the header check and the full read alike."""
    return {
        "image_name": f"manifest row {rec.row} image {str(rec.image)!r}",
        "mask_name": f"manifest row {rec.row} mask {str(rec.mask)!r}",
    }


def _iter_images(
    groups: dict[tuple[str, str], list],
    tolerance: float,
    progress: bool,
    min_voxels: int,
    desc: str = "lesions",
) -> Iterator[tuple[Volume, list[LesionWithMask]]]:
    """Read each image of ``groups`` and yield it with its lesions (see :func:`iter_manifest_lesions`)."""
    counters: dict[str, int] = {}
    seen: set[str] = set()  # lesion ids so far: a label mask's ids are its labels and may collide
    # `with` closes the bar when an error propagates, so the message starts on its own line.
    with _images_bar(groups, desc, progress) as bar:
        for (image_path, image_series), recs in bar:
            name = f"manifest row {recs[0].row} image"
            image = read_volume(image_path, series=image_series or None, kind="image", name=name)
            check_ct_volume(image, f"{name} {recs[0].image!r}")  # predict's check: CT in HU, sane geometry
            yield image, _image_lesions(image, recs, counters, tolerance, min_voxels, seen)


def _image_lesions(
    image: Volume,
    recs: list,
    counters: dict[str, int],
    tolerance: float,
    min_voxels: int,
    seen: set[str] | None = None,
) -> list[LesionWithMask]:
    """Lesions of the manifest rows ``recs`` that share ``image``; ``counters`` numbers them per patient."""
    masks: dict[str, Volume] = {}  # a mask file shared by several rows (labels) is read once
    found: list[LesionWithMask] = []
    for rec in recs:
        pid = str(rec.patient_id)
        number = counters.get(pid, 0) + 1
        mask_path = _text(rec.mask_path)
        if mask_path and is_seg(mask_path):  # a DICOM SEG: its label selects segments
            items = seg_lesions(
                image,
                mask_path,
                rec.label,
                pid,
                str(rec.lesion_class),
                tolerance=tolerance,
                first_number=number,
                image_ref=str(rec.image),
                mask_ref=str(rec.mask),
                name=f"manifest row {rec.row} mask",
                image_name=f"manifest row {rec.row} image",
                min_voxels=min_voxels,
            )
        elif mask_path:
            mask = masks.get(mask_path)
            if mask is None:
                mask = read_volume(mask_path, kind="mask", name=f"manifest row {rec.row} mask")
                check_geometry(image, mask, tolerance=tolerance, **_geometry_names(rec))
                masks[mask_path] = mask
            label = None if pd.isna(rec.label) else int(rec.label)
            items = lesions_from_mask(
                image,
                mask,
                label,
                pid,
                str(rec.lesion_class),
                first_number=number,
                image_ref=str(rec.image),
                mask_ref=str(rec.mask),
                mask_name=f"manifest row {rec.row} mask {rec.mask!r}",
                min_voxels=min_voxels,
            )
        else:
            items = [
                lesion_from_click(
                    image,
                    (rec.x_mm, rec.y_mm, rec.z_mm),
                    float(rec.diameter_mm),
                    pid,
                    str(rec.lesion_class),
                    lesion_id=make_lesion_id(pid, number),
                    image_ref=str(rec.image),
                    point_name=f"manifest row {rec.row} click",
                )
            ]
        # A multi-label mask numbers its lesions by label: later rows continue after the largest.
        used = [int(str(les.lesion_id).rsplit("-L", 1)[1]) for les, _ in items]
        counters[pid] = max([number - 1 + len(items), *used])
        if seen is not None:
            for les, _ in items:
                if les.lesion_id in seen:
                    raise UserError(
                        f"manifest row {rec.row}: lesion id {les.lesion_id} is already taken by an earlier row "
                        "(a multi-label mask keeps its labels as lesion numbers); put the label mask's row "
                        "first for this patient, or select one label per row"
                    )
                seen.add(les.lesion_id)
        found.extend(items)
    return found


def lesion_table(
    manifest: str | os.PathLike | pd.DataFrame,
    tolerance: float = 1e-3,
    series: str | None = None,
    progress: bool = True,
    min_voxels: int = 1,
) -> pd.DataFrame:
    """The lesion table of a manifest (columns :data:`LESION_COLUMNS`), in lesion-ID order per image."""
    rows = [
        lesion.to_row()
        for _, items in iter_manifest_lesions(manifest, tolerance, series, progress, min_voxels)
        for lesion, _ in items
    ]
    table = pd.DataFrame(rows, columns=list(LESION_COLUMNS))
    table["label"] = table["label"].astype("Int64")
    return table
