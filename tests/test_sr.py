"""DICOM SR (TID 1500) from predict results: references, measurements, structure.

The source is a small CT series written with pydicom (tests/helpers.py), rotated
180 degrees in-plane so that the SR's pixel coordinates on the source slice differ
from our canonical (LPS) array indices: a wrong mapping puts the region elsewhere.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import nibabel  # noqa: F401  (imported at collection: its log handler must not bind to a test's captured stderr)
import numpy as np
import pandas as pd
import pydicom
import pytest

from helpers import (
    make_ct_array,
    make_ct_with_two_lesions,
    make_tiny_checkpoint,
    torch_threads,
    write_dicom_series,
)
from liverlesion import DISCLAIMER
from liverlesion.cli import main
from liverlesion.errors import UserError
from liverlesion.io import read_volume, write_volume
from liverlesion.predict import TOO_SMALL, Classifier
from liverlesion.sr import PRIVATE_SCHEME, write_sr

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
ROTATED = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])  # 180 degrees about z


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", 0)


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory) -> dict:
    """A CT series (rotated in-plane) with two lesions, its mask as NIfTI, and the written files."""
    d = tmp_path_factory.mktemp("dicom_case")
    image, mask = make_ct_with_two_lesions()
    image.direction = ROTATED.copy()
    image.origin = (24.0, 24.0, 100.0)
    mask = image.with_array(mask.array)
    files = write_dicom_series(image, d / "ct", patient_name="Secret^Patient")
    return {
        "dir": d / "ct",
        "mask": write_volume(mask, d / "mask.nii.gz"),
        "files": files,
        "study_uid": pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID,
        "series_uid": pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID,
    }


def _headers(files) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}


def _pixels_to_lps(points_colrow: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """SCOORD (column, row), top-left corner of the first pixel at (0, 0), -> LPS mm on that slice."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    col = np.asarray(points_colrow)[:, 0] - 0.5
    row = np.asarray(points_colrow)[:, 1] - 0.5
    return ipp + np.outer(col * dc, iop[:3]) + np.outer(row * dr, iop[3:])


def _root_texts(ds) -> list[str]:
    return [str(it.TextValue) for it in ds.ContentSequence if it.ValueType == "TEXT"]


