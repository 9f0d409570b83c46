"""3D-IRCADb-01 importer: layout discovery, structure names, specks, overlaps, errors, real patient 1."""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import write_dicom_series
from liverlesion.cli import main
from liverlesion.datasets.ircadb import LabelBuilder, import_ircadb
from liverlesion.datasets.ircadb_layout import classify_structure, find_patients
from liverlesion.errors import UserError
from liverlesion.io import read_volume
from liverlesion.volume import Volume

SHAPE = (6, 20, 24)
SPACING = (2.0, 1.0, 1.0)
ORIGIN = (-12.0, -10.0, 50.0)


# ----------------------------------------------------------------------------- fake IRCAD layout


def _box(z0, z1, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros(SHAPE, dtype=bool)
    m[z0:z1, y0:y1, x0:x1] = True
    return m


def _volume(array: np.ndarray, spacing=SPACING) -> Volume:
    return Volume(array.astype(np.float32), spacing, ORIGIN, np.eye(3))


def _write_patient(
    folder: Path,
    structures: dict[str, np.ndarray],
    zip_image: bool = False,
    zip_masks: bool = False,
    zip_top_folder: bool = True,
    mask_spacing=SPACING,
) -> Path:
    """A 3Dircadb1.N-like patient: PATIENT_DICOM/ and MASKS_DICOM/<structure>/ (optionally zipped)."""
    hu = np.full(SHAPE, 60.0, dtype=np.float32)
    hu[:, :, :3] = -1000.0  # some air, so the image is not constant
    for m in structures.values():
        hu[m] = 10.0
    write_dicom_series(_volume(hu), folder / "PATIENT_DICOM", shuffle_names=False)
    for name, m in structures.items():
        # IRCAD masks are 0/255 DICOM slices in the CT's geometry.
        write_dicom_series(
            _volume(m * 255.0, mask_spacing),
            folder / "MASKS_DICOM" / name,
            slope=1.0,
            intercept=0.0,
            seed=len(name),
        )
    for part, zipped in (("PATIENT_DICOM", zip_image), ("MASKS_DICOM", zip_masks)):
        if zipped:
            _zip_folder(folder / part, folder / f"{part}.zip", top=zip_top_folder)
            shutil.rmtree(folder / part)
    return folder


def _zip_folder(src: Path, dest: Path, top: bool) -> None:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                rel = f.relative_to(src.parent if top else src)
                zf.write(f, rel.as_posix())


# Lesions of the standard fake patient (voxel counts in comments).
LIVER = _box(0, 6, 2, 18, 3, 16)
T01 = _box(1, 3, 4, 7, 4, 7)  # 18
SPECK1 = _box(5, 6, 16, 17, 20, 21)  # 1 voxel, outside the liver: a speck
SPECK2 = _box(0, 1, 0, 1, 22, 24)  # 2 voxels: a speck
TS_A = _box(3, 5, 10, 12, 4, 6)  # 8
TS_B = _box(3, 5, 14, 17, 12, 15)  # 18
CYST = _box(0, 2, 12, 15, 10, 13)  # 18
BARE_IN = _box(4, 6, 4, 7, 10, 13)  # 18, inside the liver
BARE_OUT = _box(1, 3, 4, 7, 19, 23)  # 24, outside the liver


def _standard_structures() -> dict[str, np.ndarray]:
    return {
        "liver": LIVER,
        "LiverTumor_01": T01 | SPECK1 | SPECK2,
        "livertumors": TS_A | TS_B,
        "liverkyste": CYST,
        "tumor": BARE_IN | BARE_OUT,
        "portalvein": _box(2, 4, 8, 9, 3, 16),  # ignored (overlaps lesions, must not matter)
    }


@pytest.fixture
def fake_patient(tmp_path: Path) -> Path:
    return _write_patient(tmp_path / "src" / "3Dircadb1.3", _standard_structures())


def _mask_array(out: Path, pid: str) -> np.ndarray:
    return read_volume(out / "masks" / f"{pid}.nii.gz", kind="mask").array


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, role",
    [
        ("livertumor", "metastasis"),
        ("livertumor01", "metastasis"),
        ("livertumor7", "metastasis"),
        ("livertumor_12", "metastasis"),
        ("livertumors", "metastasis"),
        ("LiverTumor02", "metastasis"),
        ("liverkyst", "cyst"),
        ("liverkyste", "cyst"),
        ("livercyst", "cyst"),
        ("liverkyst2", "cyst"),
        ("LIVERCYST_03", "cyst"),
        ("tumor", "tumor"),
        ("Tumor2", "tumor"),
        ("liver", "liver"),
        ("Liver", "liver"),
        ("livertumorXX", None),
        ("portalvein", None),
        ("leftkidney", None),
        ("liverartery", None),
        ("surrenalgland", None),
    ],
)
def test_classify_structure(name, role):
    assert classify_structure(name) == role


