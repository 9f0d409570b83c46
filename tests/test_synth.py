"""Synthetic cohort generator: files, manifest, determinism, anatomy, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from liverlesion import DISCLAIMER
from liverlesion.errors import UserError
from liverlesion.synth import generate_cohort, mean_hu_separability, simulate_patient


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    summary = generate_cohort(out, patients=3, lesions=8, seed=1, workers=1)
    return out, summary


def test_files_and_manifest(cohort):
    out, summary = cohort
    man = pd.read_csv(out / "manifest.csv")
    assert list(man.columns) == ["patient_id", "image", "mask", "label", "lesion_class"]
    assert len(man) == 8 and man["patient_id"].nunique() == 3
    assert set(man["lesion_class"]) == {"metastasis", "cyst"}
    assert (man["lesion_class"] == "metastasis").sum() == round(0.6 * 8)
    for _pid, rows in man.groupby("patient_id"):
        assert not Path(rows["image"].iloc[0]).is_absolute()
        hu, img = _read(out / rows["image"].iloc[0])
        lab, msk = _read(out / rows["mask"].iloc[0])
        assert img.GetPixelID() == sitk.sitkInt16
        assert msk.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16)
        assert hu.shape == lab.shape
        assert np.allclose(img.GetSpacing(), msk.GetSpacing()) and np.allclose(
            img.GetOrigin(), msk.GetOrigin()
        )
        assert np.allclose(img.GetDirection(), np.eye(3).ravel())
        sx, sy, sz = img.GetSpacing()
        assert 0.6 < sx < 1.1 and sx == sy and 1.0 <= sz <= 5.0  # 384 matrix: near clinical pixels
        assert 40 <= hu.shape[0] <= 80
        # CT-like values: air outside, bone inside
        assert hu[:, 0, 0].mean() < -900 and hu.max() > 500
        # one label per lesion, labels 1..n as in the manifest
        assert sorted(np.unique(lab)[1:].tolist()) == sorted(rows["label"].tolist())
        assert sorted(rows["label"]) == list(range(1, len(rows) + 1))
    assert summary["lesions"] == 8 and summary["patients"] == 3
    saved = json.loads((out / "summary.json").read_text())
    assert saved["mean_hu_threshold"]["auc"] == summary["mean_hu_threshold"]["auc"]
    assert DISCLAIMER in saved["note"] and "SYNTHETIC" in saved["note"]
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())


def test_lesions_surrounded_by_liver_and_cysts_water(cohort):
    out, _ = cohort
    man = pd.read_csv(out / "manifest.csv")
    truth = pd.read_csv(out / "lesions_truth.csv")
    checked_cysts = 0
    for pid, rows in man.groupby("patient_id"):
        hu, _ = _read(out / f"images/{pid}.nii.gz")
        lab, _ = _read(out / f"masks/{pid}.nii.gz")
        for label, cls in zip(rows["label"], rows["lesion_class"], strict=True):
            m = lab == label
            # a shell 2-3 voxels out (in-plane) is liver parenchyma (portal-venous, ~100-120 HU)
            near = ndimage.binary_dilation(m, np.ones((1, 3, 3)), iterations=3)
            shell = near & ~ndimage.binary_dilation(m, np.ones((1, 3, 3)), iterations=1) & (lab == 0)
            assert 70 < np.median(hu[shell]) < 150, (pid, label)
            t = truth[(truth.patient_id == pid) & (truth.label == label)].iloc[0]
            assert t.lesion_class == cls
            core = ndimage.binary_erosion(m, np.ones((1, 3, 3)))
            if cls == "cyst" and not t.complicated and core.sum() >= 3:
                assert -15 < hu[core].mean() < 35, (pid, label, hu[core].mean())
                checked_cysts += 1
    assert checked_cysts >= 1


def test_simulated_lesions_inside_liver_and_labels():
    classes = ["metastasis", "cyst", "metastasis", "cyst", "metastasis"]
    pat = simulate_patient("t", classes, seed=[5, 0], difficulty=1.0)
    assert pat.hu.dtype == np.int16 and pat.labels.shape == pat.hu.shape == pat.liver.shape
    lesion_voxels = pat.labels > 0
    assert lesion_voxels.any() and pat.liver[lesion_voxels].all()
    assert [les.lesion_class for les in pat.lesions] == classes
    assert sorted(np.unique(pat.labels)[1:].tolist()) == [1, 2, 3, 4, 5]
    for les in pat.lesions:
        assert 2.0 <= les.diameter_mm <= 50.0
        assert pat.liver[tuple(np.round(_centre_index(pat, les.centre_mm)).astype(int))]


def _centre_index(pat, centre_xyz):
    """Lesion centre (phantom mm) -> (z, y, x) index via the written geometry."""
    sz, sy, sx = pat.spacing
    ox, oy, oz = pat.origin
    x, y, z = centre_xyz
    return ((z - oz) / sz, (y - oy) / sy, (x - ox) / sx)


def test_deterministic_for_seed(tmp_path, cohort):
    """Same seed, same cohort, whether one process or several simulate the patients."""
    out, _ = cohort
    again = tmp_path / "again"
    generate_cohort(again, patients=3, lesions=8, seed=1, workers=2)
    assert (again / "manifest.csv").read_text() == (out / "manifest.csv").read_text()
    for pid in pd.read_csv(out / "manifest.csv")["patient_id"].unique():
        for kind in ("images", "masks"):
            a, _ = _read(out / kind / f"{pid}.nii.gz")
            b, _ = _read(again / kind / f"{pid}.nii.gz")
            assert np.array_equal(a, b)
    other = simulate_patient("x", ["cyst"], seed=[2, 0])
    first = simulate_patient("x", ["cyst"], seed=[1, 0])
    assert first.hu.shape != other.hu.shape or not np.array_equal(first.hu, other.hu)


def test_overwrite_protection(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="not empty"):
        generate_cohort(out, patients=1, lesions=1)
    # --overwrite only replaces a folder that holds a synthetic cohort, never arbitrary user data
    with pytest.raises(UserError, match="summary.json"):
        generate_cohort(out, patients=1, lesions=1, overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"


def test_overwrite_replaces_cohort(tmp_path):
    out = tmp_path / "c"
    generate_cohort(out, patients=1, lesions=1, seed=3, matrix=128)
    generate_cohort(out, patients=1, lesions=2, seed=3, overwrite=True, matrix=128)
    assert len(pd.read_csv(out / "manifest.csv")) == 2


def test_crash_leaves_nothing(tmp_path, monkeypatch):
    import liverlesion.synth.cohort as synth_cohort

    calls = {"n": 0}
    real = synth_cohort.simulate_patient

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth_cohort, "simulate_patient", flaky)
    out = tmp_path / "c"
    with pytest.raises(RuntimeError):
        generate_cohort(out, patients=2, lesions=2, workers=1, matrix=128)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patients": 0}, "--patients"),
        ({"patients": 3, "lesions": 2}, "--lesions"),
        ({"patients": 1, "lesions": 40}, "--lesions"),
        ({"seed": -1}, "--seed"),
        ({"difficulty": 3.0}, "--difficulty"),
        ({"matrix": 10}, "--matrix"),
        ({"matrix": 5000}, "--matrix"),
        ({"workers": 0}, "--workers"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        generate_cohort(tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_a_cohort_larger_than_the_free_disk_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # a huge --patients allocated lesions for minutes without a line, then filled the disk for hours
    import shutil

    from liverlesion.cli import main

    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**5, 10**5)
    )
    args = ["synth", "-o", str(tmp_path / "c"), "--workers", "1"]
    assert main([*args, "--patients", "1", "--lesions", "1", "--matrix", "64"]) == 2  # 0.16 MB at least
    assert "--patients 1 at --matrix 64: the cohort needs at least 0.000164 GB" in capsys.readouterr().err
    rc = main([*args, "--patients", "100000000", "--lesions", "100000000"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert "--patients 100000000 at --matrix 384: the cohort needs at least 5.9e+05 GB but" in err
    assert "0.0001 GB free; use fewer --patients" in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    generate_cohort(tmp_path / "small", patients=1, lesions=1, matrix=64, workers=1)  # fits a real disk


def test_out_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        generate_cohort(f, patients=1, lesions=1)


def test_cli_error_is_one_line(tmp_path, capsys):
    from liverlesion.cli import main

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    assert main(["synth", str(tmp_path / "c"), "--patients", "1", "--lesions", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("liverlesion: error:") and "\n" not in err


def test_mean_hu_separability():
    hu = np.array([10.0, 20, 30, 60, 70, 80])
    met = np.array([0, 0, 0, 1, 1, 1], bool)
    s = mean_hu_separability(hu, met)
    assert s["auc"] == 1.0 and s["accuracy"] == 1.0 and 30 < s["threshold_hu"] < 60
    r = mean_hu_separability(hu, ~met)
    assert r["auc"] == 0.0 and r["accuracy"] == 0.5
    mixed = mean_hu_separability(np.array([10.0, 60, 20, 70]), np.array([0, 0, 1, 1], bool))
    assert 0.0 < mixed["auc"] < 1.0
    assert np.isnan(mean_hu_separability(hu, np.ones(6, bool))["auc"])


def test_difficulty_changes_overlap():
    """Harder cohorts have more necrotic metastases and complicated cysts, and noisier images."""
    easy = simulate_patient("e", ["metastasis"] * 3, seed=[7, 0], difficulty=0.0)
    hard = simulate_patient("h", ["metastasis"] * 3, seed=[7, 0], difficulty=2.0)
    assert hard.params["noise_sd"] > easy.params["noise_sd"]
    assert np.mean([les.design_hu for les in hard.lesions]) < np.mean([les.design_hu for les in easy.lesions])


@pytest.mark.slow
def test_default_cohort_not_separable_by_mean_hu(tmp_path):
    summary = generate_cohort(tmp_path / "c", seed=0)
    assert summary["lesions"] == 230 and summary["patients"] == 63
    auc = summary["mean_hu_threshold"]["auc"]
    assert 0.7 <= auc <= 0.92, auc
    assert summary["diameter_mm"]["fraction_under_10mm"] > 0.25


def test_ct_noise_has_a_band_pass_power_spectrum():
    """Filtered back-projection noise: no power at zero frequency, a peak near 0.3 lp/mm, the asked SD."""
    from liverlesion.synth import NPS_PEAK_LP_MM, ct_noise

    pixel = 0.8
    noise = ct_noise(np.random.default_rng(0), (8, 256, 256), pixel, 15.0)
    assert noise.dtype == np.float32 and abs(noise.std() - 15.0) < 0.1
    nps = (np.abs(np.fft.fft2(noise, axes=(1, 2))) ** 2).mean(0)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(256, pixel), np.fft.fftfreq(256, pixel), indexing="ij"))
    bins = np.digitize(f, np.linspace(0, f.max(), 40))
    radial = np.array([nps[bins == b].mean() for b in range(1, 40)])
    centres = np.linspace(0, f.max(), 40)[:-1] + f.max() / 80
    peak = centres[np.argmax(radial)]
    assert abs(peak - NPS_PEAK_LP_MM) < 0.08, peak
    assert radial[0] < 0.2 * radial.max()  # the ramp: nearly no power at the lowest frequencies
    # neighbouring pixels are anti-correlated or nearly independent, not blotchy (low-pass noise is > 0.5)
    r1 = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
    assert r1 < 0.5, r1


def test_matrix_sets_the_pixel_size():
    small = simulate_patient("m", ["cyst"], seed=[4, 0], matrix=128)
    big = simulate_patient("m", ["cyst"], seed=[4, 0], matrix=256)
    assert small.hu.shape[1:] == (128, 128) and big.hu.shape[1:] == (256, 256)
    assert small.spacing[1] == pytest.approx(2 * big.spacing[1], rel=1e-6)
