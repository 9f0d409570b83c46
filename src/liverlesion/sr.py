"""DICOM Structured Report (TID 1500 Measurement Report) of predict results, with highdicom.

One Comprehensive 3D SR per CT series. Each lesion is a TID 1410 "Planar ROI
Measurements and Qualitative Evaluations" group:

* tracking identifier (the lesion id) and a tracking UID;
* the lesion outline on its centre slice (largest cross-section) as a closed
  SCOORD polyline on that slice's SOP instance (a point at the centre when the
  outline is unavailable); for a multi-frame source, a SCOORD3D region in the
  frame of reference instead;
* the predicted class as the finding (a coded concept: SNOMED CT for metastasis
  and cyst, private codes otherwise; "Lesion" when too small to characterise),
  finding site liver (SCT 10200004), and the predicted class again as a
  qualitative evaluation (so "too small to characterise" is stated explicitly);
* lesion diameter (mm) and volume (mL), the model's class probabilities and
  ensemble spread ({ratio});
* algorithm identification: liverlesion and its version.

The document is marked research (ContentQualification RESEARCH), preliminary
and unverified, and says "research use, not for diagnosis" in its series
description and a root comment. It copies the patient/study module from the
source header (as any SR of a study must), so treat the file like the images.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, __version__
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_path
from liverlesion.io import SITK_SUFFIXES, file_suffix
from liverlesion.manifest import read_manifest
from liverlesion.volume import DicomReference, Volume

__all__ = ["check_sr_source", "write_sr", "class_concept", "PRIVATE_SCHEME", "quiet_highdicom"]

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved = logging.NOTSET


@contextlib.contextmanager
def quiet_highdicom():
    """Keep highdicom's INFO and DEBUG records out of every log while a DICOM object is built.

    highdicom logs which source it copies the patient and study modules from, by its
    SOPInstanceUID ('copy Patient-related attributes from dataset "1.2..."'); a root logger at
    INFO (``liverlesion serve``'s log, a Python caller's) would record it. Its warnings still
    pass. Nested and concurrent uses (the server's threads) restore the level once, at the end.
    Also a decorator.
    """
    global _quiet_depth, _quiet_saved
    logger = logging.getLogger("highdicom")
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = logger.level
            logger.setLevel(max(logging.WARNING, logger.level))
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                logger.setLevel(_quiet_saved)


#: Coding scheme for concepts with no standard code (99 prefix = private, PS3.16 8.2).
PRIVATE_SCHEME = "99LIVERLESION"
SR_SERIES_NUMBER = 9001
_TOO_SMALL = "too small to characterise"

# Standard codes for the classes we know (SNOMED CT, as in DICOM CID 6030-style finding lists).
_KNOWN_CLASSES = {
    "metastasis": ("14799000", "SCT", "Neoplasm, metastatic"),
    "cyst": ("367643001", "SCT", "Cyst"),
}


def _private(key: str, meaning: str) -> Any:
    import highdicom as hd

    # Code values are SH (16 chars): a stable hash of the key keeps them short and unique.
    value = "LL" + hashlib.sha1(key.encode()).hexdigest()[:10].upper()
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning[:64])


def class_concept(name: str) -> Any:
    """The coded concept for a predicted class (standard SNOMED CT code when known)."""
    import highdicom as hd

    key = str(name).strip().lower()
    if key in _KNOWN_CLASSES:
        value, scheme, meaning = _KNOWN_CLASSES[key]
        return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)
    if key == _TOO_SMALL:
        return _private("finding:too-small", "Too small to characterise")
    return _private(f"class:{name}", str(name))


def check_sr_inputs(image=None, manifest=None, option: str = "--dicom-sr") -> None:
    """Before any work: refuse ``--dicom-sr`` when an input image is not DICOM (judged by its path).

    Args:
        image: The ``--image`` path, or None.
        manifest: The ``--manifest`` path, or None (every image it names is checked).
        option: The option named in the message (``--dicom-sr`` or ``--dicom-seg``).

    Raises:
        UserError: Naming the first non-DICOM image.
    """
    items = []
    if image is not None:
        items.append(("--image", Path(image)))
    if manifest is not None:
        df = read_manifest(manifest, need_class=False)
        items += [(f"manifest {manifest} row {r.row} image", Path(r.image_path)) for r in df.itertuples()]
    for name, path in items:
        if not path.is_dir() and file_suffix(path) in SITK_SUFFIXES:
            need = (
                "a DICOM --image so the report can reference its series: it"
                if name == "--image"
                else f"DICOM images so each report can reference its series: {name}"
            )
            raise UserError(
                f"{option} needs {need} ({path}) is a {SITK_SUFFIXES[file_suffix(path)]} file, not DICOM; "
                f"pass the DICOM folder/zip, or drop {option}"
            )


def check_sr_source(source: Volume, name: str = "--image", option: str = "--dicom-sr") -> None:
    """Raise UserError unless ``source`` was read from DICOM (an SR or SEG must reference its series).

    Args:
        source: The CT volume the results belong to.
        name: How the input is named in the message (the path is appended).
        option: The option named in the message (``--dicom-sr`` or ``--dicom-seg``).
    """
    ref = source.dicom
    if ref is None or ref.header is None:
        where = f" ({name})" if name and name != "--image" else ""
        raise UserError(
            f"{option} needs a DICOM --image so the report can reference its series{where}: the image is "
            f"{source.meta.get('format') or 'not DICOM'}; pass the DICOM folder/zip, or drop {option}"
        )
    hdr = ref.header
    missing = [
        k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID") if not str(hdr.get(k, "") or "")
    ]
    if missing:
        raise UserError(
            f"{option}: the DICOM series {name} lacks {', '.join(missing)}; the report cannot reference it: "
            f"re-export the series from the PACS, or drop {option}"
        )


# --------------------------------------------------------------------------- geometry


def _outline_index(mask_slice: np.ndarray) -> np.ndarray | None:
    """Closed outline ``(n, 2)`` (row, col) of the largest region of a 2-D mask, or None."""
    from skimage.measure import approximate_polygon, find_contours

    if mask_slice is None or not mask_slice.any():
        return None
    padded = np.pad(mask_slice.astype(float), 1)  # closes contours that touch the border
    contours = find_contours(padded, 0.5)
    if not contours:
        return None
    c = max(contours, key=len) - 1.0
    c = approximate_polygon(c, tolerance=0.25)
    if not np.allclose(c[0], c[-1]):
        c = np.vstack([c, c[:1]])
    if len(np.unique(np.round(c, 4), axis=0)) < 3:
        return None
    return c


def _to_source_pixels(points_lps: np.ndarray, header) -> np.ndarray:
    """LPS points on a slice -> (column, row) SCOORD pixel coordinates of that slice's image.

    The in-plane position does not depend on which slice's ImagePositionPatient is
    used (slices of a series differ only along the normal), so the one header is enough.
    SCOORD puts the top-left corner of the first pixel at (0, 0): pixel centres are +0.5.
    """
    iop = np.asarray([float(v) for v in header.ImageOrientationPatient])
    ipp = np.asarray([float(v) for v in header.ImagePositionPatient])
    row_spacing, col_spacing = (float(v) for v in header.PixelSpacing)
    d = np.asarray(points_lps, dtype=float) - ipp
    col = d @ iop[:3] / col_spacing + 0.5
    row = d @ iop[3:] / row_spacing + 0.5
    return np.column_stack([col, row])


def _region(row: pd.Series, source: Volume, ref: DicomReference, mask: np.ndarray | None, classic: bool):
    """The lesion's image region on its centre slice (outline, or centre point)."""
    import highdicom as hd

    z = int(row["centre_slice"])
    outline = _outline_index(mask[z]) if mask is not None else None
    if outline is not None:
        idx = np.column_stack([np.full(len(outline), z, float), outline])
    else:
        # No outline: a point at the lesion centroid projected onto the centre slice.
        c = source.physical_to_index([row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]])
        idx = np.array([[z, c[1], c[2]]], dtype=float)
    lps = source.index_to_physical(idx)
    if classic:
        uid = ref.sop_instance_uids[z]
        pix = _to_source_pixels(lps, ref.header)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE
            if outline is not None
            else hd.sr.GraphicTypeValues.POINT,
            graphic_data=pix.astype(np.float32),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=str(ref.sop_class_uid), referenced_sop_instance_uid=str(uid)
            ),
        )
        return region, uid
    region = hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POLYGON
        if outline is not None
        else hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=lps.astype(np.float32),
        frame_of_reference_uid=str(ref.frame_of_reference_uid),
    )
    return region, None


