"""Importer for the Medical Segmentation Decathlon (MSD) layout -> lesion masks + a liverlesion manifest.

Layout read (one task folder as extracted from ``TaskNN_Name.tar``; the tar's ``._*`` macOS
resource-fork files are ignored)::

    Task03_Liver/
      dataset.json          "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
                            "training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}, ...]
      imagesTr/liver_0.nii.gz ...
      labelsTr/liver_0.nii.gz ...
      imagesTs/ ...         (no labels: not read)

Liver collections: Task03_Liver (LiTS: 0 background, 1 liver, 2 cancer) and Task08_HepaticVessel
(0 background, 1 vessel, 2 tumour). Neither gives a per-tumour diagnosis (both hold primary and
secondary liver tumours), so the user chooses the class: ``--class-map 2=metastasis``. Label
values may also be given by name (``cancer=metastasis``). See :mod:`liverlesion.datasets.labelmap`
for the lesion rules and the outputs. MSD data is CC BY-SA 4.0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from liverlesion.datasets.labelmap import (
    Case,
    check_out,
    import_cases,
    is_junk,
    parse_class_map,
    safe_case_id,
    strip_ending,
)
from liverlesion.errors import UserError
from liverlesion.io import check_tolerance

LAYOUT = "the Medical Segmentation Decathlon layout: TaskNN_Name/ with dataset.json, imagesTr/ and labelsTr/"
LICENCE = "CC BY-SA 4.0 (Medical Segmentation Decathlon); derived masks must be shared under the same licence"
CT_MODALITIES = ("ct",)

LICENSE_NOTICE = """\
Medical Segmentation Decathlon - derived data
=============================================

The lesion masks in this folder were derived from a task of the Medical Segmentation Decathlon
(http://medicaldecathlon.com/; Antonelli et al., Nature Communications 13, 4128, 2022), whose
images and labels come from the sources the task's dataset.json names (Task03_Liver: LiTS).

License: Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA 4.0),
https://creativecommons.org/licenses/by-sa/4.0/

* Use, sharing and adaptation are allowed, also commercially, with attribution to the
  Decathlon and the original data sources.
* Anything derived from it (such as these masks and this manifest) that you share must be shared
  under CC BY-SA 4.0 too, with the changes indicated.

Lesion classes were assigned by the user's --class-map (see import_report.json); the Decathlon
gives no per-tumour diagnosis (its liver tumours are primary and secondary).

