"""Bad inputs are refused up front: one line, non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import make_ct_array, one_lesion_patients
from liverlesion.cli import main
from liverlesion.errors import UserError
from liverlesion.io import read_volume, write_volume
from liverlesion.volume import Volume


def cli_fails(capsys, args, *names) -> str:
    """Run the CLI; assert it failed with a short, traceback-free message naming ``names``."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc != 0, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, err
    for n in names:
        assert str(n) in err, (n, err)
    return err


def empty_or_missing(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def write_manifest(path: Path, header: str, *rows: str) -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------- 1. diameters


@pytest.mark.parametrize("diameter", ["10000", "nan", "inf", "-3", "0"])
def test_predict_refuses_bad_diameter_before_loading_models(tmp_path, capsys, tiny_nifti, diameter):
    image, _ = tiny_nifti
    out = tmp_path / "out"
    err = cli_fails(
        capsys,
        ["predict", "--model", tmp_path / "missing.ckpt", "--out", out, "--image", image]
        + ["--point", "0,0,130", f"--diameter={diameter}"],
        "--diameter",
    )
    assert "missing.ckpt" not in err  # refused before the checkpoint is even looked at
    assert empty_or_missing(out)


def test_a_point_split_at_negative_numbers_says_how_to_write_it(tmp_path, capsys, tiny_nifti):
    """LPS x is negative on the patient's right: ``--point -69 -18 36`` made click report "no such
    option '-1'"; it now says what the token is and how to write a point."""
    image, _ = tiny_nifti
    out = tmp_path / "out"
    args = ["predict", "--model", tmp_path / "m.pt", "--image", image, "-o", out, "--diameter", "10"]
    err = cli_fails(
        capsys, [*args, "--point", "-69.2", "-18.3", "36.3"], "'-18.3'", "--point=-69.2,-18.3,36.3"
    )
    assert "No such option" not in err and empty_or_missing(out)
    err = cli_fails(
        capsys, [*args, "--point", "12", "18", "36"], "--point 12 18 36", "--point=-69.2,-18.3,36.3"
    )
    assert "unexpected extra" not in err
    err = cli_fails(capsys, [*args, "--no-such-flag"], "--no-such-flag")  # a real unknown option stays so
    assert "No such option" in err


def test_inspect_refuses_huge_click_diameter_in_manifest(tmp_path, capsys, tiny_nifti):
    m = write_manifest(
        tmp_path / "m.csv",
        "patient_id,image,lesion_class,x_mm,y_mm,z_mm,diameter_mm",
        "p1,image.nii.gz,cyst,0,0,130,10000",
    )
    cli_fails(capsys, ["inspect", m, "--out", tmp_path / "t.csv"], "diameter_mm", "10000", "m.csv")
    assert not (tmp_path / "t.csv").exists()


def test_click_diameter_larger_than_image_is_refused(tiny_ct):
    from liverlesion.click import lesion_from_click

    image, _ = tiny_ct
    with pytest.raises(UserError, match=r"point diameter 250 mm: larger than the image"):
        lesion_from_click(image, image.index_to_physical(np.array([11.5, 23.5, 23.5])), 250.0)


def test_large_click_near_edge_builds_only_inside_image(tiny_ct):
    from liverlesion.click import lesion_from_click

    image, _ = tiny_ct
    lesion, mask = lesion_from_click(image, image.index_to_physical(np.array([11.5, 23.5, 23.5])), 40.0)
    assert mask.shape == image.shape and lesion.n_voxels == int(mask.sum()) > 0


# --------------------------------------------------------------------------- 2. output paths


def test_patches_out_existing_file_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    cli_fails(capsys, ["patches", tmp_path / "m.csv", out], str(out), "exists as a file")
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize(
    "args",
    [
        ["synth", "{out}"],
        ["patches", "m.csv", "{out}"],
        ["train", "m.csv", "{out}"],
        ["cv", "m.csv", "{out}"],
        ["baselines", "m.csv", "{out}"],
        ["demo", "{out}"],
        ["import", "ircadb", "src", "{out}"],
        ["predict", "--model", "x.ckpt", "--out", "{out}", "--manifest", "m.csv"],
    ],
)
def test_output_folder_that_is_a_file_is_refused(tmp_path, capsys, args):
    out = tmp_path / "taken"
    out.write_text("x")
    cli_fails(capsys, [a.format(out=out) for a in args], str(out), "exists as a file")
    under = tmp_path / "taken" / "sub"
    cli_fails(capsys, [a.format(out=under) for a in args], "exists as a file")


def test_demo_bad_setting_is_refused_before_any_work(tmp_path, capsys):
    old = tmp_path / "demo"
    old.mkdir()
    (old / "keep.txt").write_text("x")
    cli_fails(capsys, ["demo", "-o", old, "--overwrite", "--set", "train.epochz=3"], "epochz", "unknown")
    cli_fails(capsys, ["demo", "-o", tmp_path / "new", "--set", "train.epochs=0"], "train.epochs")
    # settings only the run checks: refused before the cohort is generated (was after step 1)
    cli_fails(
        capsys, ["demo", "-o", tmp_path / "new", "--set", "cv.folds=100"], "cv.folds=100", "63 patients"
    )
    cli_fails(
        capsys, ["demo", "-o", tmp_path / "new", "--weights", tmp_path / "nope.pth"], "nope.pth", "not found"
    )
    cli_fails(capsys, ["demo", "-o", tmp_path / "new", "--set", "model.features_from=Mixed_1"], "Mixed_1")
    # a folder holding other files is not filled with a demo (it was, beside keep.txt)
    cli_fails(capsys, ["demo", "-o", old], "not a demo's", "--overwrite")
    assert (old / "keep.txt").read_text() == "x" and sorted(p.name for p in old.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "new").exists()


def test_output_file_that_is_a_folder_is_refused(tmp_path, capsys):
    (tmp_path / "dir.csv").mkdir()
    cli_fails(capsys, ["inspect", tmp_path / "m.csv", "--out", tmp_path / "dir.csv"], "dir.csv", "folder")
    cli_fails(
        capsys, ["export", "--model", "x.ckpt", "--format", "onnx", tmp_path / "dir.csv"], "dir.csv", "folder"
    )


# --------------------------------------------------------------------------- 3. zip entry names


@pytest.mark.parametrize(
    "bad", ["../evil.dcm", "/abs/evil.dcm", "C:/evil.dcm", "a/../../evil.dcm", "..\\evil.dcm"]
)
def test_zip_with_escaping_entry_is_refused(tmp_path, tiny_dicom_dir, bad):
    z = tmp_path / "series.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(tiny_dicom_dir.iterdir()):
            zf.write(f, f"series/{f.name}")
        zf.writestr(bad, b"x")
    with pytest.raises(UserError, match="refusing to read the archive") as e:
        read_volume(z, name="--image")
    assert repr(bad) in str(e.value) and "series.zip" in str(e.value)
    assert not (tmp_path / "evil.dcm").exists()


def test_inspect_refuses_escaping_zip(tmp_path, capsys, tiny_dicom_dir, tiny_ct):
    z = tmp_path / "series.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(tiny_dicom_dir.iterdir()):
            zf.write(f, f.name)
        zf.writestr("../outside.dcm", b"x")
    write_volume(tiny_ct[1], tmp_path / "mask.nii.gz")
    m = write_manifest(
        tmp_path / "m.csv", "patient_id,image,lesion_class,mask", "p1,series.zip,cyst,mask.nii.gz"
    )
    cli_fails(capsys, ["inspect", m], "series.zip", "../outside.dcm")


def test_ircadb_zip_with_escaping_entry_is_refused(tmp_path):
    from liverlesion.datasets.ircadb_layout import index_zip

    z = tmp_path / "PATIENT_DICOM.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("PATIENT_DICOM/image_0", b"x")
        zf.writestr("PATIENT_DICOM/../../x", b"x")
    with pytest.raises(UserError, match=r"PATIENT_DICOM/\.\./\.\./x"):
        index_zip(z, "PATIENT_DICOM")


def _zip_with_damaged_data(src: Path, dest: Path, arcdir: str) -> Path:
    """A deflated zip of ``src``'s files whose first entry's compressed data starts with an invalid
    deflate block (0xFF: a reserved block type), as a bit error in a download would leave it."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f"{arcdir}/{f.name}")
    data = bytearray(dest.read_bytes())
    start = 30 + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little")
    data[start : start + 8] = b"\xff" * 8
    dest.write_bytes(bytes(data))
    return dest


def test_zip_with_damaged_compressed_data_is_one_line(tmp_path, capsys, tiny_dicom_dir, tiny_ct):
    """Damaged deflate data raised zlib.error, which no reader caught: a traceback, not a message."""
    from liverlesion.datasets.ircadb_layout import index_zip

    z = _zip_with_damaged_data(tiny_dicom_dir, tmp_path / "series.zip", "dicom")
    with pytest.raises(UserError, match=r"series\.zip is not a readable zip file \(Error -3"):
        read_volume(z, name="--image")
    write_volume(tiny_ct[1], tmp_path / "mask.nii.gz")
    m = write_manifest(
        tmp_path / "m.csv", "patient_id,image,lesion_class,mask", "p1,series.zip,cyst,mask.nii.gz"
    )
    cli_fails(capsys, ["inspect", m], "series.zip", "not a readable zip file")
    z = _zip_with_damaged_data(tiny_dicom_dir, tmp_path / "PATIENT_DICOM.zip", "PATIENT_DICOM")
    part = index_zip(z, "PATIENT_DICOM")
    with pytest.raises(UserError, match=r"PATIENT_DICOM\.zip: cannot extract .*Error -3.*re-download"):
        part.folder(next(iter(part.groups)), tmp_path)


def test_good_zip_still_reads_and_leaves_no_temp(tmp_path, tiny_dicom_dir, monkeypatch):
    import tempfile

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    z = tmp_path / "series.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(tiny_dicom_dir.iterdir()):
            zf.write(f, f"series/{f.name}")
    vol = read_volume(z)
    assert vol.shape == (24, 48, 48)
    assert list(tmpdir.iterdir()) == []


# --------------------------------------------------------------------------- 4. implausible masks


def _inspect_with_mask(tmp_path, capsys, mask_array, *names):
    image, mask = make_ct_array()
    write_volume(image, tmp_path / "image.nii.gz")
    write_volume(mask.with_array(mask_array), tmp_path / "mask.nii.gz")
    m = write_manifest(
        tmp_path / "m.csv", "patient_id,image,lesion_class,mask", "p1,image.nii.gz,cyst,mask.nii.gz"
    )
    out = tmp_path / "t.csv"
    err = cli_fails(capsys, ["inspect", m, "--out", out], "row 1 mask", *names)
    assert not out.exists()
    return err


def test_mask_of_ones_is_refused(tmp_path, capsys):
    _inspect_with_mask(tmp_path, capsys, np.ones((24, 48, 48), np.uint8), "all six faces")


def test_mask_covering_most_of_the_body_is_refused(tmp_path, capsys):
    image, _ = make_ct_array()
    body = (image.array > -500).astype(np.uint8)
    body[0] = body[-1] = 0  # not touching every face
    _inspect_with_mask(tmp_path, capsys, body, "of the body")


def test_ct_passed_as_mask_is_refused(tmp_path, capsys):
    image, _ = make_ct_array()
    _inspect_with_mask(tmp_path, capsys, image.array, "negative values")


def test_non_integer_mask_is_refused(tmp_path, capsys):
    _, mask = make_ct_array()
    _inspect_with_mask(tmp_path, capsys, mask.array.astype(np.float32) * 0.5, "non-integer")


def test_mask_with_too_many_components_is_refused(tmp_path, capsys):
    arr = np.zeros((24, 48, 48), np.uint8)
    arr[2:22:2, 6:42:2, 6:42:2] = 1  # 10 x 18 x 18 isolated voxels
    _inspect_with_mask(tmp_path, capsys, arr, "connected components")


def test_mask_lesion_in_air_is_refused_and_a_speck_is_left_to_the_size_rule(tmp_path, capsys):
    """A mask lesion lying wholly in air (mean -1000 HU: the mask of another image, or flipped) was
    measured and classified like any lesion (cv trained on it, predict gave it a class)."""
    from liverlesion.lesions import lesions_from_mask

    image, mask = make_ct_array()
    arr = mask.array.copy()
    arr[10:13, 0:4, 0:4] = 1  # 48 voxels in the air outside the body ellipse
    err = _inspect_with_mask(
        tmp_path, capsys, arr, "lesion p1-L01 (component 1 of 2, 48 voxels", "lies in air"
    )
    assert "HU" in err and "give the mask drawn on this image" in err
    labels = mask.array.copy()
    labels[10:13, 0:4, 0:4] = 3
    with pytest.raises(UserError, match=r"lesion p1-L03 \(label 3, 48 voxels .* lies in air"):
        lesions_from_mask(image, mask.with_array(labels), patient_id="p1", mask_name="mask")
    speck = mask.array.copy()
    speck[11, 0, 0] = 1  # one voxel: kept, and too small to characterise by the size rule
    items = lesions_from_mask(image, mask.with_array(speck), patient_id="p1")
    assert len(items) == 2 and min(les.min_axis_mm for les, _ in items) < 5.0


def test_manifest_image_not_in_hu_is_refused_like_predict_refuses_it(tmp_path, capsys):
    """inspect / patches / cv read a manifest's images without predict's CT check: stored values without
    the rescale (no negative HU) were cut into patches and trained on."""
    image, mask = make_ct_array()
    write_volume(image.with_array(image.array + 1024), tmp_path / "raw.nii.gz")
    write_volume(mask, tmp_path / "mask.nii.gz")
    m = write_manifest(
        tmp_path / "m.csv", "patient_id,image,lesion_class,mask", "p1,raw.nii.gz,cyst,mask.nii.gz"
    )
    out = tmp_path / "t.csv"
    cli_fails(capsys, ["inspect", m, "--out", out], "manifest row 1 image 'raw.nii.gz'", "not CT in HU")
    assert not out.exists()


def _real_ct_volumes(ircad: Path | None):
    """Real CT in HU: pydicom's CT_small.dcm (one slice, stacked to a volume) and, where present,
    3D-IRCADb-01 patient 1."""
    import pydicom
    from pydicom.data import get_testdata_file

    from liverlesion.volume import Volume

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    arr = np.repeat(hu[None].astype(np.float32), 4, axis=0)
    yield "CT_small.dcm", Volume(arr, (5.0, *map(float, ds.PixelSpacing)), (0.0, 0.0, 0.0), np.eye(3), {})
    if ircad is not None:
        yield "3D-IRCADb 1", read_volume(ircad / "PATIENT_DICOM")


@pytest.mark.parametrize("real", ["CT_small", "ircadb"])
def test_inverted_intensities_are_refused_and_real_ct_is_not(real, request):
    """A negative rescale slope (NIfTI scl_slope < 0) makes air +1000 HU and tissue -60: it has negative
    values and a wide span, so it passed the CT check and was classified; real CT must still pass."""
    from liverlesion.case_input import check_ct_volume

    ircad = request.getfixturevalue("ircad_patient1") if real == "ircadb" else None
    vols = list(_real_ct_volumes(ircad))
    name, vol = vols[-1]
    check_ct_volume(vol, name)  # real CT is accepted
    with pytest.raises(UserError, match=r"look inverted.*negative") as exc:
        check_ct_volume(vol.with_array(-vol.array), name)
    assert "\n" not in str(exc.value)
    image, _ = make_ct_array()  # the synthetic CT of the other tests too
    check_ct_volume(image)
    with pytest.raises(UserError, match="look inverted"):
        check_ct_volume(image.with_array(-image.array))


@pytest.mark.parametrize("real", ["synthetic", "ircadb"])
def test_inverted_crop_without_air_is_refused_and_the_real_crop_is_not(real, request):
    """A tight crop around a lesion holds no air, so the air rule cannot see its inversion; its median can
    (the liver around the lesion is above 0 HU, inverted below -40)."""
    from liverlesion.case_input import check_ct_volume

    if real == "ircadb":
        vol = read_volume(request.getfixturevalue("ircad_patient1") / "PATIENT_DICOM")
        crop = vol.array[82:92, 183:263, 121:201]  # inside the liver of patient 1 (its liver mask), no air
    else:
        vol, _ = make_ct_array(noise_hu=20.0)  # a scanner's noise: a crop of 5 HU noise spans under 100 HU
        crop = vol.array[6:18, 16:32, 16:32]  # the body's soft tissue and the lesion, no air
    assert (crop < -500).mean() < 0.01
    tight = Volume(np.ascontiguousarray(crop), vol.spacing, (0.0, 0.0, 0.0), np.eye(3), {})
    check_ct_volume(tight, "crop")  # real tissue is accepted
    with pytest.raises(UserError, match=r"crop: a crop with no air whose median is -\d.*inverted") as exc:
        check_ct_volume(tight.with_array(-tight.array), "crop")
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------- 5. truncated / non-NIfTI files


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused(tmp_path, capsys, tiny_ct, suffix):
    image, mask = tiny_ct
    path = write_volume(image, tmp_path / f"image{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match="truncated") as e:
        read_volume(path, name="--image")
    assert f"image{suffix}" in str(e.value)
    write_volume(mask, tmp_path / "mask.nii.gz")
    m = write_manifest(
        tmp_path / "m.csv", "patient_id,image,lesion_class,mask", f"p1,image{suffix},cyst,mask.nii.gz"
    )
    cli_fails(capsys, ["inspect", m], "truncated", f"image{suffix}")


def test_damaged_nifti_gz_is_refused(tmp_path):
    """Bytes changed inside a .nii.gz whose stream still inflates: ITK reads garbage; the CRC catches it.

    Noise makes the deflate stream mostly literals, so the damage changes voxels, not the codes,
    and only gzip's CRC-32 at the end of the stream can tell.
    """
    import SimpleITK as sitk

    noise = np.random.default_rng(0).normal(0, 100, (40, 64, 64)).astype(np.int16)
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(noise), str(path), True)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).shape == noise.shape  # ITK reads it
    with pytest.raises(UserError, match="corrupt") as e:
        read_volume(path, name="--image")
    assert "image.nii.gz" in str(e.value) and "CRC" in str(e.value)


@pytest.mark.parametrize(
    "written, named, expected",
    [
        ("image.nii.gz", "image.nii", "is gzip-compressed but named .nii; rename it to image.nii.gz"),
        (
            "image.nii",
            "image.nii.gz",
            "is an uncompressed NIfTI image named .nii.gz; rename it to image.nii ",
        ),
    ],
)
def test_nifti_named_with_the_wrong_compression_says_to_rename_it(
    tmp_path, tiny_ct, written, named, expected
):
    # was "not a NIfTI image (no NIfTI-1/2 header found; a corrupt download ...): copy the file again"
    image, _ = tiny_ct
    write_volume(image, tmp_path / "w" / written).rename(tmp_path / named)
    with pytest.raises(UserError, match=expected.replace(".", r"\.")):
        read_volume(tmp_path / named, name="--image")


def test_random_bytes_named_nifti_is_refused(tmp_path):
    path = tmp_path / "x.nii"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(UserError, match="not a NIfTI image"):
        read_volume(path, name="--image")


# --------------------------------------------------------------------------- 6. folds vs patients


def test_cv_too_many_folds_is_refused_before_any_work(tmp_path, capsys):
    m = one_lesion_patients(tmp_path, 3)
    out = tmp_path / "run"
    before = set(tmp_path.iterdir())
    cli_fails(capsys, ["cv", m, out, "--folds", "7"], "--folds=7", "3 patients", "at most 3")
    assert set(tmp_path.iterdir()) == before  # no run folder, no patch cache
    cli_fails(capsys, ["cv", m, out, "--folds", "1"], "folds=1")  # the config check names cv.folds


def test_train_with_too_few_patients_for_its_inner_split_is_refused_before_any_work(tmp_path, capsys):
    # was refused after cutting every patch, as "cv.folds=5: ... use at most 4 folds" (train has no folds),
    # leaving the run folder with config.yaml and the patch cache behind
    m = one_lesion_patients(tmp_path, 4)
    out = tmp_path / "run"
    before = set(tmp_path.iterdir())
    args = ["train", m, "-o", out, "--preset", "quick", "--weights", "none", "--threads", "1"]
    cli_fails(capsys, args, "4 patient(s)", "train.val_fraction=0.2", "--set train.val_fraction=0.5")
    assert set(tmp_path.iterdir()) == before  # no run folder, no patch cache
    (tmp_path / "two").mkdir()
    m2 = one_lesion_patients(tmp_path / "two", 2)
    cli_fails(capsys, ["train", m2, *args[2:]], "2 patient(s)", "add patients (at least 3")
    assert set(tmp_path.iterdir()) == before | {tmp_path / "two"}


def test_train_single_with_too_few_patients_names_its_inner_split_before_any_work(tmp_path):
    # the Python API was refused after cutting every patch, as "cv.folds=5: ... use at most 4 folds"
    from liverlesion.config import load_config
    from liverlesion.cv import train_single

    m = one_lesion_patients(tmp_path, 4)
    before = set(tmp_path.iterdir())
    with pytest.raises(UserError) as e:
        train_single(m, tmp_path / "run", load_config(preset="quick", overrides=["model.weights=none"]))
    msg = str(e.value)
    assert msg.startswith(f"manifest {m}: 4 patient(s)") and "cv.folds" not in msg, msg
    assert "train.val_fraction=0.2" in msg and "--set train.val_fraction=0.5" in msg, msg
    assert set(tmp_path.iterdir()) == before  # no run folder, no patch cache


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("command", ["cv", "train"])
@pytest.mark.parametrize(
    "setting, expected",
    [
        (["--backbone", "inceptoin_v3"], ["inceptoin_v3", "not a timm model", "inception_v3"]),
        (["--set", "model.features_from=Mixed_99"], ["Mixed_99", "not a stage", "Mixed_6e"]),
        (["--weights", "missing.pth"], ["missing.pth", "file not found"]),
        (["--weights", "m.csv"], ["m.csv", "a text file", "not a checkpoint or state_dict"]),
        # was a torch RuntimeError traceback in the first fold ("Output size is too small")
        (["--set", "patch.size_px=20"], ["patch.size_px=20", "too small for inception_v3", "at least 43 px"]),
        # was Lightning's traceback when the first fold's trainer started
        pytest.param(
            ["--device", "cuda"],
            ["train.accelerator=gpu (--device cuda)", "no CUDA device", "--device cpu"],
            marks=pytest.mark.skipif(_has_cuda(), reason="a CUDA device is present here"),
        ),
    ],
)
def test_network_settings_are_refused_before_any_work(tmp_path, capsys, command, setting, expected):
    # a misspelt backbone or stage, or unusable weights, used to fail only after the run folder,
    # the patch cache and (fusion) the radiomics features were made
    m = one_lesion_patients(tmp_path, 4)
    setting = [str(tmp_path / a) if a.endswith((".pth", ".csv")) else a for a in setting]
    before = set(tmp_path.iterdir())
    extra = ["--folds", "2"] if command == "cv" else ["--set", "train.val_fraction=0.5"]
    cli_fails(capsys, [command, m, "-o", tmp_path / "run", *extra, *setting], *expected)
    assert set(tmp_path.iterdir()) == before  # no run folder, no patch cache


def test_a_fold_whose_training_patients_hold_one_class_is_refused_before_any_work(tmp_path, capsys):
    """4 patients in 2 folds leave 1 training patient per fold once inner validation is held out; here
    one with metastases only: a one-class training set, which failed in the first fold with
    scikit-learn's traceback (the 8-lesion cohort of `liverlesion synth --patients 4 --lesions 8`)."""
    classes = [["metastasis"] * 2, ["cyst", "cyst", "metastasis"], ["metastasis"], ["metastasis", "cyst"]]
    rows = []
    for i, lesions in enumerate(classes):
        image, mask = make_ct_array(seed=i)
        write_volume(image, tmp_path / f"ct{i}.nii.gz")
        for j, c in enumerate(lesions):  # one row per lesion (mask and label): the folds follow from the rows
            write_volume(mask, tmp_path / f"mask{i}_{j}.nii.gz")
            rows.append(f"p{i},ct{i}.nii.gz,{c},mask{i}_{j}.nii.gz,1")
    m = write_manifest(tmp_path / "m.csv", "patient_id,image,lesion_class,mask,label", *rows)
    before = set(tmp_path.iterdir())
    cli_fails(
        capsys,
        ["cv", m, "-o", tmp_path / "run", "--folds", "2"],
        "cv.folds=2: fold 0's training patients (1,",
        "one class only",
        "use fewer folds or add patients",
    )
    assert set(tmp_path.iterdir()) == before  # no run folder, no patch cache


@pytest.mark.parametrize("command", ["cv", "baselines"])
def test_a_positive_class_the_manifest_lacks_is_refused_before_any_work(tmp_path, capsys, command):
    """It failed only at evaluation, after every fold had trained (e.g. classes benign/malignant and the
    default eval.positive_class=metastasis)."""
    m = one_lesion_patients(tmp_path, 6)
    before = set(tmp_path.iterdir())
    args = [command, m, "-o", tmp_path / "run", "--set", "cv.folds=2", "--set", "eval.positive_class=hcc"]
    cli_fails(
        capsys, args, "eval.positive_class='hcc'", "not among the manifest's classes (cyst, metastasis)"
    )
    assert set(tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["cv", "baselines"])
def test_a_size_rule_that_leaves_no_lesion_is_refused_before_training(tmp_path, capsys, command):
    """Every lesion under eval.min_size_mm: it failed after training with 'network: no rows'."""
    m = one_lesion_patients(tmp_path, 6)
    args = [command, m, "-o", tmp_path / "run", "--set", "cv.folds=2", "--set", "eval.min_size_mm=500"]
    cli_fails(capsys, args, "eval.min_size_mm=500: all 6 lesions are smaller", "lower eval.min_size_mm")
    assert not any((tmp_path / "run").rglob("fold_*")) and not any(
        (tmp_path / "run").rglob("predictions.csv")
    )
    if command == "cv":  # the run folder it had made is removed: the next run needs no --resume
        assert not (tmp_path / "run").exists()


def test_baselines_settings_are_refused_before_any_work(tmp_path, capsys):
    m = one_lesion_patients(tmp_path, 4)
    before = set(tmp_path.iterdir())
    for setting, expected in (
        ("cv.folds=9", ["cv.folds=9", "4 patients"]),
        ("model.features_from=Mixed_99", ["Mixed_99", "not a stage"]),  # frozen_lr's network
        ("model.backbone=inceptoin_v3", ["inceptoin_v3", "not a timm model"]),
    ):
        args = ["baselines", m, "-o", tmp_path / "run", "--set", setting]
        cli_fails(capsys, [*args, *([] if setting.startswith("cv.") else ["--set", "cv.folds=2"])], *expected)
        assert set(tmp_path.iterdir()) == before  # no output folder, no patch cache, no splits


def test_run_cv_from_python_checks_folds_before_any_work(tmp_path):
    """The library path validates as the CLI does: no run folder, no patch cache."""
    from liverlesion.config import load_config
    from liverlesion.cv import run_cv

    m = one_lesion_patients(tmp_path, 8)  # 4 per class
    before = set(tmp_path.iterdir())
    for folds, msg in ((9, "at most 8 folds"), (5, "at most 4 folds")):
        cfg = load_config(overrides={"cv": {"folds": folds}})
        with pytest.raises(UserError, match=f"cv.folds={folds}: .*{msg}"):
            run_cv(m, tmp_path / "run", cfg, baselines=False, evaluate=False)
        assert set(tmp_path.iterdir()) == before


def test_check_folds_limits():
    from liverlesion.splits import check_folds

    check_folds(3, 3)
    check_folds(63, 5)
    with pytest.raises(UserError, match="at most 3"):
        check_folds(3, 4)
    with pytest.raises(UserError, match="at least 3"):
        check_folds(2, 2)


# --------------------------------------------------------------------------- 7. --dicom-sr on NIfTI


def test_dicom_sr_on_nifti_is_refused_before_loading_models(tmp_path, capsys, tiny_nifti):
    image, mask = tiny_nifti
    out = tmp_path / "out"
    err = cli_fails(
        capsys,
        ["predict", "--model", tmp_path / "missing.ckpt", "--out", out, "--image", image, "--mask", mask]
        + ["--dicom-sr"],
        "--dicom-sr",
        "image.nii.gz",
    )
    assert "missing.ckpt" not in err
    m = write_manifest(
        tmp_path / "m.csv", "patient_id,image,lesion_class,mask", "p1,image.nii.gz,cyst,mask.nii.gz"
    )
    cli_fails(
        capsys,
        ["predict", "--model", tmp_path / "missing.ckpt", "--out", out, "--manifest", m, "--dicom-sr"],
        "row 1 image",
        "image.nii.gz",
    )
    assert empty_or_missing(out)


# --------------------------------------------------------------------------- 9. progress bars only on a TTY


def test_no_progress_bars_when_stderr_is_not_a_tty(tmp_path, capsys, tiny_nifti, monkeypatch):
    import io as stdio

    from liverlesion.progress import progress_disabled

    monkeypatch.delenv("LIVERLESION_PROGRESS", raising=False)
    m = write_manifest(
        tmp_path / "m.csv", "patient_id,image,lesion_class,mask", "p1,image.nii.gz,cyst,mask.nii.gz"
    )
    assert main(["inspect", str(m)]) == 0
    assert "\r" not in capsys.readouterr().err
    assert progress_disabled(stdio.StringIO())

    class Tty(stdio.StringIO):
        def isatty(self):
            return True

    assert not progress_disabled(Tty())
    monkeypatch.setenv("LIVERLESION_PROGRESS", "0")
    assert progress_disabled(Tty())


def test_a_stage_line_in_a_log_counts_its_items_in_plain_words(capsys, monkeypatch):
    from liverlesion.progress import progress_bar

    monkeypatch.setenv("LIVERLESION_PROGRESS", "0")
    assert list(progress_bar(range(30), "radiomics features", unit="lesion")) == list(range(30))
    assert list(progress_bar([7], "caching", unit="lesion")) == [7]
    assert capsys.readouterr().err.splitlines() == [
        "radiomics features (30 lesions) ...",
        "caching (1 lesion) ...",
    ]


# --------------------------------------------------------------------------- wrong file in the wrong slot


def test_image_given_as_its_own_mask_is_refused(tmp_path, capsys, tiny_nifti):
    image, _ = tiny_nifti
    m = write_manifest(
        tmp_path / "m.csv", "patient_id,image,lesion_class,mask", "p1,image.nii.gz,cyst,image.nii.gz"
    )
    cli_fails(capsys, ["inspect", m], "row 1", "is the image itself")
    out = tmp_path / "out"
    cli_fails(
        capsys,
        ["predict", "--model", tmp_path / "x.ckpt", "--out", out, "--image", image, "--mask", image],
        "--mask",
        "image.nii.gz",
    )
    assert empty_or_missing(out)


# --------------------------------------------------------------------------- size: headers claiming huge volumes


def test_nifti_header_claiming_a_huge_volume_is_refused(tmp_path, capsys):
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    path = tmp_path / "huge.nii"
    nib.save(img, path)
    data = bytearray(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(open(path, "rb"))
    hdr.set_data_shape((4000, 4000, 4000))
    data[:348] = hdr.binaryblock
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="voxels") as e:
        read_volume(path, name="--image")
    assert "huge.nii" in str(e.value)


def test_memory_error_is_one_line(monkeypatch, capsys):
    import liverlesion.cli as cli

    def boom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(cli, "app", boom)
    assert cli.main(["inspect", "x"]) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("ENOSPC", "no space left on the disk: /out/run/fold_0/model.pt"),
        ("EROFS", "/out/run/fold_0/model.pt"),
    ],
)
def test_a_full_or_read_only_disk_is_one_line(monkeypatch, capsys, code, expected):
    import errno
    import os

    import liverlesion.cli as cli

    def boom(*a, **k):
        n = getattr(errno, code)
        raise OSError(n, os.strerror(n), "/out/run/fold_0/model.pt")

    monkeypatch.setattr(cli, "app", boom)
    assert cli.main(["cv", "m.csv", "-o", "/out/run"]) == 1
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_disk_that_fills_mid_run_leaves_nothing_half_written(monkeypatch, capsys, tmp_path):
    import errno
    import os

    import liverlesion.synth.cohort as cohort
    from liverlesion.cli import main

    real, calls = cohort._write_nifti, []

    def fills_up(array, spacing, origin, path):
        calls.append(path)
        if len(calls) == 3:  # the second patient's image: the first one is already on disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(array, spacing, origin, path)

    monkeypatch.setattr(cohort, "_write_nifti", fills_up)
    rc = main(["synth", "-o", str(tmp_path / "out"), "--patients", "3", "--lesions", "6", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and len(calls) == 3
    assert "no space left on the disk" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # neither the output folder nor its temporary one


def test_other_os_errors_are_not_disguised(monkeypatch):
    import liverlesion.cli as cli

    def boom(*a, **k):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(ConnectionResetError):
        cli.main(["serve"])


def test_subprocess_errors_are_one_line(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    out.write_text("x")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for args in (
        ["patches", str(tmp_path / "m.csv"), str(out)],
        ["predict", "--model", "m.pt", "--out", str(tmp_path / "o"), "--image", "x.nii.gz"]
        + ["--point", "0,0,0", "--diameter", "10000"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "liverlesion", *args], capture_output=True, text=True, env=env
        )
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": "ct.nii.gz", "point": "1,2,3", "label": 2}, "--label 2: selects a lesion in --mask"),
        ({"manifest": "m.csv", "label": 2}, "--label 2: selects a lesion in --mask"),
        ({"image": "ct.nii.gz", "point": "1,2,3"}, "--point 1,2,3: also give --diameter MM"),
        (
            {"image": "ct.nii.gz", "mask": "m.nii.gz", "diameter": 12.0},
            "--diameter 12.0: only used with --point",
        ),
        ({"manifest": "m.csv", "diameter": 12.0}, "--diameter 12.0: only used with --point"),
    ],
)
def test_predict_lesion_source_rule_messages(tmp_path, kwargs, message):
    """predict_cli applies lesions.lesion_source_problem and keeps its own option-named messages."""
    from liverlesion.predict import predict_cli

    with pytest.raises(UserError) as e:
        predict_cli([tmp_path / "model.pt"], tmp_path / "out", **kwargs)
    assert str(e.value).startswith(message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["run.json", "results.json", "metrics.json"])
def test_result_json_that_is_not_text_is_one_line(tmp_path, capsys, which):
    """A run.json / results.json / metrics.json holding binary bytes (a damaged copy, another file under
    its name) raised UnicodeDecodeError, which only JSONDecodeError was caught for: a traceback."""
    d = tmp_path / "folder"
    d.mkdir()
    (d / which).write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    if which == "run.json":  # evaluate of a cv run folder
        (d / "predictions.csv").write_text(
            "patient_id,lesion_id,true_class,prob_cyst,prob_metastasis,fold\np1,p1-L01,cyst,0.7,0.3,0\n"
        )
        args = ["evaluate", d]
    elif which == "results.json":  # evaluate of a predict output folder
        (d / "results.csv").write_text(
            "lesion_id,patient_id,true_class,pred_class,prob_cyst,prob_metastasis,checkpoint_sha256\n"
            "p1-L01,p1,cyst,cyst,0.8,0.2,abc\n"
        )
        args = ["evaluate", d]
    else:
        args = ["report", d]
    cli_fails(capsys, args, which, "not valid JSON")


# --------------------------------------------------------------------------- resuming a run folder


def _run_folder(path: Path, kind: str = "cv", preset: str = "quick") -> Path:
    """A run folder as an interrupted run leaves it: its settings and run.json."""
    import json

    from liverlesion import runs
    from liverlesion.config import load_config

    path.mkdir(parents=True)
    load_config(preset=preset).save(runs.config_path(path))
    runs.run_info_path(path).write_text(json.dumps({"kind": kind}))
    return path


def test_resume_with_other_settings_is_refused_before_any_work(tmp_path, capsys):
    # the finished folds were trained with the run's settings: resuming with others mixed two models in
    # one run, and the new settings silently replaced config.yaml
    from liverlesion import runs

    m = one_lesion_patients(tmp_path, 10)
    run = _run_folder(tmp_path / "run")
    saved = runs.config_path(run).read_text()
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  epochs: 5\n")
    for extra, shown in (
        (["--set", "train.epochs=3"], "train.epochs 40 -> 3"),
        (["--epochs", "3"], "train.epochs 40 -> 3"),
        (["--preset", "paper"], "patch.size_px 160 -> 299"),
        (["--config", other], "patch.size_px 160 -> 224"),  # a config on the defaults, not on quick
    ):
        err = cli_fails(capsys, ["cv", m, "-o", run, "--resume", *extra], "resuming with settings other")
        assert shown in err and "mix two models" in err, err
    assert runs.config_path(run).read_text() == saved
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "run.json"]  # no patches cut