# --------------------------------------------------------------------------- document


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _evidence(header, uids: list[str]) -> list:
    """Evidence datasets for the referenced instances: the source header with each SOP instance UID."""
    base = copy.deepcopy(header)
    # highdicom reads these as attributes; anonymised exports often drop the type-2 ones.
    for key in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
    ):
        if key not in base:
            setattr(base, key, "")
    if str(base.get("PatientSex", "") or "") not in ("M", "F", "O"):
        base.PatientSex = None
    out = []
    for uid in dict.fromkeys(uids):
        ds = copy.deepcopy(base)  # a shallow copy would share (and overwrite) the data elements
        ds.SOPInstanceUID = uid
        out.append(ds)
    return out


@quiet_highdicom()
def write_sr(
    results_df: pd.DataFrame,
    source: Volume,
    out_path: str | os.PathLike,
    lesion_masks: Mapping[str, np.ndarray] | None = None,
    series_number: int = SR_SERIES_NUMBER,
    seg: Any = None,
) -> Path:
    """Write predict results for one DICOM series as a Comprehensive 3D SR (TID 1500).

    Args:
        results_df: Rows of predict's results table for lesions of ``source``
            (needs lesion_id, pred_class, prob_*, max_axial_diameter_mm, volume_ml,
            centroid_*_mm, centre_slice).
        source: The CT volume read from DICOM (its ``dicom`` reference is used).
        out_path: Destination ``.dcm`` (written atomically).
        lesion_masks: Full-size boolean masks by lesion_id, for the outlines; without
            them each lesion is referenced by a point at its centre.
        series_number: SeriesNumber of the new SR series.
        seg: A :class:`liverlesion.seg_write.SegReference` (``predict --dicom-seg``): each lesion
            with a segment there becomes a volumetric ROI (TID 1411) referring to its segment,
            with the SEG's tracking UID, and the SEG joins the evidence.

    Returns:
        The written path.

    Raises:
        UserError: The source is not DICOM, or there are no lesions to report.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    check_sr_source(source)
    if results_df is None or len(results_df) == 0:
        raise UserError("--dicom-sr: no lesions to report; a measurement report needs at least one lesion")
    ref = source.dicom
    assert ref is not None  # check_sr_source
    header = ref.header
    uids = list(ref.sop_instance_uids)
    # A classic series has one SOP instance per array slice; otherwise (multi-frame) use 3-D coordinates.
    classic = (
        len(uids) == source.shape[0]
        and all(uids)
        and "ImageOrientationPatient" in header
        and "PixelSpacing" in header
    )
    if not classic and not ref.frame_of_reference_uid:
        raise UserError(
            "--dicom-sr: the DICOM source has no per-slice instances and no FrameOfReferenceUID, so lesion "
            "positions cannot be referenced; convert it to a classic slice series, or drop --dicom-sr"
        )

    algorithm = hd.sr.AlgorithmIdentification(
        name="liverlesion",
        version=__version__,
        parameters=[DISCLAIMER, f"checkpoints sha256: {results_df['checkpoint_sha256'].iloc[0]}"]
        if "checkpoint_sha256" in results_df
        else [DISCLAIMER],
    )
    ratio = codes.UCUM.Ratio
    groups, referenced = [], []
    class_cols = [c for c in results_df.columns if c.startswith("prob_")]
    for _, row in results_df.iterrows():
        lesion_id = str(row["lesion_id"])
        pred = str(row["pred_class"])
        too_small = pred.strip().lower() == _TOO_SMALL
        mask = (lesion_masks or {}).get(lesion_id)
        segment = seg.segments.get(lesion_id) if seg is not None else None
        if segment is None:
            region, uid = _region(row, source, ref, mask, classic)
            if uid is not None:
                referenced.append(uid)
        measurements = []
        if _finite(row.get("max_axial_diameter_mm")):
            measurements.append(
                hd.sr.Measurement(
                    name=codes.SCT.Diameter,
                    value=float(row["max_axial_diameter_mm"]),
                    unit=codes.UCUM.Millimeter,
                    algorithm_id=algorithm,
                )
            )
        if _finite(row.get("volume_ml")):
            measurements.append(
                hd.sr.Measurement(
                    name=codes.SCT.Volume,
                    value=float(row["volume_ml"]),
                    unit=hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter"),
                    algorithm_id=algorithm,
                )
            )
        for col in class_cols:
            if _finite(row[col]):
                name = col[len("prob_") :]
                measurements.append(
                    hd.sr.Measurement(
                        name=_private(f"prob:{name}", f"Probability of {name}"),
                        value=float(row[col]),
                        unit=ratio,
                        algorithm_id=algorithm,
                    )
                )
        if _finite(row.get("uncertainty")):
            measurements.append(
                hd.sr.Measurement(
                    name=_private("uncertainty", "Ensemble standard deviation of probability"),
                    value=float(row["uncertainty"]),
                    unit=ratio,
                    algorithm_id=algorithm,
                )
            )
        common = dict(
            # The finding is the predicted class; a lesion left uncharacterised is just a lesion.
            finding_type=codes.SCT.Lesion if too_small else class_concept(pred),
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Liver)],
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    name=_private("predicted-class", "Predicted class (research model)"),
                    value=class_concept(pred),
                )
            ],
        )
        if segment is not None:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        identifier=lesion_id, uid=seg.tracking_uids.get(lesion_id) or generate_uid()
                    ),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=str(seg.dataset.SOPClassUID),
                        sop_instance_uid=seg.sop_instance_uid,
                        segment_number=int(segment),
                        source_series=hd.sr.SourceSeriesForSegmentation(seg.source_series_uid),
                    ),
                    **common,
                )
            )
            continue
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(identifier=lesion_id, uid=generate_uid()),
                referenced_region=region,
                **common,
            )
        )

    observation = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(), name="liverlesion", model_name=f"liverlesion {__version__}"
            ),
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation,
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    # The disclaimer as a root-level comment, where every SR viewer shows it.
    report[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=f"liverlesion {__version__}: {DISCLAIMER}. Probabilities come from a research model.",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    evidence = (
        _evidence(header, referenced) if referenced else _evidence(header, [str(header.SOPInstanceUID)])
    )
    if seg is not None:
        evidence.append(seg.dataset)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="liverlesion",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"liverlesion: {DISCLAIMER}",
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="liverlesion private codes",
                responsible_organization="liverlesion project",
            )
        ],
        software_versions=__version__,
    )
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return out_path
