"""Importer for TCIA *Colorectal-Liver-Metastases* (CRLM) -> a liverlesion manifest over the DICOM as it is.

Layout read (as the NBIA Data Retriever writes it with descriptive folder names; ``SRC`` may
be the download folder ``manifest-*``, the collection folder, or one patient folder)::

    manifest-NNNNNNNNNNNNN/                 (optional) with metadata.csv
      Colorectal-Liver-Metastases/
        CRLM-CT-1001/                       one folder per patient
          MM-DD-YYYY-NA-<study>-NNNNN/      one study
            N.000000-NA-NNNNN/              the CT series: 1-001.dcm, 1-002.dcm, ...
            N.000000-Segmentation-NNNNN/    the DICOM SEG: 1-1.dcm

Series are recognised by content, not by their folders' descriptive names: a file is a SEG when
it has SOP class Segmentation Storage (also when it was saved into the CT series folder), and the
CT is the series the SEG references (ReferencedSeriesSequence). Each SEG holds the segments ``Liver``, ``Liver Remnant``,
``Hepatic``, ``Portal`` (veins) and ``Tumor_1``, ``Tumor_2``, ...

Rules: tumour segments (labels matching ``Tumor*``, case-insensitive) become class
``metastasis``; every 3-D connected component (26-connectivity) of the union of a patient's
tumour segments is a lesion (``label`` ``Tumor*`` in the manifest, see
:mod:`liverlesion.dicom_seg`). Liver, remnant and vessel segments are ignored. Nothing is
copied or converted: the manifest points at the CT series folders and SEG files (relative to
the manifest), so keep ``OUT`` and ``SRC`` where they are (or move them together).

Outputs (built in a temporary folder, renamed into place)::

    OUT/manifest.csv             patient_id,image,mask,label,lesion_class (one row per SEG)
    OUT/import_report.json       per patient: series, segments, lesions and their volumes, problems
    OUT/LICENSE-NOTICE.txt       CC BY 4.0: attribution required

Every SEG is read onto its CT during the import, so a patient whose SEG cannot be used
(tumour segments that overlap, no tumour segment, frames off the CT grid) is reported and
skipped, not silently imported. A layout that is not this collection's is refused before any
work, naming the expected layout and what is missing.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from liverlesion import DISCLAIMER, __version__
from liverlesion.datasets import refuse_empty_import
from liverlesion.dicom_seg import referenced_series, seg_lesions
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_dir, check_out_spares_inputs, write_json, write_text
from liverlesion.io import read_volume
from liverlesion.manifest import write_manifest
from liverlesion.progress import progress_disabled
from liverlesion.seg_select import SEG_SOP_CLASS_UID, read_seg_segments, select_segments, sop_classes

log = logging.getLogger(__name__)

COLLECTION = "Colorectal-Liver-Metastases"
TUMOUR_PATTERN = "Tumor*"
_PATIENT_RE = re.compile(r"^CRLM-CT-\d+$", re.IGNORECASE)
_EXPECTED = (
    f"[manifest-*/]{COLLECTION}/CRLM-CT-NNNN/<study>/<series>/*.dcm, each study holding a CT series "
    "and a DICOM SEG series (N.000000-Segmentation-NNNNN/1-1.dcm) that references it"
)

LICENSE_NOTICE = """\
Colorectal-Liver-Metastases (TCIA) - manifest
=============================================

The manifest in this folder points at images and segmentations of the Colorectal-Liver-
Metastases collection of The Cancer Imaging Archive:

Simpson, A. L., Peoples, J., Creasy, J. M., Fichtinger, G., Gangai, N., Lasso, A., Keshava
Murthy, K. N., Shia, J., D'Angelica, M. I., & Do, R. K. G. (2023). Preoperative CT and Survival
Data for Patients Undergoing Resection of Colorectal Liver Metastases (Colorectal-Liver-
Metastases) (Version 2) [Data set]. The Cancer Imaging Archive.
https://doi.org/10.7937/QXK2-QG03

License: Creative Commons Attribution 4.0 International (CC BY 4.0),
https://creativecommons.org/licenses/by/4.0/

