"""Shared by the label-map importers (``import msd``, ``import folder``): class maps and the case loop.

Public collections such as the Medical Segmentation Decathlon or nnU-Net raw datasets give one
NIfTI label map per CT, with integer values whose meaning ``dataset.json`` names (e.g. 0
background, 1 liver, 2 cancer). The user says which values are lesions and of which class
(``--class-map 2=metastasis``); each 3-D connected component (26-connectivity) of a mapped value
is one lesion; components of 1-2 voxels are annotation specks and are dropped (reported). The
rules are those of the 3D-IRCADb importer (:class:`liverlesion.datasets.ircadb.LabelBuilder`).

Outputs (built in a temporary folder, renamed into place)::

    OUT/masks/<case>.nii.gz     one integer label per lesion, on the CT's grid
    OUT/manifest.csv            patient_id,image,mask,label,lesion_class; image = the source CT (absolute path)
    OUT/import_report.json      per case: lesions, specks, label values found; totals; licence
    OUT/LICENSE-NOTICE.txt      the collection's licence and what it allows

The CTs are not copied: the manifest points at them where they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion import DISCLAIMER, __version__
from liverlesion.case_input import check_ct_volume
from liverlesion.datasets import refuse_empty_import
from liverlesion.datasets.ircadb import MAX_SPECK_VOXELS, LabelBuilder
from liverlesion.errors import UserError
from liverlesion.fileio import (
    atomic_dir,
    check_out_spares_inputs,
    check_output_dir,
    write_csv,
    write_json,
    write_text,
)
from liverlesion.io import check_geometry, read_volume, write_volume
from liverlesion.progress import progress_disabled

log = logging.getLogger(__name__)

#: What a class name may hold (it becomes a manifest value and a column name ``prob_<class>``).
_CLASS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
#: File endings of the images and labels read (NIfTI as published; NRRD/MHA for home-made folders).
ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass(frozen=True)
class Case:
    """One CT with its label map."""

    case_id: str
    image: Path
    label: Path


def strip_ending(name: str) -> str | None:
    """``name`` without its image file ending, or None when it has none of :data:`ENDINGS`."""
    low = name.lower()
    for e in ENDINGS:
        if low.endswith(e):
            return name[: -len(e)]
    return None


def is_junk(name: str) -> bool:
    """macOS resource forks (``._liver_0.nii.gz``, shipped inside the MSD tars) and hidden files."""
    return name.startswith(".") or name == "__MACOSX"


def _describe_labels(labels: Mapping[int, str]) -> str:
    return ", ".join(f"{v} {n}" if n else str(v) for v, n in sorted(labels.items()))


def parse_class_map(
    specs: Sequence[str], labels: Mapping[int, str] | None, where: str, option: str = "--class-map"
) -> dict[int, str]:
    """Parse ``VALUE=CLASS`` items (repeated and/or comma-separated) into ``{label value: class}``.

    Args:
        specs: The option's values, e.g. ``["2=metastasis"]`` or ``["1=cyst,2=metastasis"]``.
            VALUE is a label value or, when ``labels`` are known, a label name (``cancer=metastasis``).
        labels: The label values the collection declares (value -> name, background included), or
            None when they are not declared (checked later against the label files).
        where: Where the labels are declared, for messages (e.g. ``"dataset.json"``).
        option: The option's name, for messages.

    Returns:
        Label value -> class name, at least one item.

    Raises:
        UserError: Bad syntax, background (0), unknown label value or name, a value given twice.
    """
    items = [s.strip() for spec in specs for s in str(spec).split(",") if s.strip()]
    if not items:
        raise UserError(f"missing {option}: say which label values are lesions, e.g. {option} 2=metastasis")
    by_name = {n.lower(): v for v, n in (labels or {}).items() if n}
    out: dict[int, str] = {}
    for item in items:
        key, sep, cls = item.partition("=")
        key, cls = key.strip(), cls.strip()
        if not sep or not key or not cls:
            raise UserError(f"{option} {item!r}: expected VALUE=CLASS, e.g. 2=metastasis")
        if not _CLASS_RE.match(cls):
            raise UserError(
                f"{option} {item!r}: class {cls!r} must start with a letter and hold only letters, digits, _ or -"
            )
        if re.fullmatch(r"[+-]?\d+", key):
            value = int(key)
        elif key.lower() in by_name:
            value = by_name[key.lower()]
        else:
            known = f"; {where} labels: {_describe_labels(labels)}" if labels else ""
            raise UserError(
                f"{option} {item!r}: {key!r} is neither a label value nor a label name{known}; "
                f"give e.g. {option} 2={cls}"
            )
        if value == 0:
            raise UserError(
                f"{option} {item!r}: 0 is the background, not a lesion; map a lesion label (1, 2, ...)"
            )
        if labels is not None and value not in labels:
            lesion_values = ", ".join(str(v) for v in sorted(labels) if v != 0) or "none"
            raise UserError(
                f"{option} {item!r}: label {value} is not in {where} (labels: {_describe_labels(labels)}); "
                f"map one of {lesion_values}"
            )
        if value in out and out[value] != cls:
            raise UserError(f"{option}: label {value} is mapped twice ({out[value]} and {cls}); map it once")
        out[value] = cls
    return out


def check_values_present(class_map: Mapping[int, str], found: Mapping[int, int], where: str) -> None:
    """Refuse mapped values that no label file holds (for collections that do not declare their labels).

    Args:
        class_map: Label value -> class.
        found: Label value -> number of label files holding it (background included).
        where: The label folder, for the message.
    """
    missing = [v for v in class_map if v not in found]
    if missing:
        shown = ", ".join(f"{v} (in {n} file{'s' if n != 1 else ''})" for v, n in sorted(found.items()))
        raise UserError(
            f"--class-map: label {', '.join(map(str, missing))} is in no label file of {where} "
            f"(values found: {shown or 'none'}); map values that occur"
        )


def safe_case_id(name: str) -> str:
    """A case name usable as a file name and patient_id (other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._") or "case"


def check_out(out: Path, overwrite: bool, src: Path | None = None) -> None:
    """Refuse an output path that is a file, is or holds the source ``src``, or an existing non-empty folder
    without ``overwrite`` (before any work)."""
    check_output_dir(out)
    check_out_spares_inputs(out, [("source folder", src)])
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; give a folder path for the output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"{out}: output folder already exists and is not empty; choose another path or pass --overwrite"
        )


