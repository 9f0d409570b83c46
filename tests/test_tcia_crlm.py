"""`import tcia-crlm` on a tiny copy of the TCIA Colorectal-Liver-Metastases layout built here.

The layout is the NBIA Data Retriever's (descriptive names): manifest-*/Colorectal-Liver-Metastases/
CRLM-CT-NNNN/<MM-DD-YYYY-NA-study-NNNNN>/<N.000000-description-NNNNN>/1-NNN.dcm, the SEG as
N.000000-Segmentation-NNNNN/1-1.dcm with the collection's segment labels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import build_seg, make_ct_array, write_dicom_series
from liverlesion.cli import main
from liverlesion.datasets.tcia_crlm import import_tcia_crlm
from liverlesion.errors import UserError
from liverlesion.manifest_lesions import lesion_table

COLLECTION = "Colorectal-Liver-Metastases"


def _ball(shape, centre, radius) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius**2


def write_patient(root: Path, pid: str, tumours: dict[str, np.ndarray] | None = None, seed: int = 0) -> dict:
    """One CRLM-CT patient: a CT series (1-001.dcm, ...) and a SEG (1-1.dcm) with the collection's segments."""
    image, _ = make_ct_array(seed=seed, lesion_radius_mm=0)
    shape = image.shape
    study = root / pid / "12-19-1992-NA-CT ABDOMEN W CONT-36021"
    ct_dir = study / "3.000000-NA-08927"
    files = write_dicom_series(image, ct_dir, shuffle_names=False, suffix=".dcm", description="NA")
    named = []
    for k, f in enumerate(files, start=1):  # NBIA names: acquisition-instance
        target = f.with_name(f"1-{k:03d}.dcm")
        f.rename(target)
        named.append(target)
    if tumours is None:
        tumours = {"Tumor_1": _ball(shape, (12, 24, 24), 4), "Tumor_2": _ball(shape, (12, 12, 36), 2)}
    liver = np.zeros(shape, bool)
    liver[2:22, 6:42, 6:44] = True
    remnant = liver.copy()
    remnant[:, :, :20] = False
    hepatic = np.zeros(shape, bool)
    hepatic[4:20, 30, 10:14] = True
    portal = np.zeros(shape, bool)
    portal[4:20, 36, 10:14] = True
    segments = {"Liver": liver, "Liver Remnant": remnant, "Hepatic": hepatic, "Portal": portal, **tumours}
    seg_dir = study / "100.000000-Segmentation-53960"
    seg_dir.mkdir(parents=True)
    seg = build_seg(named, segments, seg_dir / "1-1.dcm")
    return {"ct": ct_dir, "seg": seg, "tumours": tumours, "image": image}


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> dict:
    """A download folder with two patients: two tumours; one tumour segment of two separate parts."""
    top = tmp_path_factory.mktemp("crlm") / "manifest-1700000000000"
    root = top / COLLECTION
    p1 = write_patient(root, "CRLM-CT-1001")
    shape = p1["image"].shape
    two_parts = _ball(shape, (8, 24, 14), 3) | _ball(shape, (16, 24, 34), 3)
    p2 = write_patient(root, "CRLM-CT-1002", {"Tumor_1": two_parts}, seed=1)
    (top / "metadata.csv").write_text("Series UID,Collection,Subject ID\n")
    return {"top": top, "root": root, "p1": p1, "p2": p2}


def test_import_makes_one_row_per_seg_and_a_lesion_per_tumour_component(download, tmp_path):
    manifest = import_tcia_crlm(download["top"], tmp_path / "out")
    df = pd.read_csv(manifest)
    assert list(df["patient_id"]) == ["CRLM-CT-1001", "CRLM-CT-1002"]
    assert set(df["label"]) == {"Tumor*"} and set(df["lesion_class"]) == {"metastasis"}
    assert df["mask"].iloc[0].endswith("100.000000-Segmentation-53960/1-1.dcm")
    assert not Path(df["image"].iloc[0]).is_absolute()  # relative to OUT
    table = lesion_table(manifest, progress=False)
    assert list(table["lesion_id"]) == [
        "CRLM-CT-1001-L01",
        "CRLM-CT-1001-L02",
        "CRLM-CT-1002-L01",
        "CRLM-CT-1002-L02",
    ]
    t = download["p1"]["tumours"]
    assert list(table["n_voxels"][:2]) == [int(t["Tumor_1"].sum()), int(t["Tumor_2"].sum())]
    assert list(table["label"]) == [5, 6, 5, 5]  # the segment each lesion came from
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert report["totals"]["lesions"] == 4 and report["totals"]["skipped"] == []
    assert report["patients"][0]["segments"] == [
        "Liver",
        "Liver Remnant",
        "Hepatic",
        "Portal",
        "Tumor_1",
        "Tumor_2",
    ]
    assert "CC BY 4.0" in (tmp_path / "out" / "LICENSE-NOTICE.txt").read_text()


@pytest.mark.parametrize("start", ["collection", "patient"])
def test_import_from_the_collection_or_one_patient_folder(download, tmp_path, start):
    src = download["root"] if start == "collection" else download["root"] / "CRLM-CT-1002"
    df = pd.read_csv(import_tcia_crlm(src, tmp_path / "out"))
    assert len(df) == (2 if start == "collection" else 1)


