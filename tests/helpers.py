"""Pure helpers that build tiny synthetic CT data and untrained checkpoints for tests.

Import with ``from helpers import ...``. Fixtures that use them live in ``conftest.py`` and in
the test modules.
"""

from __future__ import annotations

import contextlib
import datetime
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from liverlesion.volume import Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CLASSES = ["cyst", "metastasis"]
BIG_CENTRE_ZYX = (11.5, 23.5, 23.5)  # the volume centre: make_ct_array's default sphere
SMALL_CENTRE_ZYX = (12.0, 12.0, 36.0)


def make_ct_array(
    shape: tuple[int, int, int] = (24, 48, 48),
    spacing: tuple[float, float, float] = (2.5, 1.0, 1.0),
    lesion_radius_mm: float = 6.0,
    lesion_hu: float = 5.0,
    tissue_hu: float = 60.0,
    seed: int = 0,
    noise_hu: float = 5.0,
    origin: tuple[float, float, float] = (-24.0, -24.0, 100.0),
    center_zyx: tuple[float, float, float] | None = None,
) -> tuple[Volume, Volume]:
    """A tiny CT: soft tissue in a body ellipse, air outside, a water-density sphere.

    Args:
        shape: Array shape ``(z, y, x)``.
        spacing: Voxel size ``(z, y, x)`` in mm.
        lesion_radius_mm: Sphere radius in mm (0 for no lesion).
        lesion_hu: HU inside the sphere (water ~0, cyst ~5-15, metastasis ~40-70).
        tissue_hu: HU of the surrounding soft tissue.
        seed: Noise seed.
        noise_hu: Standard deviation of the Gaussian noise in HU.
        origin: LPS position ``(x, y, z)`` in mm of voxel ``[0, 0, 0]``.
        center_zyx: Sphere centre in (fractional) voxel indices; defaults to the volume centre.

    Returns:
        ``(image, mask)``: float32 HU volume and uint8 lesion mask (1 inside the sphere),
        identity (LPS) direction.
    """
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    c = np.asarray(center_zyx if center_zyx is not None else [(n - 1) / 2 for n in shape], dtype=float)
    body = ((yy - (shape[1] - 1) / 2) / (0.45 * shape[1])) ** 2 + (
        (xx - (shape[2] - 1) / 2) / (0.48 * shape[2])
    ) ** 2 <= 1
    dist2 = sum(((g - ci) * s) ** 2 for g, ci, s in zip((zz, yy, xx), c, spacing, strict=True))
    lesion = (dist2 <= lesion_radius_mm**2) & body if lesion_radius_mm > 0 else np.zeros(shape, bool)
    hu = np.where(body, tissue_hu, -1000.0)
    hu = np.where(lesion, lesion_hu, hu)
    hu = hu + rng.normal(0.0, noise_hu, size=shape)
    image = Volume(
        hu.astype(np.float32), spacing, origin, np.eye(3), {"modality": "CT", "format": "synthetic"}
    )
    mask = image.with_array(lesion.astype(np.uint8))
    return image, mask