def _import_case(
    case: Case,
    class_map: Mapping[int, str],
    declared: Mapping[int, str] | None,
    tmp_out: Path,
    tolerance: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    image = read_volume(case.image, kind="image", name=f"case {case.case_id} image")
    # cv's check on every manifest image, here so that a label map in the image's place fails the import
    check_ct_volume(image, f"case {case.case_id} image {case.image}")
    label = read_volume(case.label, kind="mask", name=f"case {case.case_id} label")
    check_geometry(
        image,
        label,
        tolerance=tolerance,
        image_name=f"case {case.case_id} image {case.image.name}",
        mask_name=f"label {case.label.name}",
    )
    arr = np.asarray(label.array)
    values = [int(v) for v in np.unique(arr)]
    report: dict[str, Any] = {
        "case": case.case_id,
        "image": str(case.image),
        "label": str(case.label),
        "shape_zyx": list(image.shape),
        "spacing_zyx_mm": [round(s, 4) for s in image.spacing],
        "label_values": values,
        "mask": None,
        "lesions": [],
        "specks_dropped": [],
        "warnings": [],
    }
    if declared is not None:
        undeclared = [v for v in values if v not in declared]
        if undeclared:
            msg = f"label values {undeclared} are not declared in dataset.json; ignored"
            report["warnings"].append(msg)
            log.warning("%s: %s", case.case_id, msg)
    builder = LabelBuilder(image.shape)
    for value, cls in class_map.items():
        if value in values:
            builder.add(arr == value, f"label {value}", cls)
    labels, lesions, _ = builder.finish()  # mapped values do not overlap: nothing is contained
    report["specks_dropped"] = builder.specks
    for sp in builder.specks:
        log.info(
            "%s: dropped %d speck(s) of <= %d voxels in %s",
            case.case_id,
            sp["components"],
            MAX_SPECK_VOXELS,
            sp["structure"],
        )
    if not lesions:
        return [], report
    mask_rel = f"masks/{case.case_id}.nii.gz"
    write_volume(image.with_array(labels, kind="mask"), tmp_out / mask_rel)
    report["mask"] = mask_rel
    ml = image.voxel_volume_ml
    report["lesions"] = [
        {
            "label": les.label,
            "from_value": int(les.structure.split()[-1]),
            "lesion_class": les.lesion_class,
            "n_voxels": les.n_voxels_annotated,
            "volume_ml": round(les.n_voxels_annotated * ml, 3),
        }
        for les in lesions
    ]
    rows = [
        {
            "patient_id": case.case_id,
            "image": str(case.image.resolve()),
            "mask": mask_rel,
            "label": les.label,
            "lesion_class": les.lesion_class,
        }
        for les in lesions
    ]
    return rows, report


def import_cases(
    cases: Sequence[Case],
    class_map: Mapping[int, str],
    out: Path,
    *,
    dataset: str,
    source: Path,
    licence: str,
    licence_notice: str,
    declared: Mapping[int, str] | None,
    overwrite: bool = False,
    tolerance: float = 1e-3,
    desc: str = "import",
) -> Path:
    """Turn checked cases into lesion masks and a manifest in ``out`` (atomically).

    Args:
        cases: The cases, already found and checked (files exist, names unique).
        class_map: Label value -> class (checked).
        out: Output folder.
        dataset: The collection's name, for the report.
        source: The folder read, for the report.
        licence: One line on the licence, for the report and the summary.
        licence_notice: Text of ``LICENSE-NOTICE.txt``.
        declared: Label values the collection declares (value -> name), or None.
        overwrite: Replace ``out`` if it exists and is not empty.
        tolerance: Geometry tolerance (mm) between each CT and its label map.
        desc: Progress bar label.

    Returns:
        Path of ``OUT/manifest.csv``.
    """
    import pandas as pd
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    with atomic_dir(out, overwrite=overwrite) as tmp_out:
        for case in tqdm(cases, desc=desc, unit="case", disable=progress_disabled()):
            c_rows, c_report = _import_case(case, class_map, declared, tmp_out, tolerance)
            rows += c_rows
            reports.append(c_report)
        if not rows:
            refuse_empty_import(
                source,
                len(cases),
                "case",
                [
                    f"{r['case']}: label values {r['label_values']}"
                    + (", specks only" if r["specks_dropped"] else "")
                    for r in reports
                ],
                f"check --class-map ({_describe_labels(class_map)}) against the label values found",
            )
        manifest = pd.DataFrame(rows, columns=["patient_id", "image", "mask", "label", "lesion_class"])
        write_csv(tmp_out / "manifest.csv", manifest)
        by_class = manifest["lesion_class"].value_counts().to_dict() if len(manifest) else {}
        write_json(
            tmp_out / "import_report.json",
            {
                "dataset": dataset,
                "source": str(source),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "liverlesion_version": __version__,
                "license": licence,
                "disclaimer": DISCLAIMER,
                "class_map": {str(k): v for k, v in sorted(class_map.items())},
                "declared_labels": None
                if declared is None
                else {str(k): v for k, v in sorted(declared.items())},
                "rules": {
                    "connectivity": 26,
                    "speck_max_voxels": 2,
                    "lesion": "each connected component of a mapped label value",
                },
                "totals": {
                    "patients": len(cases),
                    "patients_with_lesions": len({r["patient_id"] for r in rows}),
                    "lesions": len(rows),
                    "by_class": {str(k): int(v) for k, v in by_class.items()},
                    "specks_dropped": sum(sp["components"] for r in reports for sp in r["specks_dropped"]),
                },
                "cases": reports,
            },
        )
        write_text(tmp_out / "LICENSE-NOTICE.txt", licence_notice)
    return out / "manifest.csv"


def import_summary(out: str | Path) -> str:
    """One line summarising ``OUT/import_report.json`` (for the CLI)."""
    import json

    out = Path(out)
    rep = json.loads((out / "import_report.json").read_text(encoding="utf-8"))
    t = rep["totals"]
    classes = ", ".join(f"{n} {c}" for c, n in sorted(t["by_class"].items())) or "no lesions"
    return (
        f"imported {t['patients_with_lesions']} of {t['patients']} case(s), {t['lesions']} lesion(s) "
        f"({classes}; {t['specks_dropped']} speck(s) dropped) -> {out / 'manifest.csv'} "
        f"(see import_report.json; {rep['license']})"
    )
