"""predict: the Classifier API and the `liverlesion predict` command on tiny synthetic CT.

Checkpoints are untrained (random init, timm's tiny ``test_resnet``): the plumbing,
not the accuracy, is under test, so every expected number is recomputed from the
models themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel  # noqa: F401  (imported at collection: its log handler must not bind to a test's captured stderr)
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import (
    BIG_CENTRE_ZYX,
    CLASSES,
    make_ct_array,
    make_ct_with_two_lesions,
    make_tiny_checkpoint,
    torch_threads,
    two_lesion_patients,
    write_dicom_series,
)
from liverlesion import DISCLAIMER
from liverlesion.cli import main
from liverlesion.errors import UserError
from liverlesion.io import read_volume, write_volume
from liverlesion.manifest import read_manifest
from liverlesion.predict import TOO_SMALL, Classifier, parse_point


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    return {
        "a": make_tiny_checkpoint(d / "a.pt", 0),
        "b": make_tiny_checkpoint(d / "b.pt", 1, temperature=2.0, threshold=0.4),
        "a_thr0": make_tiny_checkpoint(d / "a_thr0.pt", 0, threshold=0.0),
        "a_thr1": make_tiny_checkpoint(d / "a_thr1.pt", 0, threshold=1.0),
        "other_classes": make_tiny_checkpoint(d / "other_classes.pt", 0, classes=["cyst", "hemangioma"]),
        "other_patch": make_tiny_checkpoint(d / "other_patch.pt", 0, size_px=48),
    }


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("case")
    image, mask = make_ct_with_two_lesions()
    return {"image": write_volume(image, d / "ct.nii.gz"), "mask": write_volume(mask, d / "mask.nii.gz")}


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["predict", *[str(a) for a in args]])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _on_mask(models: list, c, mask=None) -> list:
    """Mask mode: ``--model M ... --image IMAGE --mask MASK`` (the case's image, and its mask by default)."""
    model_args = [a for m in models for a in ("--model", m)]
    return [*model_args, "--image", c["image"], "--mask", c["mask"] if mask is None else mask]


def _at_point(k, image, point: str = "0,0,0", diameter=10) -> list:
    """Click mode: ``--model A --image IMAGE --point POINT --diameter D``."""
    return ["--model", k["a"], "--image", image, "--point", point, "--diameter", diameter]


def _centre_lps(image_path: Path, zyx) -> tuple[float, float, float]:
    vol = read_volume(image_path)
    return tuple(float(v) for v in vol.index_to_physical(zyx))


# --------------------------------------------------------------------------- API and CLI


def test_cli_matches_python_api(ckpts, case, tmp_path, capsys):
    clf = Classifier.load(ckpts["a"])
    api = clf.predict(read_volume(case["image"]), mask=read_volume(case["mask"], kind="mask"))

    out = tmp_path / "out"
    rc, stdout, err = _run([*_on_mask([ckpts["a"]], case), "--out", out], capsys)
    assert rc == 0, err
    cli = pd.read_csv(out / "results.csv", keep_default_na=True)

    assert list(cli["lesion_id"]) == list(api["lesion_id"]) == ["case-L01", "case-L02"]
    for col in [
        "prob_cyst",
        "prob_metastasis",
        "uncertainty",
        "max_axial_diameter_mm",
        "volume_ml",
        "min_axis_mm",
    ]:
        np.testing.assert_allclose(
            cli[col].to_numpy(float), api[col].to_numpy(float), rtol=1e-9, equal_nan=True
        )
    assert list(cli["pred_class"]) == list(api["pred_class"])

    # The big lesion is classified, with the checkpoint's threshold; the ~4 mm one is flagged.
    big, small = api.iloc[0], api.iloc[1]
    assert big["min_axis_mm"] >= 5.0 > small["min_axis_mm"]
    assert big["prob_cyst"] + big["prob_metastasis"] == pytest.approx(1.0)
    assert big["pred_class"] == ("metastasis" if big["prob_metastasis"] >= 0.5 else "cyst")
    assert big["threshold"] == 0.5 and big["uncertainty"] == 0.0
    assert big["entropy_bits"] == pytest.approx(
        -sum(p * math.log2(p) for p in (big["prob_cyst"], big["prob_metastasis"]))
    )
    assert small["pred_class"] == TOO_SMALL and small["status"] == TOO_SMALL
    assert np.isnan(small["prob_cyst"]) and np.isnan(small["prob_metastasis"])
    assert big["max_axial_diameter_mm"] == pytest.approx(12.0, abs=1.5)

    info = json.loads((out / "results.json").read_text())
    assert info["disclaimer"] == DISCLAIMER
    assert info["models"][0]["sha256"] == api["checkpoint_sha256"].iloc[0]
    assert info["class_names"] == CLASSES and len(info["lesions"]) == 2
    assert info["lesions"][1]["prob_cyst"] is None  # NaN -> null
    assert info["inputs"]["image"] == str(case["image"])
    assert set(cli["disclaimer"]) == {DISCLAIMER}
    for lid in cli["lesion_id"]:
        png = out / "overlays" / f"{lid}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert DISCLAIMER in stdout and "case-L01" in stdout


def test_gradcam_attrs_from_api(ckpts, case):
    clf = Classifier.load(ckpts["a"])
    df = clf.predict(read_volume(case["image"]), mask=read_volume(case["mask"], kind="mask"), gradcam=True)
    cams = df.attrs["gradcam"]
    assert set(cams) == {"case-L01"}  # the too-small lesion gets no map
    cam = cams["case-L01"]
    assert cam.shape == (64, 64) and 0.0 <= cam.min() and cam.max() <= 1.0


def test_ensemble_mean_and_uncertainty(ckpts, case):
    image, mask = read_volume(case["image"]), read_volume(case["mask"], kind="mask")
    pa = Classifier.load(ckpts["a"]).predict(image, mask=mask)
    pb = Classifier.load(ckpts["b"]).predict(image, mask=mask)
    ens = Classifier.load([ckpts["a"], ckpts["b"]])
    pe = ens.predict(image, mask=mask)

    a, b, e = pa.iloc[0], pb.iloc[0], pe.iloc[0]
    assert a["prob_metastasis"] != pytest.approx(b["prob_metastasis"], abs=1e-6)  # members really differ
    for c in CLASSES:
        assert e[f"prob_{c}"] == pytest.approx((a[f"prob_{c}"] + b[f"prob_{c}"]) / 2)
    assert e["uncertainty"] == pytest.approx(abs(a["prob_metastasis"] - b["prob_metastasis"]) / 2)
    assert e["threshold"] == pytest.approx(0.45)  # mean of the members' thresholds
    assert e["pred_class"] == ("metastasis" if e["prob_metastasis"] >= 0.45 else "cyst")
    assert e["n_models"] == 2 and len(e["checkpoint_sha256"].split(";")) == 2
    parent = ckpts["a"].parent.name
    assert f"2 model(s): {parent}/a.pt, {parent}/b.pt;" in repr(ens)  # fold_0/model.pt, not model.pt twice
    # the printed table shows the ensemble's spread, and no "0.000" column for one model
    assert "ens_sd" in str(pe) and "ens_sd" not in str(pa) and "uncertainty" not in str(pa)


def test_temperature_and_threshold_are_applied(ckpts, case):
    from liverlesion.model import load_checkpoint
    from liverlesion.patches import extract_patch

    image, mask = read_volume(case["image"]), read_volume(case["mask"], kind="mask")
    clf = Classifier.load(ckpts["b"])  # temperature 2
    lesion_mask = mask.array == 1
    lesion_mask[:, :, 30:] = False  # only the big lesion
    patch = extract_patch(image, lesion_mask, clf.patch_config)
    model, _ = load_checkpoint(ckpts["b"])
    with torch.no_grad():
        logits = model(torch.from_numpy(patch.image))
    expected = torch.softmax(logits / 2.0, dim=1).mean(0).numpy()
    np.testing.assert_allclose(clf.predict_patch(patch.image), expected, rtol=1e-5)

    always = Classifier.load(ckpts["a_thr0"]).predict(image, mask=mask, min_size_mm=0)
    never = Classifier.load(ckpts["a_thr1"]).predict(image, mask=mask, min_size_mm=0)
    assert set(always["pred_class"]) == {"metastasis"}
    assert set(never["pred_class"]) == {"cyst"}


def test_classify_case_is_typed_and_is_what_predict_tabulates(ckpts, case):
    from liverlesion.classifier import Classifier as Home
    from liverlesion.results import CaseResult, LesionResult

    assert Classifier is Home  # the documented import path is the class itself
    clf = Classifier.load(ckpts["a"])
    image, mask = read_volume(case["image"]), read_volume(case["mask"], kind="mask")
    got = clf.classify_case(image, mask=mask, gradcam=True, image_ref="ct")
    assert isinstance(got, CaseResult) and got.image is image and got.image_ref == "ct"
    assert all(isinstance(r, LesionResult) for r in got.results)
    assert [r.lesion_id for r in got.results] == ["case-L01", "case-L02"]
    big, small = got.results
    assert big.pred_class in clf.class_names and big.cam.shape == (64, 64)
    assert small.pred_class == TOO_SMALL and small.cam is None  # not classified, nothing to explain
    assert set(got.masks) == {"case-L01", "case-L02"} and got.masks["case-L01"].shape == image.shape
    table = clf.predict(image, mask=mask)
    pd.testing.assert_frame_equal(
        pd.DataFrame(clf.results_frame(got.rows)).drop(columns="image"),
        pd.DataFrame(table).drop(columns="image"),
    )
    old = clf.predict_case(image, mask=mask)  # the name serve uses
    pd.testing.assert_frame_equal(
        pd.DataFrame(clf.results_frame(old.rows)), pd.DataFrame(clf.results_frame(got.rows)).assign(image="")
    )


@pytest.mark.parametrize(
    ("mode", "stacks", "shape"),
    [
        ("2d", 0, (3, 1, 64, 64)),  # 2-D mode: three slice samples of one channel
        ("2.5d", 1, (3, 3, 64, 64)),  # patch.stacks=1: three 2.5-D stacks of three slices
    ],
)
def test_samples_of_a_lesion_are_averaged(tmp_path, case, mode, stacks, shape):
    # the samples are cut with the checkpoint's patch settings, and predict averages their probabilities
    from liverlesion.model import load_checkpoint
    from liverlesion.patches import extract_patch

    path = make_tiny_checkpoint(tmp_path / "m.pt", 3, mode=mode, stacks=stacks, temperature=1.5)
    clf = Classifier.load(path)
    image, mask = read_volume(case["image"]), read_volume(case["mask"], kind="mask")
    df = clf.predict(image, mask=mask, gradcam=True)
    assert df["pred_class"].iloc[0] != TOO_SMALL and df.attrs["gradcam"]["case-L01"].shape == (64, 64)
    lesion_mask = mask.array == 1
    lesion_mask[:, :, 30:] = False
    patch = extract_patch(image, lesion_mask, clf.patch_config)
    assert patch.image.shape == shape
    model, _ = load_checkpoint(path)
    with torch.no_grad():
        per_sample = torch.softmax(model(torch.from_numpy(patch.image)) / 1.5, dim=1).numpy()
    assert not np.allclose(per_sample[0], per_sample[-1])  # the average is over really different samples
    assert df["prob_metastasis"].iloc[0] == pytest.approx(per_sample[:, 1].mean(), rel=1e-5)


def test_min_size_is_configurable(ckpts, case):
    clf = Classifier.load(ckpts["a"])
    df = clf.predict(read_volume(case["image"]), mask=read_volume(case["mask"], kind="mask"), min_size_mm=0)
    assert TOO_SMALL not in set(df["pred_class"])
    df = clf.predict(read_volume(case["image"]), mask=read_volume(case["mask"], kind="mask"), min_size_mm=50)
    assert set(df["pred_class"]) == {TOO_SMALL}


def test_point_mode_cli_and_api(ckpts, case, tmp_path, capsys):
    x, y, z = _centre_lps(case["image"], BIG_CENTRE_ZYX)
    out = tmp_path / "out"
    rc, printed, err = _run([*_at_point(ckpts, case["image"], f"{x},{y},{z}", 12), "--out", out], capsys)
    assert rc == 0, err
    cli = pd.read_csv(out / "results.csv")
    assert len(cli) == 1 and cli["source"].iloc[0] == "click"
    # the 12 mm lesion is grown from the click, and its sizes are marked as estimates
    assert cli["measurement"].iloc[0] == "estimated from click"
    assert "estimated from the click" in printed
    assert cli["volume_ml"].iloc[0] == pytest.approx(
        4 / 3 * np.pi * 6.0**3 / 1000, rel=0.2
    )  # the 6 mm radius sphere
    assert cli["centroid_x_mm"].iloc[0] == pytest.approx(x, abs=1.0)
    api = Classifier.load(ckpts["a"]).predict(read_volume(case["image"]), point=(x, y, z), diameter_mm=12)
    assert cli["prob_metastasis"].iloc[0] == pytest.approx(api["prob_metastasis"].iloc[0], rel=1e-9)
    assert (out / "overlays" / "case-L01.png").is_file()


def test_manifest_batch_mode(ckpts, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    centres = {}
    for i, pid in enumerate(["p1", "p2"]):
        image, mask = make_ct_with_two_lesions(seed=i)
        write_volume(image, data / f"{pid}.nii.gz")
        write_volume(mask, data / f"{pid}_mask.nii.gz")
        centres[pid] = image.index_to_physical(BIG_CENTRE_ZYX)
    rows.append("p1,p1.nii.gz,p1_mask.nii.gz,,metastasis,,,,")
    x, y, z = centres["p2"]
    rows.append(f"p2,p2.nii.gz,,,cyst,{x},{y},{z},12")
    manifest = data / "manifest.csv"
    manifest.write_text(
        "patient_id,image,mask,label,lesion_class,x_mm,y_mm,z_mm,diameter_mm\n" + "\n".join(rows) + "\n"
    )

    out = tmp_path / "out"
    rc, stdout, err = _run(["--model", ckpts["a"], "--manifest", manifest, "--out", out], capsys)
    assert rc == 0, err
    assert "warning" not in err  # every lesion_class is one of the model's
    df = pd.read_csv(out / "results.csv")
    assert list(df["lesion_id"]) == ["p1-L01", "p1-L02", "p2-L01"]
    assert list(df["true_class"]) == ["metastasis", "metastasis", "cyst"]
    assert list(df["source"]) == ["mask", "mask", "click"]
    assert df["pred_class"].iloc[1] == TOO_SMALL
    clf = Classifier.load(ckpts["a"])
    p2 = clf.predict(
        read_volume(data / "p2.nii.gz"), point=tuple(centres["p2"]), diameter_mm=12, patient_id="p2"
    )
    assert df["prob_metastasis"].iloc[2] == pytest.approx(p2["prob_metastasis"].iloc[0], rel=1e-9)
    # The manifest-level Python call: the CLI's table.
    api = clf.predict_manifest(manifest)
    assert list(api["lesion_id"]) == list(df["lesion_id"]) and list(api["true_class"]) == list(
        df["true_class"]
    )
    np.testing.assert_allclose(
        api["prob_metastasis"].to_numpy(float),
        df["prob_metastasis"].to_numpy(float),
        rtol=1e-9,
        equal_nan=True,
    )
    info = json.loads((out / "results.json").read_text())
    assert [s["n_lesions"] for s in info["sources"]] == [2, 1]
    # images as the manifest names them (relative), never the absolute path (folder names can be patient names)
    assert list(df["image"]) == ["p1.nii.gz", "p1.nii.gz", "p2.nii.gz"]
    assert [s["image"] for s in info["sources"]] == ["p1.nii.gz", "p2.nii.gz"]
    assert str(tmp_path) not in (out / "results.csv").read_text() + json.dumps(info["sources"])
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["p1-L01.png", "p1-L02.png", "p2-L01.png"]


def test_no_progress_bar_when_stderr_is_not_a_terminal(ckpts, case, tmp_path, monkeypatch, capsys):
    """The classifying bar was drawn into logs and pipes: its carriage returns then came before an
    error's one line (``classifying lesions: 0%| ... liverlesion: error: ...``)."""
    monkeypatch.delenv("LIVERLESION_PROGRESS", raising=False)
    rc, _, err = _run([*_on_mask([ckpts["a"]], case), "--out", tmp_path / "out", "--no-gradcam"], capsys)
    assert rc == 0, err
    assert "\r" not in err and "classifying lesions" not in err, err


def test_overwrite(ckpts, case, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    args = [*_on_mask([ckpts["a"]], case), "--out", out, "--no-gradcam"]
    rc, _, err = _run(args, capsys)
    assert rc == 2 and "--overwrite" in err and (out / "old.txt").exists()
    rc, _, err = _run([*args, "--overwrite"], capsys)
    assert rc == 0, err
    assert not (out / "old.txt").exists() and (out / "results.csv").is_file()


def test_parse_point():
    assert parse_point("1, -2.5,3e1") == (1.0, -2.5, 30.0)
    for bad in ["1,2", "1,2,3,4", "a,b,c", "1,,3", "1,2,nan"]:
        with pytest.raises(UserError, match="--point"):
            parse_point(bad)


# --------------------------------------------------------------------------- bad input: one line, nothing written


def _corrupt(tmp_path: Path, ckpts) -> Path:
    p = tmp_path / "corrupt.pt"
    p.write_bytes(ckpts["a"].read_bytes()[:5000])
    return p


def _newer(tmp_path: Path, ckpts) -> Path:
    obj = torch.load(ckpts["a"], map_location="cpu", weights_only=True)
    obj["format_version"] = 99
    p = tmp_path / "newer.pt"
    torch.save(obj, p)
    return p


def _png(tmp_path: Path, ckpts) -> Path:
    import matplotlib.image

    p = tmp_path / "slice.png"
    matplotlib.image.imsave(p, np.random.default_rng(0).random((32, 32)), cmap="gray")
    return p


def _nifti_pixdim(tmp_path: Path, value: float) -> Path:
    """A NIfTI whose stored z voxel size is ``value`` (patched in the raw header, as a broken writer would)."""
    import struct

    image, _ = make_ct_array()
    p = write_volume(image, tmp_path / f"pixdim_{value}.nii")
    raw = bytearray(p.read_bytes())
    raw[88:92] = struct.pack("<f", value)  # pixdim[3] (NIfTI-1: pixdim at byte 76, float32 x 8)
    p.write_bytes(bytes(raw))
    return p


def _no_hu(tmp_path: Path, ckpts) -> Path:
    image, _ = make_ct_array()
    image.array[:] = np.clip(image.array + 1024, 0, None)  # stored values without the rescale
    return write_volume(image, tmp_path / "raw.nii.gz")


def _label_mask(tmp_path: Path, ckpts) -> Path:
    _, mask = make_ct_with_two_lesions()
    return write_volume(mask, tmp_path / "labels.nii.gz")


def _normalised(tmp_path: Path, ckpts) -> Path:
    """z-scored intensities (a network's preprocessed input): negative values, but not HU."""
    image, _ = make_ct_array()
    a = image.array
    image.array[:] = (a - a.mean()) / a.std()
    return write_volume(image, tmp_path / "zscored.nii.gz")


def _rescaled(tmp_path: Path, ckpts) -> Path:
    """A broken scale factor (e.g. a NIfTI scl_slope of 1e6): negative values and a wide span, but not HU."""
    image, _ = make_ct_array()
    image.array[:] = image.array * 1e6
    return write_volume(image, tmp_path / "rescaled.nii.gz")


def _text_file(tmp_path: Path, ckpts) -> Path:
    p = tmp_path / "manifest.csv"
    p.write_text("patient_id,image,mask,lesion_class\np1,ct.nii.gz,mask.nii.gz,cyst\n")
    return p


def _dicom_zip(tmp_path: Path, ckpts) -> Path:
    import zipfile

    image, _ = make_ct_array()
    write_dicom_series(image, tmp_path / "series")
    p = tmp_path / "series.zip"
    with zipfile.ZipFile(p, "w") as zf:
        for f in sorted((tmp_path / "series").iterdir()):
            zf.write(f, f"series/{f.name}")
    return p


def _inverted(tmp_path: Path, ckpts) -> Path:
    """HU stored with a negative NIfTI scl_slope: air reads as +1000, tissue as -60 (passed the CT check)."""
    import nibabel as nib

    image, _ = make_ct_array()
    raw = np.round(image.array).astype(np.int16).transpose(2, 1, 0)  # nibabel: x, y, z
    img = nib.Nifti1Image(raw, np.diag([1.0, 1.0, 2.5, 1.0]))
    img.header.set_slope_inter(-1.0, 0.0)
    p = tmp_path / "inverted.nii.gz"
    nib.save(img, p)
    return p


def _mr_series(tmp_path: Path, ckpts) -> Path:
    image, _ = make_ct_array()
    write_dicom_series(image, tmp_path / "mr", modality="MR")
    return tmp_path / "mr"


def _mask_other_shape(tmp_path: Path, ckpts) -> Path:
    _, mask = make_ct_array(shape=(20, 48, 48))
    return write_volume(mask, tmp_path / "mask_shape.nii.gz")


def _mask_in_air(tmp_path: Path, ckpts) -> Path:
    """The case's mask with one more lesion, drawn outside the body (in air)."""
    _, mask = make_ct_with_two_lesions()
    arr = mask.array.copy()
    arr[10:13, 0:4, 0:4] = 1
    return write_volume(mask.with_array(arr), tmp_path / "mask_air.nii.gz")


def _mask_shifted(tmp_path: Path, ckpts) -> Path:
    _, mask = make_ct_array(origin=(-14.0, -24.0, 100.0))
    return write_volume(mask, tmp_path / "mask_shift.nii.gz")


BAD_CASES = {
    # name: (args builder, expected message fragment)
    "corrupt checkpoint": (lambda t, c, k: _on_mask([_corrupt(t, k)], c), "corrupt.pt"),
    "newer checkpoint": (lambda t, c, k: _on_mask([_newer(t, k)], c), "newer"),
    "missing checkpoint": (lambda t, c, k: _on_mask([t / "nope.pt"], c), "nope.pt"),
    # another input given as --model: 'corrupt ... copy it again' was the wrong advice
    "CT as --model": (
        lambda t, c, k: _on_mask([c["image"]], c),
        "ct.nii.gz: a NIfTI image, not the model.pt",
    ),
    "CSV as --model": (lambda t, c, k: _on_mask([_text_file(t, k)], c), "a text file (e.g. a CSV"),
    "DICOM zip as --model": (lambda t, c, k: _on_mask([_dicom_zip(t, k)], c), "a zip archive without"),
    "ensemble classes differ": (lambda t, c, k: _on_mask([k["a"], k["other_classes"]], c), "class names"),
    "ensemble patch differs": (lambda t, c, k: _on_mask([k["a"], k["other_patch"]], c), "size_px"),
    "2-D PNG": (lambda t, c, k: _at_point(k, _png(t, k)), "--image"),
    "zero spacing NIfTI": (lambda t, c, k: _at_point(k, _nifti_pixdim(t, 0.0)), "pixdim"),
    "negative spacing NIfTI": (lambda t, c, k: _at_point(k, _nifti_pixdim(t, -2.5)), "pixdim"),
    # a metre-scale header: lesion crops of millions of voxels ran out of memory after a long wait
    "sub-micron spacing NIfTI": (lambda t, c, k: _at_point(k, _nifti_pixdim(t, 1e-5)), "not a CT geometry"),
    "not HU": (lambda t, c, k: _at_point(k, _no_hu(t, k)), "HU"),
    # a label mask given as the image was only 'no negative values ... not CT in HU'
    "label mask as --image": (
        lambda t, c, k: ["--model", k["a"], "--image", _label_mask(t, k), "--mask", c["mask"]],
        "as in a label mask (were the image and the mask swapped?)",
    ),
    "normalised, not HU": (lambda t, c, k: _at_point(k, _normalised(t, k)), "values span only"),
    "wrong scale, not HU": (lambda t, c, k: _at_point(k, _rescaled(t, k)), "values beyond +-100000"),
    "inverted HU (negative scl_slope)": (lambda t, c, k: _at_point(k, _inverted(t, k)), "look inverted"),
    "MR series": (lambda t, c, k: _at_point(k, _mr_series(t, k)), "MR"),
    "mask shape": (lambda t, c, k: _on_mask([k["a"]], c, _mask_other_shape(t, k)), "shape"),
    "mask origin": (lambda t, c, k: _on_mask([k["a"]], c, _mask_shifted(t, k)), "origin"),
    "mask lesion in air": (lambda t, c, k: _on_mask([k["a"]], c, _mask_in_air(t, k)), "lies in air"),
    "point outside": (lambda t, c, k: _at_point(k, c["image"], "500,0,100"), "outside the image"),
    # row 0, column 0 of the middle slice: outside the body ellipse
    "point in air": (lambda t, c, k: _at_point(k, c["image"], "-24,-24,128.75"), "in air"),
    "point not numbers": (lambda t, c, k: _at_point(k, c["image"], "a,b,c"), "--point"),
    "point two values": (lambda t, c, k: _at_point(k, c["image"], "1,2"), "--point"),
    "point without diameter": (
        lambda t, c, k: ["--model", k["a"], "--image", c["image"], "--point", "1,2,3"],
        "--diameter",
    ),
    "bad diameter": (lambda t, c, k: _at_point(k, c["image"], "1,2,3", -4), "--diameter"),
    "no lesion source": (lambda t, c, k: ["--model", k["a"], "--image", c["image"]], "exactly one"),
    "mask and point": (
        lambda t, c, k: [*_on_mask([k["a"]], c), "--point", "1,2,3", "--diameter", 5],
        "exactly one",
    ),
    "mask without image": (lambda t, c, k: ["--model", k["a"], "--mask", c["mask"]], "--image"),
    "manifest with image": (
        lambda t, c, k: ["--model", k["a"], "--manifest", c["mask"], "--image", c["image"]],
        "--manifest",
    ),
    "label without mask": (
        lambda t, c, k: [*_at_point(k, c["image"], "1,2,3", 5), "--label", 2],
        "--label",
    ),
    "label not in mask": (lambda t, c, k: [*_on_mask([k["a"]], c), "--label", 7], "label 7"),
    "dicom-sr on NIfTI": (
        lambda t, c, k: [*_on_mask([k["a"]], c), "--dicom-sr"],
        "--dicom-sr needs a DICOM --image",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_input_is_one_line_and_writes_nothing(name, ckpts, case, tmp_path, capsys):
    build, fragment = BAD_CASES[name]
    work = tmp_path / "inputs"
    work.mkdir()
    out = tmp_path / "out"
    rc, stdout, err = _run([*build(work, case, ckpts), "--out", out, "--no-gradcam"], capsys)
    assert rc == 2, (stdout, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("liverlesion: error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folder left


@pytest.mark.parametrize("held", ["--image", "--mask", "--model"])
def test_out_holding_an_input_is_refused_and_the_input_kept(held, ckpts, case, tmp_path, capsys):
    """The results replace the whole --out folder: with --overwrite, a CT, mask or checkpoint inside it was
    deleted (and without it, the message advised --overwrite)."""
    import shutil

    out = tmp_path / "study"
    out.mkdir()
    inputs = {"--image": case["image"], "--mask": case["mask"], "--model": ckpts["a"]}
    inputs[held] = Path(shutil.copy(inputs[held], out))
    for extra in ([], ["--overwrite"]):
        args = ["--model", inputs["--model"], "--image", inputs["--image"], "--mask", inputs["--mask"]]
        rc, _, err = _run([*args, "--out", out, "--no-gradcam", *extra], capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert f"--out {out}: holds the input {held} {inputs[held]}" in lines[0]
        assert sorted(p.name for p in out.iterdir()) == [inputs[held].name]


def test_predict_leaves_no_torchinductor_folder_in_tmpdir(ckpts, case, tmp_path):
    """timm -> torchvision -> torch._dynamo makes TMPDIR/torchinductor_<user> on import; not ours."""
    import os
    import subprocess
    import sys

    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(TMPDIR=str(tmp), OMP_NUM_THREADS="1")
    args = ["predict", "--model", str(ckpts["a"]), "--image", str(case["image"]), "--mask", str(case["mask"])]
    r = subprocess.run(
        [sys.executable, "-m", "liverlesion", *args, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "results.csv").exists()
    assert sorted(p.name for p in tmp.iterdir()) == []
    # the cause is real: the same import without liverlesion does make the folder
    r = subprocess.run([sys.executable, "-c", "import timm"], env=env, timeout=300)
    assert r.returncode == 0 and any(p.name.startswith("torchinductor_") for p in tmp.iterdir())


def test_manifest_class_the_model_does_not_know_is_named_before_classifying(ckpts, tmp_path, capsys):
    image, mask = make_ct_with_two_lesions()
    write_volume(image, tmp_path / "p1.nii.gz")
    write_volume(mask, tmp_path / "p1_mask.nii.gz")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,image,mask,lesion_class\np1,p1.nii.gz,p1_mask.nii.gz,metastases\n")
    rc, _, err = _run(["--model", ckpts["a"], "--manifest", manifest, "--out", tmp_path / "out"], capsys)
    assert rc == 0, err  # classified anyway: the label is not needed to classify
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "'metastases' (1 row)" in warning[0] and "cyst, metastasis" in warning[0]
    assert list(pd.read_csv(tmp_path / "out" / "results.csv")["true_class"]) == ["metastases"] * 2


def test_manifest_holds_one_image_at_a_time(ckpts, tmp_path, capsys, monkeypatch):
    """Every input is checked before any lesion is classified, yet no image is kept for the next one's sake:
    a manifest of hundreds of CTs would not fit in memory."""
    import gc
    import weakref

    import liverlesion.manifest_lesions as ml
    import liverlesion.predict as pr

    manifest = two_lesion_patients(tmp_path, 3, classes=False)
    images: list = []
    real_read, real_write = ml.read_volume, pr._write_case_files

    def reading(path, *args, kind="image", **kwargs):
        vol = real_read(path, *args, kind=kind, **kwargs)
        if kind == "image":
            images.append(weakref.ref(vol))
        return vol

    alive_at_write: list[int] = []

    def writing(case, *args, **kwargs):
        gc.collect()
        alive_at_write.append(sum(r() is not None for r in images))
        return real_write(case, *args, **kwargs)

    monkeypatch.setattr(ml, "read_volume", reading)
    monkeypatch.setattr(pr, "_write_case_files", writing)
    rc, _, err = _run(["--model", ckpts["a"], "--manifest", manifest, "--out", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert len(images) == 6  # each image read twice: once to check every input, once to classify it
    assert alive_at_write == [1, 1, 1]  # only the image being written out
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 6


@pytest.mark.parametrize("header", ["patient_id,image,mask", "patient_id,image,mask,lesion_class"])
def test_manifest_of_new_cases_without_a_diagnosis_is_classified(ckpts, tmp_path, capsys, header):
    image, mask = make_ct_with_two_lesions()
    write_volume(image, tmp_path / "p1.nii.gz")
    write_volume(mask, tmp_path / "p1_mask.nii.gz")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"{header}\np1,p1.nii.gz,p1_mask.nii.gz{',' if 'class' in header else ''}\n")
    out = tmp_path / "out"
    rc, _, err = _run(["--model", ckpts["a"], "--manifest", manifest, "--out", out], capsys)
    assert rc == 0 and "warning" not in err, err
    df = pd.read_csv(out / "results.csv")
    assert list(df["lesion_id"]) == ["p1-L01", "p1-L02"] and "true_class" not in df.columns
    # nothing to score against: evaluate says so in one line
    assert main(["evaluate", str(out)]) != 0
    assert "no true_class column" in capsys.readouterr().err
    # training still needs every lesion's class
    with pytest.raises(UserError, match="missing required column|lesion_class is empty"):
        read_manifest(manifest)


@pytest.mark.parametrize("bad", ["mask geometry", "not HU", "truncated image"])
def test_manifest_checks_every_input_before_classifying_any(bad, ckpts, tmp_path, capsys, monkeypatch):
    """Each image was checked only when its turn came: a bad last row failed after the rows before
    it were classified (minutes of work on a real batch). Every input is now read and checked first."""
    import gzip

    from liverlesion.classifier import Classifier

    image, mask = make_ct_with_two_lesions()
    write_volume(image, tmp_path / "p1.nii.gz")
    write_volume(mask, tmp_path / "p1_mask.nii.gz")
    if bad == "mask geometry":
        write_volume(image, tmp_path / "p2.nii.gz")
        write_volume(make_ct_array(origin=(-14.0, -24.0, 100.0))[1], tmp_path / "p2_mask.nii.gz")
    elif bad == "not HU":
        write_volume(image.with_array(image.array + 1024), tmp_path / "p2.nii.gz")
        write_volume(mask, tmp_path / "p2_mask.nii.gz")
    else:
        data = write_volume(image, tmp_path / "p2.nii").read_bytes()
        (tmp_path / "p2.nii.gz").write_bytes(gzip.compress(data[: len(data) // 2]))
        (tmp_path / "p2.nii").unlink()
        write_volume(mask, tmp_path / "p2_mask.nii.gz")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "patient_id,image,mask,lesion_class\n"
        "p1,p1.nii.gz,p1_mask.nii.gz,cyst\n"
        "p2,p2.nii.gz,p2_mask.nii.gz,cyst\n"
    )
    classified = []
    real = Classifier._classify
    monkeypatch.setattr(
        Classifier, "_classify", lambda self, *a, **k: classified.append(a[0]) or real(self, *a, **k)
    )
    out = tmp_path / "out"
    rc, _, err = _run(["--model", ckpts["a"], "--manifest", manifest, "--out", out, "--no-gradcam"], capsys)
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("liverlesion: error:")]
    assert len(lines) == 1 and "manifest row 2" in lines[0], err
    assert classified == []  # nothing classified before the bad row was found
    assert not out.exists()


@pytest.mark.parametrize("n_models", [1, 2])
def test_overlay_title_names_the_spread_only_for_an_ensemble(ckpts, case, tmp_path, monkeypatch, n_models):
    from matplotlib.figure import Figure

    from liverlesion.overlay import draw_lesion_overlay

    titles: list[str] = []
    real = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: (titles.append(t), real(self, t, **kw))[1])
    clf = Classifier.load([ckpts["a"], ckpts["b"]][:n_models])
    image, mask = read_volume(case["image"]), read_volume(case["mask"], kind="mask")
    result = clf.classify_case(image, mask=mask).results[0]
    draw_lesion_overlay(result, image, tmp_path / "o.png", clf.class_names)
    assert (tmp_path / "o.png").is_file()
    # one model has no spread: "uncertainty 0.00" read as certain next to P 0.53 / 0.47
    want = (
        "one model (no ensemble spread)" if n_models == 1 else f"ensemble SD {result.row['uncertainty']:.2f}"
    )
    assert want in titles[0] and "uncertainty" not in titles[0]
    # the colours are explained on the PNG itself, beside the disclaimer
    from liverlesion.overlay import OVERLAY_CAPTION, overlay_key

    texts: list[str] = []
    real_text = Figure.text
    monkeypatch.setattr(
        Figure, "text", lambda self, x, y, t, **kw: (texts.append(t), real_text(self, x, y, t, **kw))[1]
    )
    draw_lesion_overlay(result, image, tmp_path / "o3.png", clf.class_names)
    assert overlay_key(result.cam is not None) in texts and OVERLAY_CAPTION in texts
    assert "cyan outline: lesion mask" in overlay_key(False) and "Grad-CAM" in overlay_key(True)
    from matplotlib.axes import Axes

    axes_titles: list[str] = []
    real_title = Axes.set_title
    monkeypatch.setattr(
        Axes, "set_title", lambda self, t, **kw: (axes_titles.append(t), real_title(self, t, **kw))[1]
    )
    draw_lesion_overlay(result, image, tmp_path / "o2.png", clf.class_names)
    # slices numbered from 1, as PACS viewers and the browser viewer number them (centre_slice counts from 0)
    z = int(result.row["centre_slice"])
    assert axes_titles[0].startswith(f"axial slice {z + 1} of {image.shape[0]} ")
