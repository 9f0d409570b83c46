"""`import msd` and `import folder`: layouts built as the real collections are, class maps, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from liverlesion.cli import main
from liverlesion.datasets.folder import import_folder
from liverlesion.datasets.msd import import_msd
from liverlesion.errors import UserError
from liverlesion.io import read_volume, write_volume
from liverlesion.manifest_lesions import lesion_table
from liverlesion.volume import Volume

SHAPE = (8, 24, 28)
SPACING = (2.5, 0.8, 0.8)
LITS_LABELS = {"0": "background", "1": "liver", "2": "cancer"}


def _case(seed: int, tumours: int = 2, speck: bool = False) -> tuple[Volume, np.ndarray]:
    """A CT with a liver (label 1) holding ``tumours`` boxes (label 2), as LiTS labels them."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(40.0, 5.0, SHAPE).astype(np.float32)
    hu[:, :, :2] = -1000.0
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[1:7, 3:21, 3:25] = 1
    for k in range(tumours):
        x0 = 5 + 10 * k
        lab[2:5, 6:11, x0 : x0 + 5] = 2
    if speck:
        lab[6, 18, 22] = 2  # one-voxel annotation speck
    hu[lab == 1] = 100.0
    hu[lab == 2] = 30.0
    return Volume(hu, SPACING, (-10.0, 20.0, 50.0)), lab


def _write(vol: Volume, lab: np.ndarray | None, image: Path, label: Path | None) -> None:
    write_volume(vol, image)
    if lab is not None and label is not None:
        write_volume(vol.with_array(lab, kind="mask"), label)


def make_msd_task(root: Path, name: str = "Task03_Liver", prefix: str = "liver", n: int = 2) -> Path:
    """Task03_Liver as extracted from the Decathlon tar: dataset.json, imagesTr/, labelsTr/, imagesTs/, ._ files."""
    task = root / name
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    (task / "imagesTs").mkdir()
    training = []
    for i in range(n):
        vol, lab = _case(i, tumours=2 if i == 0 else 1, speck=i == 0)
        f = f"{prefix}_{i}.nii.gz"
        _write(vol, lab, task / "imagesTr" / f, task / "labelsTr" / f)
        (task / "imagesTr" / f"._{f}").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
        training.append({"image": f"./imagesTr/{f}", "label": f"./labelsTr/{f}"})
    write_volume(_case(9)[0], task / "imagesTs" / f"{prefix}_{n}.nii.gz")
    meta = {
        "name": "Liver",
        "description": "Liver and tumor segmentation",
        "reference": "https://competitions.codalab.org/competitions/17094",
        "licence": "CC-BY-SA 4.0",
        "relase": "1.0 04/05/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": LITS_LABELS,
        "numTraining": n,
        "numTest": 1,
        "training": training,
        "test": [f"./imagesTs/{prefix}_{n}.nii.gz"],
    }
    (task / "dataset.json").write_text(json.dumps(meta, indent=4))
    return task


def make_nnunet_dataset(root: Path, n: int = 2) -> Path:
    """nnU-Net v2 raw: Dataset003_Liver/dataset.json (name -> value), imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz."""
    ds = root / "Dataset003_Liver"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for i in range(n):
        vol, lab = _case(i)
        _write(
            vol,
            lab,
            ds / "imagesTr" / f"liver_{i:03d}_0000.nii.gz",
            ds / "labelsTr" / f"liver_{i:03d}.nii.gz",
        )
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumor": 2},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (ds / "dataset.json").write_text(json.dumps(meta, indent=4))
    return ds


def make_pairs(root: Path, n: int = 2) -> Path:
    folder = root / "pairs"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i in range(n):
        vol, lab = _case(i)
        _write(vol, lab, folder / "images" / f"p{i}.nii.gz", folder / "labels" / f"p{i}.nii.gz")
    return folder


# ----------------------------------------------------------------------------- MSD


def test_msd_task03_liver(tmp_path: Path):
    task = make_msd_task(tmp_path)
    manifest = import_msd(task, tmp_path / "out", ["2=metastasis"])
    df = pd.read_csv(manifest)
    # case 0: two tumours (its speck dropped), case 1: one; the liver (label 1) is no lesion
    assert list(df["patient_id"]) == ["liver_0", "liver_0", "liver_1"]
    assert list(df["label"]) == [1, 2, 1] and set(df["lesion_class"]) == {"metastasis"}
    assert Path(df["image"].iloc[0]) == (task / "imagesTr" / "liver_0.nii.gz").resolve()
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert report["totals"]["specks_dropped"] == 1 and report["class_map"] == {"2": "metastasis"}
    assert "CC BY-SA 4.0" in report["license"]
    assert "ShareAlike" in (tmp_path / "out" / "LICENSE-NOTICE.txt").read_text()
    mask = read_volume(tmp_path / "out" / "masks" / "liver_0.nii.gz", kind="mask")
    assert int((mask.array > 0).sum()) == 2 * 3 * 5 * 5
    # the manifest is one liverlesion reads: each tumour a lesion of 75 voxels
    table = lesion_table(manifest, progress=False)
    assert list(table["n_voxels"]) == [75, 75, 75] and list(table["source"]) == ["mask"] * 3


