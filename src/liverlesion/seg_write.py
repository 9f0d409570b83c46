"""Write lesion masks as a DICOM Segmentation (SEG) referencing the source CT series, with highdicom.

:func:`write_seg` writes the lesion masks predict used (``predict --dicom-seg``) as one BINARY
SEG: one segment per lesion, labelled with the lesion id, category "Morphologically abnormal
structure", type "Lesion"; a mask given as input is MANUAL, the estimated mask of a click
SEMIAUTOMATIC (algorithm liverlesion). Each segment's tracking UID is shared with the SR group
that refers to it (:class:`SegReference`). Frames of a classic series reference the instance of
their slice; other sources are placed by the CT's affine in its frame of reference.

Like any SEG it copies the patient/study module of the source (the standard requires it):
treat the file like the images. Reading a SEG is :mod:`liverlesion.dicom_seg`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion import DISCLAIMER, __version__
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_path
from liverlesion.sr import check_sr_source, quiet_highdicom
from liverlesion.volume import Volume

__all__ = ["SegReference", "check_seg_source", "write_seg", "SEG_SERIES_NUMBER"]

SEG_SERIES_NUMBER = 9002


@dataclass(frozen=True)
class SegReference:
    """What an SR needs to refer to a written SEG (UIDs only; nothing identifying).

    Attributes:
        path: The written file.
        sop_instance_uid: The SEG's SOPInstanceUID.
        series_instance_uid: The SEG's SeriesInstanceUID.
        source_series_uid: SeriesInstanceUID of the CT it references.
        segments: Segment number by lesion id.
        tracking_uids: Tracking UID by lesion id (shared by the SEG segment and the SR group).
        dataset: The SEG dataset without pixel data (SR evidence).
    """

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    source_series_uid: str
    segments: dict[str, int]
    tracking_uids: dict[str, str]
    dataset: Any = field(repr=False)

    def __repr__(self) -> str:
        return f"SegReference({self.path}, {len(self.segments)} segment(s))"


def _affine_sources(source: Volume) -> list:
    """Source datasets for highdicom: the header per SOP instance with the canonical slice geometry.

    Only used to place frames and reference instances (the source pixels are never needed). The
    canonical geometry (array order) is where the masks live, so each frame references the
    instance of its own array slice.
    """
    ref = source.dicom
    assert ref is not None
    out = []
    d = source.direction
    for k, uid in enumerate(ref.sop_instance_uids):
        ds = copy.deepcopy(ref.header)
        ds.SOPInstanceUID = uid
        ds.ImagePositionPatient = [float(v) for v in source.index_to_physical([k, 0, 0])]
        ds.ImageOrientationPatient = [*(float(v) for v in d[:, 0]), *(float(v) for v in d[:, 1])]
        ds.PixelSpacing = [float(source.spacing[1]), float(source.spacing[2])]
        ds.Rows, ds.Columns = int(source.shape[1]), int(source.shape[2])
        out.append(ds)
    return out


def check_seg_source(source: Volume, name: str = "--image") -> None:
    """Raise UserError unless a SEG can reference ``source``: a DICOM series with a FrameOfReferenceUID.

    The CT Image IOD requires the frame of reference, and a SEG places its frames in it; some
    anonymised exports (e.g. 3D-IRCADb-01) drop it, and then only ``--dicom-sr`` can be written.
    """
    check_sr_source(source, name, option="--dicom-seg")
    ref = source.dicom
    assert ref is not None
    if not ref.frame_of_reference_uid:
        raise UserError(
            f"--dicom-seg: the DICOM series {name} has no FrameOfReferenceUID, which a segmentation needs to place "
            "its frames; re-export the series from the PACS with it, or drop --dicom-seg (--dicom-sr works without it)"
        )


@quiet_highdicom()
def write_seg(
    source: Volume,
    lesion_masks: Mapping[str, Any],
    out_path: str | os.PathLike,
    *,
    estimated: Sequence[str] = (),
    series_number: int = SEG_SERIES_NUMBER,
) -> SegReference:
    """Write lesion masks as one BINARY DICOM SEG referencing the source CT series.

    Args:
        source: The CT read from DICOM (``source.dicom`` is referenced).
        lesion_masks: Full-size boolean masks (or ``LesionMask``) by lesion id, in segment order.
        out_path: Destination ``.dcm`` (written atomically).
        estimated: Lesion ids whose mask was estimated by liverlesion (a click), not given.
        series_number: SeriesNumber of the new series.

    Returns:
        The :class:`SegReference` an SR uses to refer to the segments.

    Raises:
        UserError: The source is not a DICOM series, or there is no lesion mask.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    check_seg_source(source)
    if not lesion_masks:
        raise UserError("--dicom-seg: no lesions to write; a segmentation needs at least one lesion")
    ref = source.dicom
    assert ref is not None
    classic = ref.slices_along_array_z and len(ref.sop_instance_uids) == source.shape[0]
    ids = list(lesion_masks)
    pixels = np.zeros((*source.shape, len(ids)), dtype=np.uint8)
    for k, lid in enumerate(ids):
        pixels[..., k] = np.asarray(lesion_masks[lid], dtype=bool)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="liverlesion", family=codes.DCM.ArtificialIntelligence, version=__version__
    )
    tracking = {lid: hd.UID() for lid in ids}
    descriptions = []
    for k, lid in enumerate(ids, start=1):
        est = lid in estimated
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=k,
                segment_label=str(lid)[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Lesion,
                algorithm_type="SEMIAUTOMATIC" if est else "MANUAL",
                algorithm_identification=algorithm if est else None,
                tracking_id=str(lid)[:64],
                tracking_uid=tracking[lid],
            )
        )
    common = dict(
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="liverlesion",
        manufacturer_model_name="liverlesion",
        software_versions=__version__,
        device_serial_number="0",
        content_label="LESIONS",
        content_description=f"liverlesion: {DISCLAIMER}"[:64],
        series_description=f"liverlesion lesions: {DISCLAIMER}"[:64],
    )
    if classic:
        seg = hd.seg.Segmentation(source_images=_affine_sources(source), pixel_array=pixels, **common)
    else:
        # Multi-frame source: place frames by the canonical affine (slice, row, column -> LPS).
        sz, sy, sx = source.spacing
        affine = np.eye(4)
        affine[:3, 0] = source.direction[:, 2] * sz
        affine[:3, 1] = source.direction[:, 1] * sy
        affine[:3, 2] = source.direction[:, 0] * sx
        affine[:3, 3] = source.origin
        volume = hd.Volume(
            pixels,
            affine,
            coordinate_system="PATIENT",
            frame_of_reference_uid=ref.frame_of_reference_uid,
            channels={"SegmentNumber": list(range(1, len(ids) + 1))},
        )
        header = copy.deepcopy(ref.header)
        seg = hd.seg.Segmentation(source_images=[header], pixel_array=volume, **common)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    header = copy.deepcopy(seg)
    del header.PixelData
    return SegReference(
        path=out_path,
        sop_instance_uid=str(seg.SOPInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
        source_series_uid=str(ref.series_instance_uid),
        segments={lid: k for k, lid in enumerate(ids, start=1)},
        tracking_uids={lid: str(tracking[lid]) for lid in ids},
        dataset=header,
    )