liverlesion outputs are for research use, not for diagnosis.
"""


def _hint(src: Path) -> str:
    """Which other importer fits a folder that is not MSD."""
    names = {c.name.lower() for c in src.iterdir()} if src.is_dir() else set()
    if any(n.startswith("3dircadb1.") for n in names) or {"patient_dicom", "masks_dicom"} & names:
        return "; it looks like 3D-IRCADb-01: use `liverlesion import ircadb`"
    if {"images", "labels"} <= names:
        return "; it looks like images/ + labels/ pairs: use `liverlesion import folder`"
    return ""


def find_task(src: str | Path) -> Path:
    """The task folder: ``src`` itself, or its only ``Task*`` child holding ``dataset.json``.

    Raises:
        UserError: Naming the expected layout and the missing parts.
    """
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: not found; expected {LAYOUT}")
    if not src.is_dir():
        hint = (
            " (extract it first: tar xf TaskNN_Name.tar)"
            if src.name.lower().endswith((".tar", ".gz"))
            else ""
        )
        raise UserError(f"{src}: is a file{hint}; expected {LAYOUT}")
    if not (src / "dataset.json").is_file():
        tasks = sorted(c for c in src.iterdir() if c.is_dir() and (c / "dataset.json").is_file())
        if len(tasks) == 1:
            return tasks[0]
        if len(tasks) > 1:
            raise UserError(
                f"{src}: holds several tasks ({', '.join(t.name for t in tasks)}); give one task folder"
            )
    missing = [
        n
        for n, ok in (
            ("dataset.json", (src / "dataset.json").is_file()),
            ("imagesTr/", (src / "imagesTr").is_dir()),
            ("labelsTr/", (src / "labelsTr").is_dir()),
        )
        if not ok
    ]
    if missing:
        raise UserError(f"{src}: not {LAYOUT}; missing {', '.join(missing)}{_hint(src)}")
    return src


def read_dataset_json(task: Path) -> dict[str, Any]:
    """``dataset.json`` of a task, checked for what the import needs (labels, CT modality)."""
    path = task / "dataset.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e}); re-extract the task") from e
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object with 'labels' and 'training'; re-extract the task")
    if "channel_names" in meta or "file_ending" in meta:
        raise UserError(
            f"{path}: this is an nnU-Net v2 dataset.json (channel_names/file_ending), not {LAYOUT}; "
            "use `liverlesion import folder` for nnU-Net raw datasets"
        )
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise UserError(f'{path}: no \'labels\' object (e.g. {{"0": "background", "2": "cancer"}}); {LAYOUT}')
    try:
        meta["labels"] = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError) as e:
        raise UserError(
            f'{path}: \'labels\' keys must be label values ("0", "1", ...), got {list(labels)[:4]}; {LAYOUT}'
        ) from e
    modality = meta.get("modality") or {}
    first = str(modality.get("0", "")) if isinstance(modality, dict) else ""
    if first and first.lower() not in CT_MODALITIES:
        raise UserError(
            f"{path}: modality {first!r}, not CT; liverlesion classifies lesions on CT (e.g. Task03_Liver, "
            "Task08_HepaticVessel)"
        )
    return meta


def find_cases(task: Path, meta: dict[str, Any]) -> list[Case]:
    """The training cases (image + label) of a task, every file checked to exist.

    Raises:
        UserError: No cases, or files the layout promises are missing (named).
    """
    pairs: list[tuple[Path, Path]] = []
    training = meta.get("training")
    if training is not None and not isinstance(training, list):
        raise UserError(
            f'{task / "dataset.json"}: "training" is {type(training).__name__} {str(training)[:40]!r}, not a list of '
            '{"image": ..., "label": ...} entries; re-extract the task, or delete the "training" key to import '
            "every image of imagesTr/ with its label of the same name"
        )
    if training:
        for i, entry in enumerate(training):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise UserError(
                    f'{task / "dataset.json"}: training entry {i} is not {{"image": ..., "label": ...}}; '
                    "re-extract the task"
                )
            for key in ("image", "label"):
                rel = PurePosixPath(str(entry[key]).replace("\\", "/"))
                if rel.is_absolute() or ".." in rel.parts or ":" in str(entry[key]):
                    raise UserError(
                        f"{task / 'dataset.json'}: training entry {i} {key} {str(entry[key])!r} points outside "
                        f"the task folder; entries are paths inside it (./imagesTr/CASE.nii.gz, ./labelsTr/CASE.nii.gz): "
                        "re-extract the task"
                    )
            pairs.append((task / str(entry["image"]), task / str(entry["label"])))
    else:  # no list: every image of imagesTr/ with its label of the same name
        for f in sorted((task / "imagesTr").iterdir()):
            if f.is_file() and not is_junk(f.name) and strip_ending(f.name) is not None:
                pairs.append((f, task / "labelsTr" / f.name))
    if not pairs:
        raise UserError(f"{task}: no training cases in dataset.json or imagesTr/; expected {LAYOUT}")
    folders = [str(p.relative_to(task)) for pair in pairs for p in pair if p.is_dir()]
    if folders:
        raise UserError(
            f"{task}: dataset.json lists folders where image files belong: {', '.join(folders[:5])}; "
            "each entry names one file (./imagesTr/CASE.nii.gz, ./labelsTr/CASE.nii.gz): re-extract the task"
        )
    missing = [str(p.relative_to(task)) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(
            f"{task}: {len(missing)} file(s) listed in dataset.json are missing: {', '.join(missing[:5])}{more}; "
            "re-extract the task (the layout is imagesTr/<case>.nii.gz + labelsTr/<case>.nii.gz)"
        )
    cases: list[Case] = []
    seen: set[str] = set()
    for image, label in pairs:
        case_id = safe_case_id(strip_ending(image.name) or image.stem)
        if case_id in seen:
            raise UserError(f"{task}: case {case_id!r} appears twice in dataset.json; keep one")
        seen.add(case_id)
        cases.append(Case(case_id, image, label))
    return cases


def import_msd(
    src: str | Path,
    out: str | Path,
    class_map: Sequence[str],
    overwrite: bool = False,
    tolerance: float = 1e-3,
) -> Path:
    """Convert one MSD task's training cases into lesion masks and a manifest.

    Everything (layout, ``dataset.json``, class map, output folder) is checked before the first
    image is read.

    Args:
        src: The task folder (e.g. ``Task03_Liver``) or a folder holding only it.
        out: Output folder (created atomically).
        class_map: ``VALUE=CLASS`` items, e.g. ``["2=metastasis"]``.
        overwrite: Replace ``out`` if it exists and is not empty.
        tolerance: Geometry tolerance (mm) between each CT and its label map.

    Returns:
        Path of ``OUT/manifest.csv``.

    Raises:
        UserError: Wrong layout (naming what is missing), unknown label value, bad geometry.
    """
    check_tolerance(tolerance)
    src, out = Path(src), Path(out)
    task = find_task(src)
    meta = read_dataset_json(task)
    cmap = parse_class_map(class_map, meta["labels"], where=str(task / "dataset.json"))
    cases = find_cases(task, meta)
    check_out(out, overwrite, src)
    return import_cases(
        cases,
        cmap,
        out,
        dataset=f"Medical Segmentation Decathlon {task.name}",
        source=task,
        licence=LICENCE,
        licence_notice=LICENSE_NOTICE,
        declared=meta["labels"],
        overwrite=overwrite,
        tolerance=tolerance,
        desc="import msd",
    )