def make_ct_with_two_lesions(seed: int = 0) -> tuple[Volume, Volume]:
    """``make_ct_array``'s CT with its 12 mm sphere at the centre and a ~4 mm one (too small) off-centre.

    Returns:
        ``(image, mask)``: the small lesion (10 HU) at ``SMALL_CENTRE_ZYX`` joins the mask as label 1.
    """
    image, mask = make_ct_array(seed=seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=float) for n in image.shape], indexing="ij")
    d2 = sum(
        ((g - c) * s) ** 2 for g, c, s in zip((zz, yy, xx), SMALL_CENTRE_ZYX, image.spacing, strict=True)
    )
    small = d2 <= 2.0**2
    image.array[small] = 10.0
    arr = mask.array.copy()
    arr[small] = 1
    return image, image.with_array(arr)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (tests share few cores), then restore the count."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_tiny_checkpoint(
    path: Path,
    seed: int,
    classes: Sequence[str] = CLASSES,
    size_px: int = 64,
    mode: str = "2.5d",
    pool: str = "global",
    stacks: int = 0,
    fusion: tuple[np.ndarray, np.ndarray] | None = None,
    **extra,
) -> Path:
    """An untrained checkpoint of timm's tiny ``test_resnet`` (the plumbing is under test, not accuracy).

    Args:
        path: Where to save it.
        seed: torch seed for the random weights (different seeds: really different models).
        classes: Class names.
        size_px: Patch side in px.
        mode: ``"2.5d"`` (3 slices as channels) or ``"2d"`` (one grey slice per sample).
        pool: ``model.pool`` (``"lesion"``: the network also takes the lesion mask).
        stacks: ``patch.stacks`` (2.5-D: 2·stacks+1 stacked samples per lesion).
        fusion: ``(features, labels)``: a fusion model (``model.fusion: radiomics_vote``) whose handcrafted
            half is fitted on these, network weight 0.5; its features are named ``f0, f1, ...``.
        **extra: Further ``save_checkpoint`` arguments; temperature 1, threshold 0.5 and
            positive class ``metastasis`` (when a class) unless given.

    Returns:
        The saved path.
    """
    import torch

    from liverlesion.checkpoint import save_checkpoint
    from liverlesion.config import Config
    from liverlesion.model import build_model

    cfg = Config()
    cfg.model.backbone = "test_resnet"  # timm's tiny test network: fast on CPU
    cfg.model.weights = "none"
    cfg.model.head_hidden = 16
    cfg.patch.size_px = size_px
    cfg.patch.neighbours = 1
    cfg.patch.mode = mode
    cfg.patch.stacks = stacks
    cfg.model.pool = pool
    in_chans = 3 if mode == "2.5d" else 1  # 2.5-D: 2k+1 slices as channels; 2-D: one grey slice per sample
    torch.manual_seed(seed)
    names = [f"f{i}" for i in range(fusion[0].shape[1])] if fusion is not None else []
    model, _ = build_model(cfg.model, num_classes=len(classes), in_chans=in_chans, fusion_features=names)
    if fusion is not None:
        from liverlesion.fusion import fit_fusion

        fit_fusion(model, fusion[0], fusion[1], seed, vote=True)
        model.fusion_alpha.fill_(0.5)
    extra.setdefault("temperature", 1.0)
    extra.setdefault("threshold", 0.5)
    extra.setdefault("positive_class", "metastasis" if "metastasis" in classes else None)
    return save_checkpoint(path, model, cfg, list(classes), in_chans, fold=0, **extra)


