"""Importer for 3D-IRCADb-01 (IRCAD, Strasbourg) -> NIfTI volumes + a liverlesion manifest.

Layout read (as published; ``PATIENT_DICOM`` and ``MASKS_DICOM`` may each be a
folder or a ``.zip``, with or without a top-level folder of the same name)::

    3Dircadb1.N/
      PATIENT_DICOM/image_0 ... image_K        CT slices (no .dcm extension)
      MASKS_DICOM/<structure>/image_0 ...      one binary DICOM series per structure

Lesion structures (folder names, case-insensitive):

* tumours -> ``metastasis``: ``livertumor``, ``livertumorNN``, ``livertumor_NN``,
  ``livertumors``. 3D-IRCADb-01 tumours are mostly, but **not all**, colorectal
  metastases (the set also holds e.g. hepatocellular carcinomas), so the
  ``metastasis`` class is an approximation; the dataset gives no per-tumour
  histology.
* cysts -> ``cyst``: ``liverkyst``, ``liverkyste``, ``livercyst`` (and numbered variants).
* a bare ``tumor`` mask is intersected with the ``liver`` mask: only the part
  inside the liver counts (some patients have a tumour outside the liver).

Every other structure (liver, vessels, organs, ...) is ignored. Each lesion
structure is split into 3-D connected components (26-connectivity); components
of 1-2 voxels are annotation specks and are dropped (reported). Where two
lesions overlap, the overlapping voxels go to the larger lesion (reported);
a lesion entirely inside a larger one (a duplicate annotation) is dropped.

Outputs (built in a temporary folder, renamed into place)::

    OUT/images/ircadb1_NN.nii.gz   CT in HU, int16, canonical LPS
    OUT/masks/ircadb1_NN.nii.gz    one integer label per lesion
    OUT/manifest.csv               patient_id,image,mask,label,lesion_class (one row per lesion)
    OUT/import_report.json         per patient: structures, lesions, specks, overlaps, volumes
    OUT/LICENSE-NOTICE.txt         CC BY-NC-ND 4.0: do not redistribute OUT

Patients with no lesion left get no image/mask files and no manifest rows
(they are listed in the report). Finding the patients and indexing their parts (folder or
zip) is :mod:`liverlesion.datasets.ircadb_layout`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion import DISCLAIMER, __version__
from liverlesion.case_input import check_ct_volume
from liverlesion.datasets import refuse_empty_import
from liverlesion.datasets.ircadb_layout import (
    Part,
    Patient,
    classify_structure,
    discover_patients,
)
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_dir, check_out_spares_inputs, write_csv, write_json, write_text
from liverlesion.io import check_geometry, read_volume, write_volume
from liverlesion.progress import progress_disabled

log = logging.getLogger(__name__)

MAX_SPECK_VOXELS = 2  # components this small are annotation noise, not lesions
GEOMETRY_TOLERANCE_MM = 1e-3  # IRCAD masks share the image's slice headers exactly


LICENSE_NOTICE = """\
3D-IRCADb-01 - derived data
===========================

The images and masks in this folder were converted from 3D-IRCADb-01, published by
IRCAD (Research Institute against Digestive Cancer, Strasbourg, France):
https://www.ircad.fr/research/data-sets/

License: Creative Commons Attribution-NonCommercial-NoDerivatives 4.0 International
(CC BY-NC-ND 4.0), https://creativecommons.org/licenses/by-nc-nd/4.0/

* Non-commercial use only, with attribution to IRCAD / 3D-IRCADb-01.
* This folder is derived material and may not be redistributed (no sharing, no
  commits to repositories, no uploads). Each user must obtain the data from IRCAD.

Lesion classes were assigned by liverlesion from the mask folder names
(tumours -> "metastasis", cysts -> "cyst"). 3D-IRCADb-01 tumours are mostly, but not
all, metastases; the dataset gives no per-tumour histology.