def test_msd_label_by_name_and_parent_folder(tmp_path: Path):
    make_msd_task(tmp_path, "Task08_HepaticVessel", "hepaticvessel", n=1)
    meta_path = tmp_path / "Task08_HepaticVessel" / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["labels"] = {"0": "background", "1": "Vessel", "2": "Tumour"}
    meta_path.write_text(json.dumps(meta))
    manifest = import_msd(tmp_path, tmp_path / "out", ["tumour=metastasis"])  # the folder holding the task
    df = pd.read_csv(manifest)
    assert list(df["patient_id"]) == ["hepaticvessel_0"] * 2 and set(df["lesion_class"]) == {"metastasis"}


def test_msd_unknown_label_value_lists_known_ones(tmp_path: Path):
    task = make_msd_task(tmp_path, n=1)
    with pytest.raises(UserError) as e:
        import_msd(task, tmp_path / "out", ["3=metastasis"])
    msg = str(e.value)
    assert "label 3 is not in" in msg and "dataset.json" in msg and "0 background, 1 liver, 2 cancer" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("2", "expected VALUE=CLASS"),
        ("0=cyst", "0 is the background"),
        ("tumor=metastasis", "neither a label value nor a label name"),
        ("2=meta stasis", "must start with a letter"),
        ("2=metastasis,2=cyst", "mapped twice"),
    ],
)
def test_msd_bad_class_map(tmp_path: Path, spec, match):
    task = make_msd_task(tmp_path, n=1)
    with pytest.raises(UserError, match=match):
        import_msd(task, tmp_path / "out", [spec])