# ----------------------------------------------------------------------------- synthetic imports


def test_import_fake_patient(fake_patient: Path, tmp_path: Path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="liverlesion.datasets.ircadb"):
        manifest_path = import_ircadb(fake_patient, out)
    assert manifest_path == out / "manifest.csv"
    df = pd.read_csv(manifest_path)
    assert list(df.columns) == ["patient_id", "image", "mask", "label", "lesion_class"]
    assert set(df.patient_id) == {"ircadb1_03"}
    assert df.image.unique().tolist() == ["images/ircadb1_03.nii.gz"]
    # LiverTumor_01 (1) + livertumors (2) + tumor inside the liver (1) = 4 metastases; liverkyste = 1 cyst.
    assert sorted(df.lesion_class) == ["cyst"] + ["metastasis"] * 4
    assert df.label.tolist() == [1, 2, 3, 4, 5]

    labels = _mask_array(out, "ircadb1_03")
    # Each lesion's voxels are exactly its box; specks and the part outside the liver are gone.
    expected = [CYST, T01, TS_A, TS_B, BARE_IN]  # name order: liverkyste, LiverTumor_01, livertumors, tumor
    for label, box in enumerate(expected, start=1):
        assert np.array_equal(labels == label, box), label
    assert not labels[SPECK1 | SPECK2 | BARE_OUT].any()
    assert df.set_index("label").loc[1, "lesion_class"] == "cyst"

    image = read_volume(out / "images" / "ircadb1_03.nii.gz")
    assert image.shape == SHAPE and np.allclose(image.spacing, SPACING) and np.allclose(image.origin, ORIGIN)
    assert np.allclose(image.array[T01], 10.0) and np.allclose(image.array[:, :, :3], -1000.0)
    import nibabel as nib

    assert nib.load(out / "images" / "ircadb1_03.nii.gz").get_data_dtype() == np.int16

    report = json.loads((out / "import_report.json").read_text())
    p = report["patients"][0]
    assert p["specks_dropped"] == [{"structure": "LiverTumor_01", "components": 2, "voxels": 3}]
    assert p["outside_liver_dropped"] == [{"structure": "tumor", "voxels": int(BARE_OUT.sum())}]
    assert "portalvein" in p["ignored_structures"] and "liver" in p["ignored_structures"]
    assert [les["n_voxels"] for les in p["lesions"]] == [int(b.sum()) for b in expected]
    assert p["lesions"][1]["volume_ml"] == pytest.approx(T01.sum() * 2.0 / 1000, abs=1e-3)
    assert report["totals"] == {
        "patients": 1,
        "patients_with_lesions": 1,
        "lesions": 5,
        "by_class": {"metastasis": 4, "cyst": 1},
        "specks_dropped": 2,
    }
    assert "CC BY-NC-ND 4.0" in (out / "LICENSE-NOTICE.txt").read_text()
    assert "may not be redistributed" in (out / "LICENSE-NOTICE.txt").read_text()
    text = caplog.text
    assert "2 speck(s)" in text and "LiverTumor_01" in text
    assert "outside the liver" in text
    # Identifying DICOM tags written by the helper never reach the logs or the report.
    for secret in ("Test^Synthetic", "SYNTH-0001", "19700101"):
        assert secret not in text and secret not in json.dumps(report)