def test_resume_keeps_the_runs_own_settings_and_may_change_only_how_it_runs(tmp_path, capsys):
    from liverlesion import runs
    from liverlesion.cli_common import config_from
    from liverlesion.config import load_config, load_run_config, setting_differences
    from liverlesion.run_checks import check_resume

    run = _run_folder(tmp_path / "run")
    cfg = config_from(
        None, None, None, resume_run=run, **{"train.max_threads": 1, "train.accelerator": "cpu"}
    )
    assert "the run's own settings" in capsys.readouterr().err
    assert setting_differences(load_run_config(runs.config_path(run)), cfg) == []
    assert cfg.patch.size_px == 160 and cfg.train.max_threads == 1  # quick's, not the defaults
    check_resume(run, cfg, "cv")  # threads and device may change
    check_resume(run, load_config(preset="quick", overrides=["eval.n_bootstrap=50"]), "cv")
    with pytest.raises(UserError, match=r"train.batch_size 32 -> 8"):
        check_resume(run, load_config(preset="quick", overrides=["train.batch_size=8"]), "cv")
    with pytest.raises(UserError, match=r"new: nothing to resume \(no run folder there\); drop --resume"):
        check_resume(tmp_path / "new", load_config(), "cv")  # a mistyped folder is not a new run


@pytest.mark.parametrize("kind", ["cv", "train"])
@pytest.mark.parametrize("made", [False, True])
def test_resume_where_there_is_no_run_is_refused_before_any_work(tmp_path, capsys, kind, made):
    # a missing (mistyped) or empty folder silently started a new run, exit 0: the user believed they resumed
    m = one_lesion_patients(tmp_path, 6)
    run = tmp_path / "run"
    if made:
        run.mkdir()
    before = set(tmp_path.iterdir())
    args = [kind, m, "-o", run, "--resume", "--preset", "quick", "--weights", "none", "--threads", "1"]
    extra = ["--folds", "2"] if kind == "cv" else ["--set", "train.val_fraction=0.5"]
    err = cli_fails(capsys, [*args, *extra], f"{run}: nothing to resume (no run folder there)")
    assert "drop --resume to start a new run, or give the run folder to continue" in err
    assert set(tmp_path.iterdir()) == before and empty_or_missing(run)  # no patch cache, no config.yaml