def test_cli_dicom_sr_references_source_and_holds_measurements(ckpt, dicom_case, tmp_path, capsys):
    import highdicom as hd

    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            "--model", str(ckpt),
            "--image", str(dicom_case["dir"]),
            "--mask", str(dicom_case["mask"]),
            "--out", str(out),
            "--dicom-sr",
            "--no-gradcam",
        ]
    )  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    results = pd.read_csv(out / "results.csv")
    ds = pydicom.dcmread(out / "report.dcm")

    # It is an SR of the source study, referencing the source series.
    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR and ds.Modality == "SR"
    assert ds.StudyInstanceUID == dicom_case["study_uid"]
    assert ds.SeriesInstanceUID != dicom_case["series_uid"]
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == dicom_case["study_uid"]
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_case["series_uid"]
    referenced = {
        str(s.ReferencedSOPInstanceUID) for s in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    }
    headers = _headers(dicom_case["files"])
    assert referenced <= set(headers)

    # Research, not diagnosis: flagged in the header and stated in the content.
    assert ds.ContentQualification == "RESEARCH" and ds.VerificationFlag == "UNVERIFIED"
    assert DISCLAIMER in ds.SeriesDescription
    assert any(DISCLAIMER in t for t in _root_texts(ds))
    assert PRIVATE_SCHEME in {item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence}

    # Structure: highdicom parses it back as a TID 1500 measurement report.
    sr = hd.sr.srread(out / "report.dcm")
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == list(results["lesion_id"])
    for g, (_, row) in zip(groups, results.iterrows(), strict=True):
        assert g.finding_sites[0].value == hd.sr.CodedConcept("10200004", "SCT", "Liver")
        values = {m.name.meaning: (m.value, m.unit.value) for m in g.get_measurements()}
        assert (
            values["Diameter"][0] == pytest.approx(row["max_axial_diameter_mm"])
            and values["Diameter"][1] == "mm"
        )
        assert values["Volume"][0] == pytest.approx(row["volume_ml"]) and values["Volume"][1] == "ml"
        evaluation = g.get_qualitative_evaluations()[0].value.meaning
        if row["pred_class"] == TOO_SMALL:
            assert "Probability of metastasis" not in values
            assert evaluation == "Too small to characterise"
        else:
            assert values["Probability of metastasis"][0] == pytest.approx(row["prob_metastasis"])
            assert values["Probability of metastasis"][1] == "{ratio}"
            assert evaluation == {"cyst": "Cyst", "metastasis": "Neoplasm, metastatic"}[row["pred_class"]]
            assert g.finding_type.meaning == evaluation

        # The region lies on the lesion: map the source-pixel outline back to LPS mm.
        roi = g.roi
        assert roi.GraphicType == "POLYLINE"
        src = headers[str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
        lps = _pixels_to_lps(np.asarray(roi.value), src)
        assert lps[:, :2].mean(axis=0) == pytest.approx([row["centroid_x_mm"], row["centroid_y_mm"]], abs=1.0)
        assert float(src.ImagePositionPatient[2]) == pytest.approx(row["centroid_z_mm"], abs=2.5)
        extent = lps[:, :2].max(axis=0) - lps[:, :2].min(axis=0)
        assert max(extent) == pytest.approx(row["max_axial_diameter_mm"], abs=2.0)

    # The identifying tags of the source stay out of what is printed and the results files.
    for text in [cap.out, cap.err, (out / "results.json").read_text(), (out / "results.csv").read_text()]:
        assert "Secret^Patient" not in text and "SYNTH-0001" not in text
    assert json.loads((out / "results.json").read_text())["disclaimer"] == DISCLAIMER


def test_manifest_writes_one_report_per_series(ckpt, dicom_case, tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        f"patient_id,image,mask,label,lesion_class\np1,{dicom_case['dir']},{dicom_case['mask']},,metastasis\n"
    )
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            "--model",
            str(ckpt),
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--dicom-sr",
            "--no-gradcam",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    reports = sorted((out / "reports").iterdir())
    assert [p.name for p in reports] == ["p1_1.dcm"]
    ds = pydicom.dcmread(reports[0])
    assert (
        ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
        == (dicom_case["series_uid"])
    )
    assert not (out / "report.dcm").exists()


def _prediction(ckpt: Path, volume, mask_path: Path) -> pd.DataFrame:
    return Classifier.load(ckpt).predict(volume, mask=read_volume(mask_path, kind="mask"))


def test_point_region_without_masks_and_messy_headers(ckpt, dicom_case, tmp_path):
    import highdicom as hd

    volume = read_volume(dicom_case["dir"])
    df = _prediction(ckpt, volume, dicom_case["mask"])
    header = volume.dicom.header
    for key in (
        "PatientSex",
        "AccessionNumber",
        "PatientBirthDate",
        "StudyID",
    ):  # anonymised exports drop these
        del header[key]
    path = write_sr(df, volume, tmp_path / "r.dcm")
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert [g.roi.GraphicType for g in groups] == ["POINT", "POINT"]
    src = _headers(dicom_case["files"])[
        str(groups[0].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    ]
    lps = _pixels_to_lps(np.asarray(groups[0].roi.value), src)[0]
    assert lps[:2] == pytest.approx([df["centroid_x_mm"].iloc[0], df["centroid_y_mm"].iloc[0]], abs=0.6)


def test_multiframe_source_uses_3d_coordinates(ckpt, dicom_case, tmp_path):
    import highdicom as hd

    volume = read_volume(dicom_case["dir"])
    df = _prediction(ckpt, volume, dicom_case["mask"])
    ref = volume.dicom
    # An enhanced (multi-frame) CT: one SOP instance for the whole volume.
    volume.dicom = ref.replace(sop_instance_uids=ref.sop_instance_uids[:1])
    path = write_sr(df, volume, tmp_path / "mf.dcm")
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    roi = groups[0].roi
    assert isinstance(roi, hd.sr.ImageRegion3D) and roi.GraphicType == "POINT"
    assert roi.ReferencedFrameOfReferenceUID == ref.frame_of_reference_uid
    np.testing.assert_allclose(
        np.asarray(roi.value)[0, :2], df[["centroid_x_mm", "centroid_y_mm"]].iloc[0].to_numpy(float), atol=0.6
    )


def test_write_sr_needs_dicom_source(ckpt, tmp_path):
    image, mask = make_ct_array()
    nifti = write_volume(image, tmp_path / "ct.nii.gz")
    volume = read_volume(nifti)
    df = Classifier.load(ckpt).predict(volume, mask=mask)
    with pytest.raises(
        UserError, match="--dicom-sr needs a DICOM --image so the report can reference its series"
    ):
        write_sr(df, volume, tmp_path / "r.dcm")
    assert not (tmp_path / "r.dcm").exists()


def test_write_sr_without_lesions_or_uids(ckpt, dicom_case, tmp_path):
    volume = read_volume(dicom_case["dir"])
    df = _prediction(ckpt, volume, dicom_case["mask"])
    with pytest.raises(UserError, match="no lesions"):
        write_sr(df.iloc[:0], volume, tmp_path / "r.dcm")
    broken = copy.copy(volume)
    header = copy.deepcopy(volume.dicom.header)
    del header.StudyInstanceUID
    broken.dicom = volume.dicom.replace(header=header)
    with pytest.raises(UserError, match="StudyInstanceUID"):
        write_sr(df, broken, tmp_path / "r.dcm")
    assert not list(tmp_path.glob("*.dcm"))


def test_dciodvfy_accepts_the_report(ckpt, dicom_case, tmp_path):
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed; highdicom's own validation is covered above")
    volume = read_volume(dicom_case["dir"])
    path = write_sr(_prediction(ckpt, volume, dicom_case["mask"]), volume, tmp_path / "r.dcm")
    res = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, "\n".join(errors)


@pytest.mark.realdata
def test_real_ct_series_sr(ckpt, ircad_patient1, tmp_path):
    """3D-IRCADb-01 patient 1: a tumour mask from the published DICOM masks, SR on the real series."""
    import highdicom as hd

    with zipfile.ZipFile(ircad_patient1 / "MASKS_DICOM.zip") as zf:
        names = [n for n in zf.namelist() if "/livertumor01/" in n and not n.endswith("/")]
        zf.extractall(tmp_path / "masks", members=names)
    mask_dir = next(p.parent for p in (tmp_path / "masks").rglob("*") if p.is_file())
    volume = read_volume(ircad_patient1 / "PATIENT_DICOM", name="--image")
    mask = read_volume(mask_dir, kind="mask", name="--mask")
    df = Classifier.load(ckpt).predict(volume, mask=mask, label=None)
    path = write_sr(df, volume, tmp_path / "real.dcm", lesion_masks=None)
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == volume.dicom.study_instance_uid
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert len(groups) == len(df) >= 1
    uid = str(groups[0].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    assert uid in volume.dicom.sop_instance_uids