def stored_values(hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """DICOM stored integers for HU values (the inverse of the rescale, rounded)."""
    return np.round((np.asarray(hu, dtype=float) - intercept) / slope).astype(np.int64)


def quantised_hu(hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """The HU a reader should return after a DICOM round trip with this slope/intercept."""
    return (stored_values(hu, slope, intercept) * slope + intercept).astype(np.float32)


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    series_uid: str | None = None,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    description: str = "synthetic",
    shuffle_names: bool = True,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    shuffle_instance_numbers: bool = False,
    suffix: str = "",
    seed: int = 0,
    patient_name: str = "Test^Synthetic",
    tags: dict[str, str] | None = None,
) -> list[Path]:
    """Write a volume as a classic single-frame DICOM series with pydicom.

    Slice ``k`` of the array is written at ``volume.index_to_physical([k, 0, 0])`` with
    ImageOrientationPatient from the direction's x and y columns, so any (flipped,
    oblique) direction is encoded faithfully. Stored values are unsigned 16-bit when
    ``(HU - intercept) / slope`` is never negative, signed otherwise.

    Args:
        volume: HU volume (or integer mask) to write.
        folder: Output folder (created).
        series_uid: SeriesInstanceUID (generated when None).
        modality: DICOM Modality (``"MR"`` also switches the SOP class to MR Image Storage).
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        description: SeriesDescription.
        shuffle_names: Give files random names unrelated to slice order.
        study_uid: StudyInstanceUID (generated when None).
        frame_of_reference_uid: FrameOfReferenceUID (generated when None).
        shuffle_instance_numbers: Assign InstanceNumber in random order (readers must sort by position).
        suffix: File name suffix (``""`` like many scanners, or ``".dcm"``).
        seed: Seed for the shuffles.
        patient_name: PatientName written into every file (readers must never print it).
        tags: Further data elements by keyword, set last (so they may replace the ones above),
            e.g. ``{"InstitutionName": "..."}``.

    Returns:
        The written file paths in array slice order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    sop_class = MR_IMAGE_STORAGE if modality.upper() == "MR" else CT_IMAGE_STORAGE
    stored = stored_values(volume.array, slope, intercept)
    signed = bool(stored.min() < 0)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    assert info.min <= stored.min() and stored.max() <= info.max, "values do not fit 16 bits"
    stored = stored.astype(dtype)
    n = volume.shape[0]
    names = [f"IM{i:04d}{suffix}" for i in range(n)]
    if shuffle_names:
        rng.shuffle(names)
    instance_numbers = list(range(1, n + 1))
    if shuffle_instance_numbers:
        rng.shuffle(instance_numbers)
    row_dir = volume.direction[:, 0]
    col_dir = volume.direction[:, 1]
    today = datetime.date(2024, 1, 1).strftime("%Y%m%d")
    paths = []
    for k in range(n):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.Modality = modality
        ds.PatientName = patient_name
        ds.PatientID = "SYNTH-0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = today
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = description
        ds.Manufacturer = "liverlesion-tests"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesNumber = 1
        ds.InstanceNumber = instance_numbers[k]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in volume.index_to_physical([k, 0, 0])]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{volume.spacing[1]:.6f}", f"{volume.spacing[2]:.6f}"]  # row, column spacing
        ds.SliceThickness = f"{volume.spacing[0]:.6f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        for keyword, value in (tags or {}).items():
            setattr(ds, keyword, value)
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def build_seg(
    ct_files: list[Path],
    masks: dict[str, np.ndarray],
    path: Path,
    slices: list[int] | None = None,
    fractional: bool = False,
) -> Path:
    """A SEG written with highdicom on the CT files (in slice order), one segment per mask (label -> array).

    ``masks`` are in the files' own pixel layout (the array given to ``write_dicom_series``);
    ``slices`` keeps only those source slices (a SEG on a subset of the series).
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    keep = list(range(len(ct_files))) if slices is None else list(slices)
    sources = [pydicom.dcmread(ct_files[k]) for k in keep]
    pixels = np.stack([np.asarray(m)[keep] for m in masks.values()], axis=-1)
    pixels = (pixels > 0).astype(np.float32 if fractional else np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type="MANUAL",
        )
        for i, label in enumerate(masks, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type="FRACTIONAL" if fractional else "BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="tests",
        manufacturer_model_name="tests",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(path, enforce_file_format=True)
    return path


def write_non_image_objects(folder: str | Path, study_uid: str | None = None) -> list[Path]:
    """Write the clutter a real export folder holds: an SR, a DICOMDIR-named file and junk."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sr_class = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sr_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    sr = Dataset()
    sr.file_meta = meta
    sr.SOPClassUID = sr_class
    sr.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    sr.StudyInstanceUID = study_uid or generate_uid()
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    paths = [folder / "SR0001", folder / "DICOMDIR", folder / "notes.txt", folder / "Thumbs.db"]
    sr.save_as(paths[0], enforce_file_format=True)
    paths[1].write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")  # a broken DICOMDIR must not matter
    paths[2].write_text("exported by PACS\n")
    paths[3].write_bytes(bytes(range(256)))
    return paths


def multipart_body(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` request body and its Content-Type (text ``fields``, then ``files``)."""
    boundary = "liverlesionboundary7f3a"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    for name, (filename, data) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def http_post(url: str, body: bytes, ctype: str, timeout: float = 120) -> tuple[int, bytes]:
    """POST ``body``; (status, response body), HTTP errors included."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def two_lesion_patients(folder: Path, n: int, classes: bool = True) -> Path:
    """``folder/manifest.csv``: ``n`` patients ``p{i}`` of :func:`make_ct_with_two_lesions` (NIfTI image and
    mask); with ``classes``, cyst and metastasis in turn, else no lesion_class column (new cases)."""
    from liverlesion.io import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image, mask = make_ct_with_two_lesions(seed=i)
        write_volume(image, folder / f"p{i}.nii.gz")
        write_volume(mask, folder / f"p{i}_mask.nii.gz")
        rows.append(
            f"p{i},p{i}.nii.gz,p{i}_mask.nii.gz" + (f",,{['cyst', 'metastasis'][i % 2]}" if classes else "")
        )
    header = "patient_id,image,mask" + (",label,lesion_class" if classes else "")
    (folder / "manifest.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return folder / "manifest.csv"


def one_lesion_patients(folder: Path, n: int) -> Path:
    """``folder/m.csv``: ``n`` patients with one lesion each (``ct{i}.nii.gz``, ``mask{i}.nii.gz``),
    cyst and metastasis in turn."""
    from liverlesion.io import write_volume

    rows = []
    for i in range(n):
        image, mask = make_ct_array(seed=i)
        write_volume(image, folder / f"ct{i}.nii.gz")
        write_volume(mask, folder / f"mask{i}.nii.gz")
        rows.append(f"p{i},ct{i}.nii.gz,{['cyst', 'metastasis'][i % 2]},mask{i}.nii.gz")
    manifest = folder / "m.csv"
    manifest.write_text("patient_id,image,lesion_class,mask\n" + "\n".join(rows) + "\n")
    return manifest
