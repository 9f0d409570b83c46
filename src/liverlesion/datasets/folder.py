"""Importer for folders of CT + label-map pairs (nnU-Net raw, or plain ``images/`` + ``labels/``).

Layouts read::

    nnU-Net v2 raw (DatasetNNN_Name/)            plain pairs
      dataset.json   "channel_names": {"0": "CT"},   images/CASE.nii.gz (or CASE_0000.nii.gz)
                     "labels": {"background": 0,    labels/CASE.nii.gz
                                "tumor": 2}, ...    dataset.json (optional, either style)
      imagesTr/CASE_0000.nii.gz
      labelsTr/CASE.nii.gz

Images and labels are matched by case name: the image's name without its ending and without a
``_0000`` channel suffix equals the label's. Only channel 0 is read (it must be the CT). An
nnU-Net v1 / Decathlon-style ``dataset.json`` (``"labels": {"2": "cancer"}``) is read too.
Endings: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``.

Label values are checked against ``dataset.json``'s labels when it exists, otherwise against the
values the label files hold (they are read once, before anything is written). See
:mod:`liverlesion.datasets.labelmap` for the lesion rules and the outputs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion.datasets.labelmap import (
    ENDINGS,
    Case,
    check_out,
    check_values_present,
    import_cases,
    is_junk,
    parse_class_map,
    safe_case_id,
    strip_ending,
)
from liverlesion.errors import UserError
from liverlesion.io import check_tolerance, read_volume

NNUNET = "nnU-Net v2 raw (dataset.json, imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz)"
PAIRS = "images/ + labels/ (images/CASE.nii.gz with labels/CASE.nii.gz)"
LAYOUTS = f"{NNUNET}, or {PAIRS}"
_CHANNEL_RE = re.compile(r"^(.*)_(\d{4})$")

LICENSE_NOTICE = """\
Lesion masks derived from a folder of CT label maps
===================================================

The lesion masks in this folder were derived from the label maps of the source folder named in
import_report.json. They carry the licence of that collection: check it before sharing anything
derived from it (e.g. MSD / nnU-Net versions of the Decathlon tasks: CC BY-SA 4.0, share alike;
3D-IRCADb-01: CC BY-NC-ND 4.0, no sharing of derived data).

Lesion classes were assigned by the user's --class-map (see import_report.json).

liverlesion outputs are for research use, not for diagnosis.
"""


def _labels_from_json(path: Path) -> tuple[dict[int, str], dict[str, Any]]:
    """Label value -> name from an nnU-Net v2 (name -> value) or v1/MSD (value -> name) ``dataset.json``."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e}); fix or remove it") from e
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise UserError(
            f'{path}: no \'labels\' object (e.g. {{"background": 0, "tumor": 2}}); fix or remove it'
        )
    out: dict[int, str] = {}
    for k, v in labels.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, int):  # v2: name -> value
            out[v] = str(k)
        elif isinstance(v, list):  # v2 region-based label (a union of values): not a value of its own
            continue
        elif re.fullmatch(r"\d+", str(k)):  # v1 / MSD: "value" -> name
            out[int(k)] = str(v)
        else:
            raise UserError(
                f'{path}: label {k!r}: {v!r} is neither name -> value (nnU-Net v2) nor "value" -> name (v1 / MSD)'
            )
    if not out:
        raise UserError(f"{path}: 'labels' holds no label value; fix or remove it")
    return out, meta


def _layout(src: Path) -> tuple[str, Path, Path]:
    """``(kind, images folder, labels folder)``; kind ``"nnunet"`` or ``"pairs"``."""
    if not src.exists():
        raise UserError(f"{src}: not found; expected {LAYOUTS}")
    if not src.is_dir():
        raise UserError(f"{src}: is a file; expected a folder in the layout {LAYOUTS}")
    names = {c.name for c in src.iterdir() if c.is_dir()}
    if {"imagesTr", "labelsTr"} <= names:
        return "nnunet", src / "imagesTr", src / "labelsTr"
    if {"images", "labels"} <= names:
        return "pairs", src / "images", src / "labels"
    lower = {n.lower() for n in names} | {c.name.lower() for c in src.iterdir()}
    missing_nn = [n + "/" for n in ("imagesTr", "labelsTr") if n not in names]
    missing_pairs = [n + "/" for n in ("images", "labels") if n not in names]
    hint = ""
    if any(n.startswith("3dircadb1.") for n in lower) or {"patient_dicom", "masks_dicom"} & lower:
        hint = "; it looks like 3D-IRCADb-01: use `liverlesion import ircadb`"
    elif (src / "manifest.csv").is_file():
        hint = f"; it holds a manifest.csv: pass {src / 'manifest.csv'} to `liverlesion inspect` or `cv` as it is"
    raise UserError(
        f"{src}: no layout `import folder` reads; expected {NNUNET} (missing {', '.join(missing_nn)}) "
        f"or {PAIRS} (missing {', '.join(missing_pairs)}){hint}"
    )