def test_cli_import(download, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["import", "tcia-crlm", str(download["top"]), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "imported 2 of 2 patient(s), 4 lesion(s)" in said and (out / "manifest.csv").is_file()


def test_overlapping_tumour_segments_skip_the_patient_with_a_reason(tmp_path):
    root = tmp_path / COLLECTION
    p = write_patient(root, "CRLM-CT-1003")
    shape = p["image"].shape
    write_patient(
        root,
        "CRLM-CT-1004",
        {"Tumor_1": _ball(shape, (12, 24, 24), 4), "Tumor_2": _ball(shape, (12, 26, 24), 3)},
    )
    manifest = import_tcia_crlm(root, tmp_path / "out")
    assert list(pd.read_csv(manifest)["patient_id"]) == ["CRLM-CT-1003"]
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert report["totals"]["skipped"] == ["CRLM-CT-1004"]
    assert "overlap" in report["patients"][1]["problems"][0]


# --------------------------------------------------------------------------- wrong layouts


def _refused(src: Path, out: Path) -> str:
    with pytest.raises(UserError) as exc:
        import_tcia_crlm(src, out)
    assert not out.exists()
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_ircadb_layout_is_refused_naming_the_expected_layout(tmp_path):
    ircad = tmp_path / "3Dircadb1"
    (ircad / "3Dircadb1.1" / "PATIENT_DICOM").mkdir(parents=True)
    msg = _refused(ircad, tmp_path / "out")
    assert "CRLM-CT-NNNN" in msg and COLLECTION in msg and "import ircadb" in msg and "3Dircadb1.1/" in msg


def test_missing_seg_is_named(tmp_path):
    root = tmp_path / COLLECTION
    p = write_patient(root, "CRLM-CT-1005")
    for f in p["seg"].parent.iterdir():
        f.unlink()
    p["seg"].parent.rmdir()
    msg = _refused(root, tmp_path / "out")
    assert "CRLM-CT-1005" in msg and "no DICOM SEG" in msg and "Segmentation" in msg


def test_missing_ct_series_is_named(tmp_path):
    root = tmp_path / COLLECTION
    p = write_patient(root, "CRLM-CT-1006")
    for f in p["ct"].iterdir():
        f.unlink()
    p["ct"].rmdir()
    msg = _refused(root, tmp_path / "out")
    assert "100.000000-Segmentation-53960" in msg and "CT series it references" in msg


@pytest.mark.parametrize("keep", [0, 300, 0.5])
def test_seg_cut_short_or_empty_is_named_before_any_work(tmp_path, keep):
    """A SEG cut short read as a SEG of no segments (the patient skipped for the wrong reason) or as
    no SEG at all (its folder listed, but not why)."""
    root = tmp_path / COLLECTION
    p = write_patient(root, "CRLM-CT-1010")
    data = p["seg"].read_bytes()
    p["seg"].write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    msg = _refused(root, tmp_path / "out")
    assert "CRLM-CT-1010" in msg and "100.000000-Segmentation-53960" in msg
    assert ("ends before its pixel data" if keep else "1-1.dcm 0 bytes: empty, cut short or not DICOM") in msg


def test_output_holding_the_download_is_refused(tmp_path):
    """-o on the folder above the download, with --overwrite, deleted the download (the manifest's CT and SEG)."""
    root = tmp_path / "dl" / COLLECTION
    p = write_patient(root, "CRLM-CT-1011")
    with pytest.raises(UserError, match=r"holds the input source folder"):
        import_tcia_crlm(root, tmp_path / "dl", overwrite=True)
    assert p["seg"].is_file()


def test_empty_or_missing_source(tmp_path):
    assert "not found" in _refused(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert "holds nothing" in _refused(tmp_path / "empty", tmp_path / "out")


def test_seg_without_tumour_or_segments_skips_the_patient(tmp_path):
    import pydicom

    root = tmp_path / COLLECTION
    write_patient(root, "CRLM-CT-1007")
    p = write_patient(root, "CRLM-CT-1008", {})  # liver and vessels only
    q = write_patient(root, "CRLM-CT-1009")
    ds = pydicom.dcmread(q["seg"])
    ds.SegmentSequence = []
    ds.save_as(q["seg"])
    manifest = import_tcia_crlm(root, tmp_path / "out")
    assert list(pd.read_csv(manifest)["patient_id"]) == ["CRLM-CT-1007"]
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert report["totals"]["skipped"] == ["CRLM-CT-1008", "CRLM-CT-1009"]
    problems = {r["patient_id"]: r["problems"][0] for r in report["patients"] if r["problems"]}
    assert "'Tumor*'" in problems["CRLM-CT-1008"] and "no segments" in problems["CRLM-CT-1009"]
    assert p["seg"].is_file()


def test_no_patient_with_a_tumour_is_refused_and_writes_nothing(tmp_path):
    root = tmp_path / COLLECTION
    write_patient(root, "CRLM-CT-1010", {})  # liver and vessels only
    msg = _refused(root, tmp_path / "out")
    assert msg.startswith(f"{root}: no lesions found in 1 patient (CRLM-CT-1010: ")
    assert "'Tumor*'" in msg and "nothing was written" in msg


def test_seg_saved_into_its_ct_series_folder_is_found(tmp_path):
    root = tmp_path / COLLECTION
    p = write_patient(root, "CRLM-CT-1011")
    mixed = (
        p["ct"] / "1-1.dcm"
    )  # sorts after the CT's 1-001.dcm ..., so the folder's first file is a CT slice
    shutil.move(p["seg"], mixed)
    p["seg"].parent.rmdir()
    manifest = import_tcia_crlm(root, tmp_path / "out")
    row = pd.read_csv(manifest).iloc[0]
    assert (manifest.parent / row["mask"]).resolve() == mixed.resolve()
    assert (manifest.parent / row["image"]).resolve() == p["ct"].resolve()
    table = lesion_table(manifest, progress=False)  # the CT folder still reads as the CT, the SEG as the mask
    assert len(table) == 2 and set(table["lesion_class"]) == {"metastasis"}