* Use, share and adapt, also commercially, with attribution: cite the data set above
  (and the TCIA citation, https://doi.org/10.1007/s10278-013-9622-7), link the licence and
  say what was changed.
* Lesion classes were assigned by liverlesion: every tumour segment is a colorectal
  metastasis (the collection's inclusion criterion); the lesions are the connected
  components of the tumour segments.

liverlesion outputs are for research use, not for diagnosis.
"""


@dataclass
class _Series:
    folder: Path
    files: list[Path]
    uid: str
    sop_class: str
    modality: str


@dataclass
class _Study:
    patient_id: str
    folder: Path
    series: list[_Series] = field(default_factory=list)


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX" or name.lower() in ("thumbs.db", "desktop.ini")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_junk(p.name))


def _describe(folder: Path, limit: int = 8) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not _is_junk(p.name))
    except OSError:
        return "nothing readable"
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def find_patient_folders(src: str | os.PathLike) -> list[Path]:
    """The ``CRLM-CT-NNNN`` patient folders under ``src`` (a download, collection or patient folder).

    Raises:
        UserError: ``src`` is missing, or holds no patient folder (naming the expected layout).
    """
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: not found; give the TCIA {COLLECTION} download folder")
    if not src.is_dir():
        raise UserError(
            f"{src}: is a file; give the TCIA {COLLECTION} download folder (expected {_EXPECTED})"
        )
    if _PATIENT_RE.match(src.name):
        return [src]
    roots = [
        src,
        src / COLLECTION,
        *(d / COLLECTION for d in _subdirs(src) if d.name.lower().startswith("manifest-")),
    ]
    for root in roots:
        if root.is_dir():
            patients = [d for d in _subdirs(root) if _PATIENT_RE.match(d.name)]
            if patients:
                return patients
    hint = ""
    if any(d.name.lower().startswith("3dircadb") for d in _subdirs(src)) or src.name.lower().startswith(
        "3dircadb"
    ):
        hint = "; this looks like 3D-IRCADb-01: use `liverlesion import ircadb`"
    raise UserError(
        f"{src}: not the TCIA {COLLECTION} layout: no CRLM-CT-NNNN patient folder found (it holds {_describe(src)}); "
        f"expected {_EXPECTED}{hint}"
    )


def _series_in(folder: Path) -> list[_Series]:
    """The series in ``folder``, from every DICOM file's header (none when it holds no DICOM).

    Every file is read, not only the first, so that a SEG saved into its CT series folder is found
    (the CT reader passes over it).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.iterdir() if p.is_file() and not _is_junk(p.name))
    found: dict[tuple[str, str], _Series] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(
                f, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID", "Modality"]
            )
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        own, meta = sop_classes(ds)  # a file cut short may hold only its meta's SOP class
        uid, sop = str(ds.get("SeriesInstanceUID", "") or ""), own or meta
        series = found.setdefault(
            (uid, sop), _Series(folder, [], uid, sop, str(ds.get("Modality", "") or ""))
        )
        series.files.append(f)
    return list(found.values())


def _unreadable(folder: Path) -> str | None:
    """Why a series folder holding files has no readable DICOM file (e.g. a SEG cut short), or None when empty."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not _is_junk(p.name))
    if not files:
        return None
    sizes = ", ".join(f"{f.name} {f.stat().st_size} bytes" for f in files[:2])
    more = f", ... ({len(files)} files)" if len(files) > 2 else ""
    return f"{folder.name}/ ({sizes}{more}: empty, cut short or not DICOM; download it again)"


def _discover(src: str | os.PathLike) -> list[tuple[_Study, _Series, _Series]]:
    """Every (study, SEG series, CT series) under ``src``, from headers only.

    Raises:
        UserError: The layout is wrong or files are missing, naming the expected layout and the
            first missing items.
    """
    pairs: list[tuple[_Study, _Series, _Series]] = []
    missing: list[str] = []
    for pdir in find_patient_folders(src):
        studies = _subdirs(pdir)
        if not studies:
            missing.append(f"{pdir}: no study folder (it holds {_describe(pdir)})")
            continue
        found_seg = False
        unreadable: list[str] = []
        for sdir in studies:
            study = _Study(pdir.name, sdir)
            for d in _subdirs(sdir):
                series = _series_in(d)
                if series:
                    study.series += series
                elif (why := _unreadable(d)) is not None:
                    unreadable.append(why)
            by_uid = {s.uid: s for s in study.series if s.sop_class != SEG_SOP_CLASS_UID}
            for seg in (s for s in study.series if s.sop_class == SEG_SOP_CLASS_UID):
                found_seg = True
                try:
                    refs = referenced_series(seg.files[0], f"{pdir.name} SEG")
                except UserError as e:  # a SEG cut short: named with the other missing parts
                    missing.append(str(e))
                    continue
                ct = next((by_uid[u] for u in refs if u in by_uid), None)
                if ct is None:
                    missing.append(
                        f"{seg.folder}: the CT series it references ({', '.join(refs) or 'none named'}) is not in {sdir} "
                        f"(series folders: {_describe(sdir)})"
                    )
                    continue
                pairs.append((study, seg, ct))
        if not found_seg:
            bad = f"; unreadable series folders: {', '.join(unreadable[:3])}" if unreadable else ""
            missing.append(
                f"{pdir}: no DICOM SEG (Segmentation series) in any study folder "
                f"({', '.join(f'{s.name}/ holds {_describe(s)}' for s in studies)}){bad}"
            )
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(
            f"{src}: not the complete TCIA {COLLECTION} layout: {'; '.join(missing[:3])}{more}; expected {_EXPECTED}; "
            "download the collection's CT and Segmentation series together (NBIA Data Retriever, descriptive names)"
        )
    return pairs


def _import_one(study: _Study, seg: _Series, ct: _Series) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Read one SEG onto its CT: the manifest row (None when skipped) and the report entry."""
    pid = study.patient_id
    seg_file = seg.files[0]
    report: dict[str, Any] = {
        "patient_id": pid,
        "ct_series_folder": str(ct.folder),
        "seg_file": str(seg_file),
        "segments": [],
        "tumour_segments": [],
        "lesions": [],
        "problems": [],
    }
    try:
        segments = read_seg_segments(seg_file, f"{pid} SEG")
        report["segments"] = [s.label for s in segments]
        tumours = select_segments(segments, TUMOUR_PATTERN, f"{pid} SEG {seg_file}")
    except UserError as e:  # no segments, or no tumour segment
        report["problems"].append(str(e))
        log.warning("%s: skipped: %s", pid, e)
        return None, report
    report["tumour_segments"] = [s.label for s in tumours]
    try:
        image = read_volume(ct.folder, kind="image", name=f"{pid} CT")
        items = seg_lesions(
            image, seg_file, TUMOUR_PATTERN, pid, "metastasis", name=f"{pid} SEG", image_name=f"{pid} CT"
        )
    except UserError as e:
        report["problems"].append(str(e))
        log.warning("%s: skipped: %s", pid, e)
        return None, report
    by_number = {s.number: s.label for s in segments}
    report["lesions"] = [
        {
            "lesion_id": les.lesion_id,
            "segment": by_number.get(les.label, ""),
            "n_voxels": les.n_voxels,
            "volume_ml": round(les.volume_ml, 3),
            "max_axial_diameter_mm": round(les.max_axial_diameter_mm, 1),
        }
        for les, _ in items
    ]
    row = {
        "patient_id": pid,
        "image": ct.folder,
        "mask": seg_file,
        "label": TUMOUR_PATTERN,
        "lesion_class": "metastasis",
    }
    return row, report


def import_tcia_crlm(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a manifest for TCIA Colorectal-Liver-Metastases (tumour components -> metastasis).

    Args:
        src: The download folder (``manifest-*``), the collection folder, or one ``CRLM-CT-NNNN`` folder.
        out: Output folder (created atomically) for ``manifest.csv``, the report and the licence notice.
        overwrite: Replace ``out`` if it exists and is not empty.

    Returns:
        Path of ``OUT/manifest.csv``.

    Raises:
        UserError: Not this collection's layout, or files missing (before any image is read);
            an existing ``out`` without ``overwrite``.
    """
    import pandas as pd
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; give a folder path for the output")
    check_out_spares_inputs(out, [("source folder", src)])
    pairs = _discover(src)
    final = out.resolve()
    rows: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    with atomic_dir(out, overwrite=overwrite) as tmp_out:
        for study, seg, ct in tqdm(
            pairs, desc="import tcia-crlm", unit="patient", disable=progress_disabled()
        ):
            row, report = _import_one(study, seg, ct)
            reports.append(report)
            if row is not None:
                # Relative to where the manifest will live (OUT), so OUT and SRC can move together.
                for col in ("image", "mask"):
                    row[col] = Path(os.path.relpath(Path(row[col]).resolve(), final)).as_posix()
                rows.append(row)
        if not rows:
            refuse_empty_import(
                src,
                len(pairs),
                "patient",
                [f"{r['patient_id']}: {r['problems'][-1]}" for r in reports if r["problems"]],
                "each patient needs a SEG with tumour segments over its CT series",
            )
        manifest = pd.DataFrame(rows, columns=["patient_id", "image", "mask", "label", "lesion_class"])
        write_manifest(manifest, tmp_out / "manifest.csv")
        n_lesions = sum(len(r["lesions"]) for r in reports)
        write_json(
            tmp_out / "import_report.json",
            {
                "dataset": f"TCIA {COLLECTION}",
                "source": str(src),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "liverlesion_version": __version__,
                "license": "CC BY 4.0 (TCIA Colorectal-Liver-Metastases, doi:10.7937/QXK2-QG03): attribution required",
                "disclaimer": DISCLAIMER,
                "rules": {
                    "tumour_segments": TUMOUR_PATTERN,
                    "lesion": "each 26-connected component of the union of a patient's tumour segments",
                    "class": "metastasis",
                    "ignored": "liver, liver remnant, hepatic and portal vein segments",
                },
                "totals": {
                    "patients": len({s.patient_id for s, _, _ in pairs}),
                    "patients_imported": len({r["patient_id"] for r in rows}),
                    "skipped": [r["patient_id"] for r in reports if r["problems"]],
                    "lesions": n_lesions,
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
    skipped = f"; skipped {', '.join(totals['skipped'])}" if totals["skipped"] else ""
    return (
        f"imported {totals['patients_imported']} of {totals['patients']} patient(s), {totals['lesions']} lesion(s) "
        f"(metastasis{skipped}) -> {out / 'manifest.csv'} (see import_report.json; CC BY 4.0: cite the collection)"
    )