def _index(folder: Path, channels: bool) -> dict[str, dict[int, Path]]:
    """Case name -> {channel: file} of the image files of ``folder`` (channel 0 when unsuffixed)."""
    found: dict[str, dict[int, Path]] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or is_junk(f.name):
            continue
        stem = strip_ending(f.name)
        if stem is None:
            continue
        channel = 0
        m = _CHANNEL_RE.match(stem) if channels else None
        if m:
            stem, channel = m.group(1), int(m.group(2))
        if channel in found.setdefault(stem, {}):
            raise UserError(
                f"{folder}: case {stem!r} has two files for channel {channel} "
                f"({found[stem][channel].name}, {f.name}); keep one"
            )
        found[stem][channel] = f
    return found


def _listing(names: Sequence[str]) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def find_cases(src: str | Path) -> tuple[str, list[Case], dict[int, str] | None]:
    """Find the cases of a folder: ``(layout kind, cases, declared labels or None)``.

    Raises:
        UserError: Unknown layout (naming the expected layouts and what is missing), unpaired
            images or labels, a first channel that is not CT.
    """
    src = Path(src)
    kind, images_dir, labels_dir = _layout(src)
    declared: dict[int, str] | None = None
    if (src / "dataset.json").is_file():
        declared, meta = _labels_from_json(src / "dataset.json")
        channels = meta.get("channel_names") or meta.get("modality") or {}
        first = str(channels.get("0", "")) if isinstance(channels, dict) else ""
        if first and first.lower() != "ct":
            raise UserError(
                f"{src / 'dataset.json'}: channel 0 is {first!r}, not CT; liverlesion classifies lesions on CT"
            )
    elif kind == "nnunet":
        raise UserError(f"{src}: missing dataset.json; expected {NNUNET}")
    images = _index(images_dir, channels=True)
    labels = _index(labels_dir, channels=False)
    if not images:
        held = sorted(
            c.name + ("/" if c.is_dir() else "") for c in images_dir.iterdir() if not is_junk(c.name)
        )
        what = (
            f"; it holds {_listing(held)}, which `import folder` does not read (one volume file per case): "
            "convert DICOM series to NIfTI first (e.g. dcm2niix), or list the cases in a manifest CSV "
            "(its image column takes DICOM folders and zips)"
            if held
            else "; it is empty"
        )
        raise UserError(f"{images_dir}: no image files ({', '.join(ENDINGS)}){what}")
    no_ch0 = sorted(k for k, v in images.items() if 0 not in v)
    if no_ch0:
        raise UserError(
            f"{images_dir}: no channel 0 (CASE_0000) for {_listing(no_ch0)}; the CT must be channel 0"
        )
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise UserError(
            f"{labels_dir}: no label for {len(unlabelled)} image(s): {_listing(unlabelled)}; each image needs "
            f"{labels_dir.name}/CASE with the image's case name (layout {NNUNET if kind == 'nnunet' else PAIRS})"
        )
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise UserError(
            f"{images_dir}: no image for {len(orphans)} label(s): {_listing(orphans)}; "
            f"add the images or remove the labels"
        )
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for name in sorted(images):
        cid = safe_case_id(name)
        if cid in seen:
            raise UserError(
                f"{src}: case names {seen[cid]!r} and {name!r} give the same id {cid!r}; rename one"
            )
        seen[cid] = name
        cases.append(Case(cid, images[name][0], labels[name][0]))
    return kind, cases, declared


def _values_in_labels(cases: Sequence[Case]) -> dict[int, int]:
    """Label value -> number of label files holding it (reads every label file once)."""
    found: dict[int, int] = {}
    for c in cases:
        arr = np.asarray(read_volume(c.label, kind="mask", name=f"case {c.case_id} label").array)
        for v in np.unique(arr):
            found[int(v)] = found.get(int(v), 0) + 1
    return found


def import_folder(
    src: str | Path,
    out: str | Path,
    class_map: Sequence[str],
    overwrite: bool = False,
    tolerance: float = 1e-3,
) -> Path:
    """Convert a folder of CT + label-map pairs into lesion masks and a manifest.

    Args:
        src: An nnU-Net raw dataset folder, or a folder with ``images/`` and ``labels/``.
        out: Output folder (created atomically).
        class_map: ``VALUE=CLASS`` items, e.g. ``["2=metastasis"]``.
        overwrite: Replace ``out`` if it exists and is not empty.
        tolerance: Geometry tolerance (mm) between each CT and its label map.

    Returns:
        Path of ``OUT/manifest.csv``.

    Raises:
        UserError: Wrong layout (naming what is missing), unpaired files, unknown label value,
            bad geometry.
    """
    check_tolerance(tolerance)
    src, out = Path(src), Path(out)
    kind, cases, declared = find_cases(src)
    where = (
        str(src / "dataset.json")
        if declared is not None
        else str(src / ("labelsTr" if kind == "nnunet" else "labels"))
    )
    cmap = parse_class_map(class_map, declared, where=where)
    check_out(out, overwrite, src)
    if declared is None:
        check_values_present(cmap, _values_in_labels(cases), where)
    return import_cases(
        cases,
        cmap,
        out,
        dataset=f"{'nnU-Net raw' if kind == 'nnunet' else 'image/label pairs'} {src.name}",
        source=src,
        licence="the source collection's licence (see LICENSE-NOTICE.txt)",
        licence_notice=LICENSE_NOTICE,
        declared=declared,
        overwrite=overwrite,
        tolerance=tolerance,
        desc="import folder",
    )