liverlesion outputs are for research use, not for diagnosis.
"""


# --------------------------------------------------------------------------------------
# Masks -> lesion label map
# --------------------------------------------------------------------------------------


@dataclass
class _Lesion:
    label: int
    structure: str
    lesion_class: str
    n_voxels_annotated: int


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every non-zero voxel, or None when empty."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


@dataclass
class LabelBuilder:
    """Accumulates lesions from binary structure masks into one integer label map.

    Each mask is split into 26-connected components; specks (<= ``MAX_SPECK_VOXELS``)
    are dropped; a voxel claimed by two lesions goes to the larger one, so a later
    structure never silently overwrites an earlier one.
    """

    shape: tuple[int, ...]
    labels: np.ndarray = field(init=False)
    lesions: list[_Lesion] = field(default_factory=list)
    specks: list[dict[str, Any]] = field(default_factory=list)
    overlaps: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.zeros(self.shape, dtype=np.uint16)

    def add(self, mask: np.ndarray, structure: str, lesion_class: str) -> int:
        """Add the components of ``mask``; returns how many lesions were added."""
        from scipy import ndimage

        box = _bbox(mask)
        if box is None:
            return 0
        # Label only the mask's bounding box: lesions are small, the CT is not.
        comp, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
        labels = self.labels[box]  # a view: writes go into self.labels
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        speck_ids = [k for k in range(1, n + 1) if sizes[k] <= MAX_SPECK_VOXELS]
        if speck_ids:
            self.specks.append(
                {"structure": structure, "components": len(speck_ids), "voxels": int(sizes[speck_ids].sum())}
            )
        added = 0
        for k, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sl is None or sizes[k] <= MAX_SPECK_VOXELS:
                continue
            region = comp[sl] == k
            target = labels[sl]
            new = len(self.lesions) + 1
            assert new <= np.iinfo(self.labels.dtype).max, "more lesions than uint16 labels"
            others = np.unique(target[region])
            target[region & (target == 0)] = new
            for other in others[others > 0]:
                prev = self.lesions[other - 1]
                shared = region & (target == other)
                winner = new if sizes[k] > prev.n_voxels_annotated else int(other)
                if winner == new:
                    target[shared] = new
                self.overlaps.append(
                    {
                        "structures": [prev.structure, structure],
                        "voxels": int(shared.sum()),
                        "assigned_to": structure if winner == new else prev.structure,
                    }
                )
            self.lesions.append(_Lesion(new, structure, lesion_class, int(sizes[k])))
            added += 1
        return added

    def finish(self) -> tuple[np.ndarray, list[_Lesion], list[dict[str, Any]]]:
        """Renumber labels 1..K in insertion order; drop lesions swallowed by a larger one.

        Returns:
            ``(label_map, lesions, dropped)``; ``dropped`` lists the swallowed lesions.
        """
        counts = np.bincount(self.labels.ravel(), minlength=len(self.lesions) + 1)
        lut = np.zeros(len(self.lesions) + 1, dtype=np.uint16)
        kept: list[_Lesion] = []
        dropped: list[dict[str, Any]] = []
        for les in self.lesions:
            if counts[les.label] == 0:
                dropped.append({"structure": les.structure, "voxels": les.n_voxels_annotated})
                continue
            lut[les.label] = len(kept) + 1
            kept.append(_Lesion(len(kept) + 1, les.structure, les.lesion_class, int(counts[les.label])))
        dtype = np.uint8 if len(kept) < 256 else np.uint16
        if not dropped:  # labels are already 1..K: skip a full-volume lookup
            return self.labels.astype(dtype), kept, dropped
        return lut[self.labels].astype(dtype), kept, dropped


# --------------------------------------------------------------------------------------
# One patient
# --------------------------------------------------------------------------------------


def _read_mask(part: Part, structure: str, image, image_name: str, tmp: Path) -> np.ndarray:
    folder = part.folder(structure, tmp)
    try:
        mask = read_volume(folder, kind="mask", name=part.describe(structure))
    finally:
        if part.is_zip:
            shutil.rmtree(folder.parent, ignore_errors=True)
    check_geometry(
        image,
        mask,
        tolerance=GEOMETRY_TOLERANCE_MM,
        image_name=image_name,
        mask_name=part.describe(structure),
    )
    return np.asarray(mask.array) > 0


def _to_int16_hu(array: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.int16)
    return np.clip(np.rint(array), info.min, info.max).astype(np.int16)


def _import_patient(
    patient: Patient, out_dir: Path, tmp: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    pid = patient.patient_id
    structures = patient.masks.structures()
    roles = {s: classify_structure(s) for s in structures}
    lesion_structures = [s for s in structures if roles[s] in ("metastasis", "cyst", "tumor")]
    report: dict[str, Any] = {
        "patient_id": pid,
        "source": str(patient.path),
        "structures_found": structures,
        "lesion_structures": {s: roles[s] for s in lesion_structures},
        "ignored_structures": [s for s in structures if roles[s] is None or roles[s] == "liver"],
        "image": None,
        "mask": None,
        "lesions": [],
        "specks_dropped": [],
        "outside_liver_dropped": [],
        "overlaps": [],
        "contained_dropped": [],
        "warnings": [],
    }

    def warn(msg: str) -> None:
        report["warnings"].append(msg)
        log.warning("%s: %s", pid, msg)

    if not lesion_structures:
        warn("no tumour or cyst masks; patient skipped")
        return [], report

    ptmp = Path(tempfile.mkdtemp(prefix=f"{pid}-", dir=tmp))
    try:
        image_dir = patient.image.folder("", ptmp)
        image_name = patient.image.describe()
        image = read_volume(image_dir, kind="image", name=image_name)
        if patient.image.is_zip:
            shutil.rmtree(image_dir.parent, ignore_errors=True)
        check_ct_volume(image, image_name)  # predict's and cv's check: not a mask series in the CT's place
        report["shape_zyx"] = list(image.shape)
        report["spacing_zyx_mm"] = [round(s, 4) for s in image.spacing]

        liver: np.ndarray | None = None
        if any(roles[s] == "tumor" for s in lesion_structures):
            liver_names = [s for s in structures if roles[s] == "liver"]
            if liver_names:
                liver = _read_mask(patient.masks, liver_names[0], image, image_name, ptmp)

        builder = LabelBuilder(image.shape)
        for s in lesion_structures:
            role = roles[s]
            if role == "tumor" and liver is None:
                warn(f"bare {s!r} mask ignored: no 'liver' mask to check that it lies inside the liver")
                report["outside_liver_dropped"].append(
                    {"structure": s, "voxels": None, "reason": "no liver mask"}
                )
                continue
            mask = _read_mask(patient.masks, s, image, image_name, ptmp)
            if role == "tumor":
                # A bare `tumor` mask may mark a tumour outside the liver (not a liver lesion).
                inside = mask & liver
                outside = int(mask.sum() - inside.sum())
                if outside:
                    report["outside_liver_dropped"].append({"structure": s, "voxels": outside})
                    warn(f"{s!r}: {outside} voxels outside the liver mask dropped (bare tumour mask)")
                mask = inside
            n_specks_before = len(builder.specks)
            if builder.add(mask, s, "metastasis" if role == "tumor" else role) == 0 and not mask.any():
                warn(f"{s!r}: empty mask (inside the liver)" if role == "tumor" else f"{s!r}: empty mask")
            for sp in builder.specks[n_specks_before:]:
                log.warning(
                    "%s: dropped %d speck(s) of <= %d voxels (%d voxels) in %r",
                    pid,
                    sp["components"],
                    MAX_SPECK_VOXELS,
                    sp["voxels"],
                    s,
                )
        labels, lesions, contained = builder.finish()
        report["specks_dropped"] = builder.specks
        report["overlaps"] = builder.overlaps
        report["contained_dropped"] = contained
        for ov in builder.overlaps:
            warn(
                f"{ov['structures'][0]!r} and {ov['structures'][1]!r} overlap by {ov['voxels']} voxels; "
                f"assigned to the larger ({ov['assigned_to']!r})"
            )
        for c in contained:
            warn(f"a lesion of {c['structure']!r} lies entirely inside a larger lesion; dropped as duplicate")
        if not lesions:
            warn("no lesion left after dropping specks; patient skipped")
            return [], report

        image_rel = f"images/{pid}.nii.gz"
        mask_rel = f"masks/{pid}.nii.gz"
        write_volume(image.with_array(_to_int16_hu(np.asarray(image.array))), out_dir / image_rel)
        write_volume(image.with_array(labels, kind="mask"), out_dir / mask_rel)
        report["image"], report["mask"] = image_rel, mask_rel
        ml = image.voxel_volume_ml
        report["lesions"] = [
            {
                "label": les.label,
                "structure": les.structure,
                "lesion_class": les.lesion_class,
                "n_voxels": les.n_voxels_annotated,
                "volume_ml": round(les.n_voxels_annotated * ml, 3),
            }
            for les in lesions
        ]
        rows = [
            {
                "patient_id": pid,
                "image": image_rel,
                "mask": mask_rel,
                "label": les.label,
                "lesion_class": les.lesion_class,
            }
            for les in lesions
        ]
        return rows, report
    finally:
        shutil.rmtree(ptmp, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def import_ircadb(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert 3D-IRCADb-01 patients to NIfTI volumes, lesion label maps and a manifest.

    Tumour masks become class ``metastasis`` (3D-IRCADb-01 tumours are mostly,
    but not all, metastases), cyst masks class ``cyst``; a bare ``tumor`` mask
    counts only where it lies inside the ``liver`` mask. See the module
    docstring for the rules on specks and overlaps.

    Args:
        src: One ``3Dircadb1.N`` folder or a folder holding several.
        out: Output folder (created atomically).
        overwrite: Replace ``out`` if it exists and is not empty.

    Returns:
        Path of ``OUT/manifest.csv``.

    Raises:
        UserError: Unexpected layout, unreadable DICOM, mask geometry that does
            not match the CT, or an existing ``out`` without ``overwrite``.
    """
    import pandas as pd
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    patients = discover_patients(src)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; give a folder path for the output")
    check_out_spares_inputs(out, [("source folder", src)])

    rows: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    with (
        atomic_dir(out, overwrite=overwrite) as tmp_out,
        tempfile.TemporaryDirectory(prefix="ll-ircadb-") as tmp,
    ):
        for patient in tqdm(patients, desc="import ircadb", unit="patient", disable=progress_disabled()):
            p_rows, p_report = _import_patient(patient, tmp_out, Path(tmp))
            rows += p_rows
            reports.append(p_report)
        if not rows:
            refuse_empty_import(
                src,
                len(patients),
                "patient",
                [f"{r['patient_id']}: {r['warnings'][-1]}" for r in reports if r["warnings"]],
                "check that each patient's MASKS_DICOM holds livertumor*/liverkyst* masks",
            )

        manifest = pd.DataFrame(rows, columns=["patient_id", "image", "mask", "label", "lesion_class"])
        write_csv(tmp_out / "manifest.csv", manifest)
        by_class = manifest["lesion_class"].value_counts().to_dict() if len(manifest) else {}
        write_json(
            tmp_out / "import_report.json",
            {
                "dataset": "3D-IRCADb-01",
                "source": str(src),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "liverlesion_version": __version__,
                "license": "CC BY-NC-ND 4.0 (IRCAD); derived data, do not redistribute",
                "disclaimer": DISCLAIMER,
                "class_note": "tumours -> metastasis (3D-IRCADb-01 tumours are mostly, but not all, "
                "metastases); cysts -> cyst; bare 'tumor' masks only inside the liver",
                "rules": {
                    "connectivity": 26,
                    "speck_max_voxels": MAX_SPECK_VOXELS,
                    "overlap": "voxels go to the larger lesion; lesions fully inside a larger one are dropped",
                },
                "totals": {
                    "patients": len(patients),
                    "patients_with_lesions": len({r["patient_id"] for r in rows}),
                    "lesions": len(rows),
                    "by_class": {str(k): int(v) for k, v in by_class.items()},
                    "specks_dropped": sum(sp["components"] for r in reports for sp in r["specks_dropped"]),
                },
                "patients": reports,
            },
        )
        write_text(tmp_out / "LICENSE-NOTICE.txt", LICENSE_NOTICE)
    return out / "manifest.csv"


def import_summary(out: str | Path) -> str:
    """One line summarising ``OUT/import_report.json`` (for the CLI)."""
    import json

    out = Path(out)
    totals = json.loads((out / "import_report.json").read_text(encoding="utf-8"))["totals"]
    classes = ", ".join(f"{n} {c}" for c, n in sorted(totals["by_class"].items())) or "no lesions"
    return (
        f"imported {totals['patients_with_lesions']} of {totals['patients']} patient(s), {totals['lesions']} lesion(s) "
        f"({classes}; {totals['specks_dropped']} speck(s) dropped) -> {out / 'manifest.csv'} "
        f"(see import_report.json; CC BY-NC-ND 4.0: do not redistribute)"
    )