def test_demo_resumes_its_own_run_and_starts_anew_in_an_empty_one(tmp_path, monkeypatch):
    from liverlesion import demo, synth

    resumed = []

    def stop(manifest, run, cfg, resume, **kw):
        resumed.append(resume)
        raise UserError("stop")

    monkeypatch.setattr(synth, "generate_cohort", lambda *a, **kw: None)
    monkeypatch.setattr(demo, "run_cv", stop)
    out = tmp_path / "demo"
    (out / "cv").mkdir(parents=True)  # an empty cv/: nothing to resume, no refusal
    with pytest.raises(UserError, match="stop"):
        demo.run_demo(out)
    _run_folder(tmp_path / "other" / "cv")
    with pytest.raises(UserError, match="stop"):
        demo.run_demo(tmp_path / "other")  # its own run folder: resumed
    assert resumed == [False, True]


@pytest.mark.parametrize("made_by,resumed_as", [("cv", "train"), ("train", "cv")])
def test_resuming_a_run_folder_of_the_other_kind_is_refused(tmp_path, capsys, made_by, resumed_as):
    # `train --resume` on a cv run folder read its splits.json as a train split: KeyError 'train_patients'
    m = one_lesion_patients(tmp_path, 10)
    run = _run_folder(tmp_path / "run", kind=made_by)
    cli_fails(
        capsys,
        [resumed_as, m, "-o", run, "--resume"],
        f"a `liverlesion {made_by}` run folder",
        f"resume it with `liverlesion {made_by} ... --resume`",
    )