@pytest.mark.parametrize("top_folder", [True, False])
def test_zip_variants_give_the_same_result(tmp_path: Path, fake_patient: Path, top_folder: bool):
    zipped = _write_patient(
        tmp_path / "zsrc" / "3Dircadb1.3",
        _standard_structures(),
        zip_image=True,
        zip_masks=True,
        zip_top_folder=top_folder,
    )
    assert not (zipped / "PATIENT_DICOM").exists() and (zipped / "MASKS_DICOM.zip").is_file()
    a = import_ircadb(fake_patient, tmp_path / "a")
    b = import_ircadb(zipped, tmp_path / "b")
    assert pd.read_csv(a).equals(pd.read_csv(b))
    assert np.array_equal(_mask_array(a.parent, "ircadb1_03"), _mask_array(b.parent, "ircadb1_03"))


def test_parent_folder_sorted_numerically_and_lesion_free_patient(tmp_path: Path):
    src = tmp_path / "3Dircadb1"
    _write_patient(src / "3Dircadb1.10", {"livertumor1": T01})
    _write_patient(src / "3Dircadb1.2", {"liverkyst": CYST, "livertumor2": TS_B})
    _write_patient(src / "3Dircadb1.4", {"liver": LIVER, "bone": _box(0, 6, 0, 2, 0, 24)})  # no lesions
    (src / "README.txt").write_text("not a patient")
    assert [n for n, _ in find_patients(src)] == [2, 4, 10]
    out = tmp_path / "out"
    df = pd.read_csv(import_ircadb(src, out))
    assert df.patient_id.tolist() == ["ircadb1_02", "ircadb1_02", "ircadb1_10"]
    assert df.lesion_class.tolist() == ["cyst", "metastasis", "metastasis"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["ircadb1_02.nii.gz", "ircadb1_10.nii.gz"]
    report = json.loads((out / "import_report.json").read_text())
    assert [p["patient_id"] for p in report["patients"]] == ["ircadb1_02", "ircadb1_04", "ircadb1_10"]
    assert report["patients"][1]["image"] is None and report["patients"][1]["warnings"]
    assert report["totals"]["patients_with_lesions"] == 2


def test_no_patient_with_a_lesion_is_refused_and_writes_nothing(tmp_path: Path):
    src = tmp_path / "3Dircadb1"
    _write_patient(src / "3Dircadb1.4", {"liver": LIVER, "bone": _box(0, 6, 0, 2, 0, 24)})
    _write_patient(src / "3Dircadb1.6", {"liver": LIVER, "livertumor": np.zeros_like(LIVER)})
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        import_ircadb(src, out)
    msg = str(e.value)
    assert msg.startswith(f"{src}: no lesions found in 2 patients (ircadb1_04: no tumour or cyst masks")
    assert "ircadb1_06: no lesion left after dropping specks" in msg and "livertumor*/liverkyst*" in msg
    assert "\n" not in msg and not out.exists() and not list(tmp_path.glob(".out.*"))


def test_bare_tumor_without_liver_mask_is_dropped(tmp_path: Path):
    src = _write_patient(tmp_path / "3Dircadb1.5", {"livertumor": T01, "tumor": BARE_OUT})
    out = tmp_path / "out"
    df = pd.read_csv(import_ircadb(src, out))
    assert df.label.tolist() == [1]
    assert np.array_equal(_mask_array(out, "ircadb1_05") == 1, T01)
    p = json.loads((out / "import_report.json").read_text())["patients"][0]
    assert p["outside_liver_dropped"][0]["reason"] == "no liver mask"


# ----------------------------------------------------------------------------- overlaps


@pytest.mark.parametrize("big_first", [True, False])
def test_overlap_goes_to_the_larger_lesion(big_first: bool):
    big = _box(0, 4, 0, 4, 0, 4)  # 64
    small = _box(2, 4, 3, 6, 3, 6)  # 18, 2*1*1 = 2 voxels shared with big
    shared = big & small
    assert shared.sum() == 2
    builder = LabelBuilder(SHAPE)
    order = [("big", big), ("small", small)] if big_first else [("small", small), ("big", big)]
    for name, m in order:
        assert builder.add(m, name, "metastasis") == 1
    labels, lesions, dropped = builder.finish()
    by_name = {les.structure: les.label for les in lesions}
    assert np.array_equal(labels == by_name["big"], big)
    assert np.array_equal(labels == by_name["small"], small & ~shared)
    assert {les.structure: les.n_voxels_annotated for les in lesions} == {"big": 64, "small": 16}
    assert builder.overlaps == [
        {"structures": [n for n, _ in order], "voxels": 2, "assigned_to": "big"},
    ]
    assert dropped == []
    assert [les.label for les in lesions] == [1, 2]


def test_duplicate_lesion_is_dropped_and_labels_renumbered():
    a, b = _box(0, 2, 0, 3, 0, 3), _box(3, 6, 10, 14, 10, 14)
    builder = LabelBuilder(SHAPE)
    builder.add(a | b, "livertumors", "metastasis")  # 2 lesions
    builder.add(a, "livertumor01", "metastasis")  # the same voxels as the first: a duplicate (tie -> earlier)
    builder.add(_box(0, 2, 15, 18, 15, 18), "liverkyst", "cyst")
    labels, lesions, dropped = builder.finish()
    assert [(les.label, les.structure) for les in lesions] == [
        (1, "livertumors"),
        (2, "livertumors"),
        (3, "liverkyst"),
    ]
    assert dropped == [{"structure": "livertumor01", "voxels": int(a.sum())}]
    assert np.array_equal(np.unique(labels), [0, 1, 2, 3]) and labels.dtype == np.uint8


# ----------------------------------------------------------------------------- errors


def test_missing_patient_dicom(tmp_path: Path):
    src = _write_patient(tmp_path / "3Dircadb1.1", {"livertumor": T01})
    shutil.rmtree(src / "PATIENT_DICOM")
    with pytest.raises(UserError, match=r"3Dircadb1\.1.*no PATIENT_DICOM folder or PATIENT_DICOM\.zip"):
        import_ircadb(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_masks_dicom_in_one_of_several_patients_fails_before_any_work(tmp_path: Path):
    src = tmp_path / "all"
    _write_patient(src / "3Dircadb1.1", {"livertumor": T01})
    bad = _write_patient(src / "3Dircadb1.2", {"livertumor": T01})
    shutil.rmtree(bad / "MASKS_DICOM")
    with pytest.raises(UserError, match=r"3Dircadb1\.2.*MASKS_DICOM"):
        import_ircadb(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p, "not found"),
        (lambda p: (p.mkdir(), p)[1], "no 3Dircadb1.N folders"),
        (lambda p: (p.write_text("x"), p)[1], "is a file"),
        (lambda p: (p.mkdir(), (p / "PATIENT_DICOM").mkdir(), p)[2], "rename it to 3Dircadb1.N"),
        (lambda p: (p.mkdir(), (p / "3Dircadb1.1.zip").write_bytes(b"PK"), p)[2], "unzip them first"),
    ],
)
def test_bad_src(tmp_path: Path, make, match):
    src = make(tmp_path / "data")
    with pytest.raises(UserError, match=match) as e:
        import_ircadb(src, tmp_path / "out")
    assert str(tmp_path / "data") in str(e.value) and "\n" not in str(e.value)