def test_msd_wrong_layouts_name_expected_and_missing(tmp_path: Path):
    # an IRCAD folder
    ircad = tmp_path / "3Dircadb1"
    (ircad / "3Dircadb1.1" / "PATIENT_DICOM").mkdir(parents=True)
    with pytest.raises(UserError) as e:
        import_msd(ircad, tmp_path / "out", ["2=metastasis"])
    msg = str(e.value)
    assert "Medical Segmentation Decathlon layout" in msg
    assert "missing dataset.json, imagesTr/, labelsTr/" in msg and "import ircadb" in msg
    # an nnU-Net v2 dataset
    ds = make_nnunet_dataset(tmp_path, n=1)
    with pytest.raises(UserError, match=r"nnU-Net v2 dataset.json .*import folder"):
        import_msd(ds, tmp_path / "out", ["2=metastasis"])
    # files listed in dataset.json but missing (a partial extraction)
    task = make_msd_task(tmp_path / "partial", n=2)
    (task / "labelsTr" / "liver_1.nii.gz").unlink()
    with pytest.raises(
        UserError, match=r"1 file\(s\) listed in dataset.json are missing: labelsTr/liver_1.nii.gz"
    ):
        import_msd(task, tmp_path / "out", ["2=metastasis"])
    # a non-CT task
    mri = make_msd_task(tmp_path / "mri", "Task01_BrainTumour", "BRATS", n=1)
    meta = json.loads((mri / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1w"}
    (mri / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="modality 'FLAIR', not CT"):
        import_msd(mri, tmp_path / "out", ["2=metastasis"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("training", ["oops", {"image": "x"}, 3])
def test_msd_training_entry_that_is_not_a_list_is_refused(tmp_path: Path, training):
    # it was ignored: every image of imagesTr/ was imported instead, with exit 0
    task = make_msd_task(tmp_path / "t", n=1)
    meta = json.loads((task / "dataset.json").read_text())
    meta["training"] = training
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match=r'dataset.json: "training" is .*not a list of .*delete the "training" key'
    ):
        import_msd(task, tmp_path / "out", ["2=metastasis"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "key, entry, match",
    [
        ("image", "/etc/hostname", "points outside the task folder"),
        ("label", "../../other/Task03_Liver/labelsTr/liver_0.nii.gz", "points outside the task folder"),
        ("image", "./imagesTr", "lists folders where image files belong: imagesTr"),
    ],
)
def test_msd_dataset_json_entry_outside_the_task_or_a_folder_is_refused(tmp_path: Path, key, entry, match):
    """Entries leaving the task were read wherever they pointed (a label of another task imported with
    exit 0); a folder entry was called 'missing'."""
    task = make_msd_task(tmp_path / "a", n=1)
    make_msd_task(tmp_path / "other", n=1)
    meta = json.loads((task / "dataset.json").read_text())
    meta["training"][0][key] = entry
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=match) as e:
        import_msd(task, tmp_path / "out", ["2=metastasis"])
    assert "\n" not in str(e.value) and str(task) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_msd_truncated_image_fails_and_leaves_nothing(tmp_path: Path):
    task = make_msd_task(tmp_path, n=2)
    f = task / "imagesTr" / "liver_1.nii.gz"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(UserError, match="liver_1"):
        import_msd(task, tmp_path / "out", ["2=metastasis"])
    assert not (tmp_path / "out").exists()


def test_msd_label_on_another_grid_is_refused(tmp_path: Path):
    task = make_msd_task(tmp_path, n=1)
    vol, lab = _case(0)
    shifted = Volume(lab, SPACING, (-10.0, 25.0, 50.0))
    write_volume(shifted, task / "labelsTr" / "liver_0.nii.gz")
    with pytest.raises(UserError, match=r"label liver_0.nii.gz does not match .* origin"):
        import_msd(task, tmp_path / "out", ["2=metastasis"])


# ----------------------------------------------------------------------------- folder


def test_folder_nnunet_v2(tmp_path: Path):
    ds = make_nnunet_dataset(tmp_path)
    manifest = import_folder(ds, tmp_path / "out", ["tumor=metastasis"])
    df = pd.read_csv(manifest)
    assert list(df["patient_id"]) == ["liver_000", "liver_000", "liver_001", "liver_001"]
    assert Path(df["image"].iloc[0]).name == "liver_000_0000.nii.gz"
    assert len(lesion_table(manifest, progress=False)) == 4


def test_folder_pairs_values_checked_against_the_label_files(tmp_path: Path):
    folder = make_pairs(tmp_path)
    with pytest.raises(UserError) as e:
        import_folder(folder, tmp_path / "out", ["3=cyst"])
    msg = str(e.value)
    assert "label 3 is in no label file" in msg and "0 (in 2 files), 1 (in 2 files), 2 (in 2 files)" in msg
    assert not (tmp_path / "out").exists()
    manifest = import_folder(folder, tmp_path / "out", ["2=cyst"])
    assert list(pd.read_csv(manifest)["patient_id"]) == ["p0", "p0", "p1", "p1"]


def test_folder_unknown_label_in_nnunet_json(tmp_path: Path):
    ds = make_nnunet_dataset(tmp_path, n=1)
    with pytest.raises(UserError, match=r"label 5 is not in .*dataset.json .*0 background, 1 liver, 2 tumor"):
        import_folder(ds, tmp_path / "out", ["5=metastasis"])


def test_folder_wrong_layout_names_expected_and_missing(tmp_path: Path):
    task = make_msd_task(tmp_path, n=1)  # an MSD task works (imagesTr/labelsTr, v1 labels)
    assert len(pd.read_csv(import_folder(task, tmp_path / "o1", ["2=metastasis"]))) == 2
    empty = tmp_path / "nothing"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(UserError) as e:
        import_folder(empty, tmp_path / "out", ["2=metastasis"])
    msg = str(e.value)
    assert "nnU-Net v2 raw" in msg and "missing imagesTr/, labelsTr/" in msg and "(missing labels/)" in msg
    ircad = tmp_path / "3Dircadb1.1"
    (ircad / "PATIENT_DICOM").mkdir(parents=True)
    with pytest.raises(UserError, match="import ircadb"):
        import_folder(ircad, tmp_path / "out", ["2=metastasis"])
    (empty / "manifest.csv").write_text("patient_id,image,mask,label,lesion_class\n")  # a cohort of ours
    with pytest.raises(
        UserError, match=r"it holds a manifest.csv: pass .*manifest.csv to `liverlesion inspect`"
    ):
        import_folder(empty, tmp_path / "out", ["2=metastasis"])


def test_folder_unpaired_files_are_named(tmp_path: Path):
    folder = make_pairs(tmp_path)
    (folder / "labels" / "p1.nii.gz").unlink()
    with pytest.raises(UserError, match=r"no label for 1 image\(s\): p1"):
        import_folder(folder, tmp_path / "out", ["2=cyst"])
    folder2 = make_pairs(tmp_path / "b")
    (folder2 / "images" / "p0.nii.gz").rename(folder2 / "images" / "q0.nii.gz")
    with pytest.raises(UserError, match=r"no label for 1 image\(s\): q0"):
        import_folder(folder2, tmp_path / "out", ["2=cyst"])


def test_folder_image_as_label_is_refused(tmp_path: Path):
    """Wrong file in the wrong slot: a CT where the label map should be."""
    folder = make_pairs(tmp_path, n=1)
    write_volume(_case(0)[0], folder / "labels" / "p0.nii.gz")
    with pytest.raises(UserError, match="looks like a CT image"):
        import_folder(folder, tmp_path / "out", ["2=cyst"])


@pytest.mark.parametrize("kind", ["dicom folder", "zip"])
def test_folder_of_dicom_series_per_case_is_named(tmp_path: Path, kind: str):
    """images/ holding a DICOM folder or zip per case was 'no image files', with nothing on what it held."""
    folder = make_pairs(tmp_path, n=1)
    (folder / "images" / "p0.nii.gz").unlink()
    if kind == "zip":
        (folder / "images" / "p0.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    else:
        (folder / "images" / "p0").mkdir()
    with pytest.raises(UserError) as e:
        import_folder(folder, tmp_path / "out", ["2=cyst"])
    msg = str(e.value)
    assert f"it holds {'p0.zip' if kind == 'zip' else 'p0/'}" in msg and "dcm2niix" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_folder_label_map_as_image_is_refused(tmp_path: Path):
    """Wrong file in the wrong slot: a label map where the CT should be was imported (rc 0) as the CT."""
    folder = make_pairs(tmp_path, n=2)
    shutil.copy(folder / "labels" / "p1.nii.gz", folder / "images" / "p1.nii.gz")
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        import_folder(folder, out, ["2=cyst"])
    msg = str(e.value)
    assert "case p1 image" in msg and "as in a label mask" in msg and "\n" not in msg
    assert not out.exists()


@pytest.mark.parametrize("where", ["the task", "its parent"])
def test_msd_output_over_its_source_is_refused(tmp_path: Path, where: str):
    """Output replaces the whole folder: -o TASK --overwrite deleted imagesTr/ and labelsTr/ (exit 0)."""
    task = make_msd_task(tmp_path, n=1)
    out = task if where == "the task" else tmp_path
    with pytest.raises(UserError, match=r"(is|holds) the input source folder .*--overwrite would delete"):
        import_msd(task, out, ["2=metastasis"], overwrite=True)
    assert (task / "imagesTr" / "liver_0.nii.gz").is_file() and not (task / "manifest.csv").exists()


# ----------------------------------------------------------------------------- CLI


def test_cli_import_msd_and_folder(tmp_path: Path, capsys):
    task = make_msd_task(tmp_path, n=1)
    rc = main(["import", "msd", str(task), "--class-map", "2=metastasis", "-o", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "imported 1 of 1 case(s), 2 lesion(s) (2 metastasis" in out and "CC BY-SA 4.0" in out
    rc = main(["import", "msd", str(task), "--class-map", "7=metastasis", "-o", str(tmp_path / "o2")])
    _, err = capsys.readouterr()
    assert rc != 0 and err.count("\n") == 1 and "label 7 is not in" in err and "Traceback" not in err
    rc = main(["import", "msd", str(task), "--class-map", "2=metastasis", "-o", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert rc != 0 and "--overwrite" in err
    folder = make_pairs(tmp_path)
    rc = main(
        ["import", "folder", str(folder), "--class-map", "1=cyst,2=metastasis", "-o", str(tmp_path / "o3")]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "1 cyst" not in out  # each liver is one lesion: 2 cyst, 4 metastasis
    assert "(2 cyst, 4 metastasis;" in out


def test_no_lesion_of_the_mapped_labels_in_any_case_is_refused(tmp_path: Path):
    folder = tmp_path / "pairs"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    vol, lab = _case(0, tumours=0, speck=True)  # the liver and a one-voxel speck of tumour: no lesion
    _write(vol, lab, folder / "images" / "p0.nii.gz", folder / "labels" / "p0.nii.gz")
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        import_folder(folder, out, ["2=metastasis"])
    msg = str(e.value)
    assert msg.startswith(f"{folder}: no lesions found in 1 case (p0: label values [0, 1, 2], specks only)")
    assert "check --class-map (2 metastasis)" in msg and "\n" not in msg
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