@pytest.mark.parametrize(
    "text", ["{not json", '{"splits": []}', '{"train_patients": [], "val_patients": ["p"]}']
)
def test_a_damaged_train_split_is_named(tmp_path, text):
    from liverlesion.cv import _read_train_split

    path = tmp_path / "splits.json"
    path.write_text(text)
    with pytest.raises(UserError, match=r"splits.json: .*delete it and run again to draw the split anew"):
        _read_train_split(path)


def test_demo_rerun_with_other_settings_is_refused_before_generating(tmp_path, capsys):
    out = tmp_path / "demo"
    _run_folder(out / "cv")
    cli_fails(capsys, ["demo", "-o", out, "--set", "train.epochs=3"], "train.epochs 40 -> 3", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["cv"]  # no cohort generated


@pytest.mark.parametrize("kind", ["cv", "train"])
def test_resume_with_a_manifest_of_other_patients_is_refused_before_any_patch(tmp_path, capsys, kind):
    # the patients were compared only after every patch was cut, in the splits reader
    import json

    from liverlesion import runs

    m = one_lesion_patients(tmp_path, 10)
    run = _run_folder(tmp_path / "run", kind=kind)
    patients = [f"p{i}" for i in range(9)] + ["q9"]  # the run's: one differs from the manifest's
    split = (
        {
            "splits": [
                {
                    "fold": 0,
                    "train_patients": patients[2:],
                    "val_patients": patients[1:2],
                    "test_patients": patients,
                }
            ]
        }
        if kind == "cv"
        else {"group": "patient_id", "train_patients": patients[1:], "val_patients": patients[:1]}
    )
    runs.splits_path(run).write_text(json.dumps(split))
    cli_fails(
        capsys,
        [kind, m, "-o", run, "--resume", "--preset", "quick"],
        "splits.json is of 10 patients, this manifest of 10 (2 in only one of them, e.g. p9, q9)",
        "resume with the manifest the run was started with",
    )
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "run.json", "splits.json"]