def test_corrupt_zip_and_empty_masks(tmp_path: Path):
    src = _write_patient(tmp_path / "3Dircadb1.1", {"livertumor": T01})
    shutil.rmtree(src / "PATIENT_DICOM")
    (src / "PATIENT_DICOM.zip").write_bytes(b"this is not a zip")
    with pytest.raises(UserError, match=r"PATIENT_DICOM\.zip: not a readable zip file"):
        import_ircadb(src, tmp_path / "out")
    src2 = _write_patient(tmp_path / "b" / "3Dircadb1.2", {"livertumor": T01})
    shutil.rmtree(src2 / "MASKS_DICOM")
    (src2 / "MASKS_DICOM").mkdir()
    with pytest.raises(UserError, match="no structure folders found"):
        import_ircadb(src2, tmp_path / "out")


def _encrypt_flags(path: Path) -> None:
    """Set the 'encrypted' flag bit of every entry (local and central headers), as a password zip has."""
    data = bytearray(path.read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = data.find(sig)
        while i >= 0:
            data[i + flag_at] |= 1
            i = data.find(sig, i + 4)
    path.write_bytes(bytes(data))


def test_unusable_masks_zip_is_refused_before_any_work(tmp_path: Path, monkeypatch):
    """Password-protected: found only when extracting, after the CT was read, with the advice to
    re-download; a checkpoint in its place; a structure unpacking to more than any CT series."""
    src = _write_patient(tmp_path / "3Dircadb1.1", {"livertumor": T01}, zip_masks=True)
    zipped = src / "MASKS_DICOM.zip"
    good = zipped.read_bytes()
    _encrypt_flags(zipped)
    read = []
    monkeypatch.setattr("liverlesion.datasets.ircadb.read_volume", lambda *a, **k: read.append(a))
    with pytest.raises(UserError, match=r"MASKS_DICOM\.zip: is password-protected .*with its password"):
        import_ircadb(src, tmp_path / "out")
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("model/data.pkl", b"x")
    with pytest.raises(UserError, match=r"MASKS_DICOM\.zip: is a PyTorch file"):
        import_ircadb(src, tmp_path / "out")
    zipped.write_bytes(good)
    monkeypatch.setattr("liverlesion.datasets.ircadb_layout.MAX_UNPACKED_BYTES", 1000)
    with pytest.raises(UserError, match=r"'MASKS_DICOM/livertumor' would unpack to"):
        import_ircadb(src, tmp_path / "out")
    assert not read and not (tmp_path / "out").exists()


@pytest.mark.parametrize("zip_masks", [False, True])
def test_zipped_structures_inside_masks_dicom_are_named(tmp_path: Path, zip_masks: bool):
    """MASKS_DICOM/livertumor.zip was 'no structure folders found', as if MASKS_DICOM were empty."""
    src = _write_patient(tmp_path / "3Dircadb1.1", {"livertumor": T01})
    masks = src / "MASKS_DICOM"
    _zip_folder(masks / "livertumor", masks / "livertumor.zip", top=True)
    shutil.rmtree(masks / "livertumor")
    if zip_masks:
        _zip_folder(masks, src / "MASKS_DICOM.zip", top=True)
        shutil.rmtree(masks)
    with pytest.raises(UserError, match=r"holds zip files \(livertumor\.zip\) where structure folders"):
        import_ircadb(src, tmp_path / "out")


def test_mask_geometry_mismatch_is_an_error_and_leaves_nothing(tmp_path: Path):
    src = _write_patient(tmp_path / "3Dircadb1.1", {"livertumor": T01}, mask_spacing=(2.0, 1.2, 1.2))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"livertumor does not match .*PATIENT_DICOM.*spacing"):
        import_ircadb(src, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folder left


def test_mask_series_in_the_ct_place_is_refused_and_leaves_nothing(tmp_path: Path):
    """Wrong file in the wrong slot: PATIENT_DICOM holding a 0/255 mask series was imported as the CT."""
    src = _write_patient(tmp_path / "3Dircadb1.1", {"livertumor": T01})
    shutil.rmtree(src / "PATIENT_DICOM")
    shutil.copytree(src / "MASKS_DICOM" / "livertumor", src / "PATIENT_DICOM")
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        import_ircadb(src, out)
    msg = str(e.value)
    assert "PATIENT_DICOM" in msg and "as in a label mask" in msg and "\n" not in msg
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_overwrite_protection(fake_patient: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        import_ircadb(fake_patient, out)
    assert (out / "keep.txt").read_text() == "precious"
    import_ircadb(fake_patient, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.csv").is_file()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        import_ircadb(fake_patient, f)


def test_output_holding_the_source_is_refused(fake_patient: Path):
    """-o on the folder that holds 3Dircadb1.N, with --overwrite, deleted the patient (exit 0)."""
    with pytest.raises(UserError, match=r"holds the input source folder .*3Dircadb1\.3"):
        import_ircadb(fake_patient, fake_patient.parent, overwrite=True)
    assert (fake_patient / "PATIENT_DICOM").is_dir() and not (fake_patient.parent / "manifest.csv").exists()


# ----------------------------------------------------------------------------- CLI


def test_cli_import(fake_patient: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert main(["import", "ircadb", str(fake_patient), str(out)]) == 0
    assert "5 lesion(s)" in capsys.readouterr().out
    assert len(pd.read_csv(out / "manifest.csv")) == 5
    capsys.readouterr()
    assert main(["import", "ircadb", str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("liverlesion: error:") and "nope" in lines[0]
    assert not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- real data

IRCAD_PATIENT1 = Path(__file__).resolve().parents[2] / "shared/data/3Dircadb1/3Dircadb1.1"


@pytest.fixture(scope="module")
def real_import(tmp_path_factory) -> Path:
    """Patient 1 imported as published (PATIENT_DICOM folder, MASKS_DICOM.zip); temp only."""
    if not (IRCAD_PATIENT1 / "PATIENT_DICOM").is_dir() or not (IRCAD_PATIENT1 / "MASKS_DICOM.zip").is_file():
        pytest.skip(f"real data not found at {IRCAD_PATIENT1} (see shared/data/README.md)")
    return import_ircadb(IRCAD_PATIENT1, tmp_path_factory.mktemp("ircadb") / "out")


@pytest.mark.realdata
def test_real_patient1(real_import: Path):
    df = pd.read_csv(real_import)
    assert (df.lesion_class == "metastasis").sum() == 7
    assert (df.lesion_class == "cyst").sum() == 1
    report = json.loads((real_import.parent / "import_report.json").read_text())
    p = report["patients"][0]
    assert p["specks_dropped"] == [] and p["overlaps"] == []
    vols = {les["structure"]: les["volume_ml"] for les in p["lesions"]}
    assert set(vols) == {"liverkyst", *(f"livertumor0{i}" for i in range(1, 8))}
    assert 80 <= max(vols.values()) <= 88 and max(vols, key=vols.get) == "livertumor01"
    assert all(0.02 < v < 150 for v in vols.values())  # the cyst is tiny (~0.06 mL) but real

    image = read_volume(real_import.parent / df.image[0])
    mask = read_volume(real_import.parent / df["mask"][0], kind="mask")
    assert image.shape == mask.shape == (129, 512, 512)
    assert np.allclose(image.spacing, (1.6, 0.57, 0.57), atol=1e-3)
    counts = np.bincount(mask.array.ravel())
    assert [int(c) for c in counts[1:]] == [les["n_voxels"] for les in p["lesions"]]
    # Tumours are soft tissue on portal-venous CT, not air or bone.
    for les in p["lesions"]:
        hu = float(image.array[mask.array == les["label"]].mean())
        assert -50 < hu < 200, (les["structure"], hu)


@pytest.mark.realdata
def test_real_patient1_zipped_image_and_extracted_masks(real_import: Path, tmp_path: Path):
    """PATIENT_DICOM as a zip and MASKS_DICOM as a folder (built in tmp, never in the repo)."""
    patient = tmp_path / "3Dircadb1.1"
    patient.mkdir()
    _zip_folder(IRCAD_PATIENT1 / "PATIENT_DICOM", patient / "PATIENT_DICOM.zip", top=True)
    # Extract a few structures only (a cyst, the largest tumour, an ignored organ) to keep the test fast.
    wanted = ("liverkyst/", "livertumor01/", "portalvein/")
    with zipfile.ZipFile(IRCAD_PATIENT1 / "MASKS_DICOM.zip") as zf:
        members = [m for m in zf.namelist() if m.startswith("MASKS_DICOM/") and m[12:].startswith(wanted)]
        zf.extractall(patient, members=members)
    assert (patient / "MASKS_DICOM" / "livertumor01").is_dir()
    out = import_ircadb(patient, tmp_path / "out")
    df, ref = pd.read_csv(out), pd.read_csv(real_import)
    assert df.lesion_class.tolist() == ["cyst", "metastasis"]
    # Same lesions as the published layout: cyst = label 1 in both, livertumor01 = label 2 in both.
    labels, ref_labels = _mask_array(out.parent, "ircadb1_01"), _mask_array(real_import.parent, "ircadb1_01")
    for label in (1, 2):
        assert np.array_equal(labels == label, ref_labels == label)
    assert ref.lesion_class[:2].tolist() == ["cyst", "metastasis"]
    a = read_volume(out.parent / df.image[0]).array
    assert np.array_equal(a, read_volume(real_import.parent / ref.image[0]).array)
