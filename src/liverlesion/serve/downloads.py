"""The viewer's downloads of a study's results: CSV, JSON, DICOM SR and DICOM SEG.

Each takes the classifier and a :class:`~liverlesion.serve.studies.Study` and returns bytes (or a
JSON-ready dict); ``server.py`` sends them as attachments. The DICOM SEG holds the mask each lesion was
classified on (:func:`liverlesion.seg_write.write_seg`); an SR downloaded after it refers to its segments.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from liverlesion.errors import UserError
from liverlesion.seg_write import write_seg
from liverlesion.serve.oneshot import json_safe
from liverlesion.serve.studies import Study
from liverlesion.sr import write_sr

__all__ = [
    "NotAvailable",
    "results_csv",
    "results_json",
    "results_seg",
    "results_sr",
    "seg_available",
    "seg_unavailable",
    "sr_unavailable",
]


class NotAvailable(UserError):
    """A download this study cannot give (yet): not classified, or not opened as DICOM (HTTP 409)."""


def _frame(clf, study: Study):
    with study.lock:
        rows = [dict(r.row) for r in study.results.values()]
    if not rows:
        raise NotAvailable("results: no lesion classified in this study yet; click a lesion first")
    return clf.results_frame(rows)


def results_csv(clf, study: Study) -> bytes:
    """The study's results table (every lesion classified so far), as ``predict``'s results.csv."""
    return _frame(clf, study).to_csv(index=False).encode("utf-8")


def results_json(clf, study: Study) -> dict[str, Any]:
    """The study's results as ``predict``'s results.json."""
    from liverlesion.predict import results_info  # local: heavy (scipy)

    df = _frame(clf, study)
    inputs = {"image": study.names.get("image"), "mask": study.names.get("mask"), "viewer_study": study.id}
    return json_safe(results_info(clf, df, study.min_size_mm, inputs))


def sr_unavailable(study: Study) -> str:
    """Why this study cannot give a DICOM SR ("" when it can)."""
    if study.image.dicom is None:
        return (
            f"DICOM SR: the CT was opened as {study.image.meta.get('format') or 'a non-DICOM file'}; an SR must "
            "reference its DICOM series: open the CT as a .zip of the DICOM series"
        )
    return ""


def results_sr(clf, study: Study) -> bytes:
    """A DICOM Comprehensive 3D SR of the study's lesions (needs a CT uploaded as DICOM).

    Once a DICOM SEG was downloaded, each lesion it holds (with the mask it was written from) is a
    volumetric ROI referring to its segment, as ``predict --dicom-seg --dicom-sr`` writes them.
    """
    why = sr_unavailable(study)
    if why:
        raise NotAvailable(why)
    df = _frame(clf, study)
    with study.lock:
        masks = {lid: r.mask for lid, r in study.results.items()}
        seg = _current_seg(study)
    with tempfile.TemporaryDirectory(prefix="liverlesion-serve-") as tmp:
        return write_sr(df, study.image, Path(tmp) / "report.dcm", lesion_masks=masks, seg=seg).read_bytes()


def _current_seg(study: Study):
    """The last SEG downloaded, when its lesions still have the results it was written from (else None)."""
    if study.seg is None:
        return None
    ref, written = study.seg
    if any(study.results.get(lid) is not r for lid, r in written.items()):
        return None  # a lesion was classified again or is gone: the SEG no longer matches
    return ref


def seg_unavailable(study: Study) -> str:
    """Why this study cannot give a DICOM SEG ("" when it can): it needs a DICOM CT with a frame of reference."""
    ref = study.image.dicom
    if ref is None or ref.header is None:
        return (
            f"DICOM SEG: the CT was opened as {study.image.meta.get('format') or 'a non-DICOM file'}; a SEG must "
            "reference its DICOM series: open the CT as a .zip of the DICOM series"
        )
    if not ref.frame_of_reference_uid:
        return (
            "DICOM SEG: the CT's DICOM series has no FrameOfReferenceUID, which a segmentation needs to place its "
            "frames (some anonymised exports drop it); download the DICOM SR instead, or re-export the series with it"
        )
    return ""


def seg_available(study: Study) -> bool:
    """Whether this study can give a DICOM SEG (see :func:`seg_unavailable`)."""
    return not seg_unavailable(study)


def results_seg(clf, study: Study) -> bytes:
    """A DICOM SEG of the study's lesions: one segment per classified lesion, the mask it was classified on.

    Masks from the uploaded mask are MANUAL segments, the grown/estimated masks of clicks SEMIAUTOMATIC
    (see :func:`liverlesion.seg_write.write_seg`). The SEG is kept (UIDs only) so a DICOM SR downloaded
    afterwards refers to its segments.

    Raises:
        NotAvailable: The CT was not opened as DICOM, has no FrameOfReferenceUID, or nothing is classified.
    """
    why = seg_unavailable(study)
    if why:
        raise NotAvailable(why)
    with study.lock:
        results = dict(study.results)
    if not results:
        raise NotAvailable("results: no lesion classified in this study yet; click a lesion first")
    masks = {lid: r.mask for lid, r in results.items()}
    estimated = [lid for lid, r in results.items() if r.lesion.source != "mask"]
    with tempfile.TemporaryDirectory(prefix="liverlesion-serve-") as tmp:
        ref = write_seg(study.image, masks, Path(tmp) / "seg.dcm", estimated=estimated)
        data = ref.path.read_bytes()
    with study.lock:
        study.seg = (ref, results)
    return data
