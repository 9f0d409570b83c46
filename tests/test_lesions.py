"""Tests for lesions.py: lesion measurements, masks vs clicks, manifest iteration and `inspect`."""

from __future__ import annotations

import logging
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from liverlesion.click import lesion_from_click
from liverlesion.errors import UserError
from liverlesion.inspection import print_lesion_table, summarize_lesions
from liverlesion.lesion_measure import max_axial_diameter_mm, min_axis_mm
from liverlesion.lesions import (
    LESION_COLUMNS,
    Lesion,
    foreground_box,
    lesions_from_mask,
)
from liverlesion.manifest_lesions import iter_manifest_lesions, lesion_table
from liverlesion.volume import Volume

IRCAD_PATIENT1 = Path(__file__).resolve().parents[2] / "shared/data/3Dircadb1/3Dircadb1.1"


def ellipsoid(shape, spacing, centre_idx, semi_axes_mm) -> np.ndarray:
    """Voxels whose centre lies inside an axis-aligned ellipsoid (semi-axes z, y, x in mm)."""
    z, y, x = np.indices(shape, dtype=float)
    d = sum(
        (((g - c) * s) / a) ** 2
        for g, c, s, a in zip((z, y, x), centre_idx, spacing, semi_axes_mm, strict=True)
    )
    return d <= 1.0


def body_volume(shape, spacing, origin=(-20.0, 15.0, -100.0), tissue=60.0) -> Volume:
    """Soft tissue filling the volume except a 2-voxel band of air along the x edges."""
    arr = np.full(shape, tissue, dtype=np.float32)
    arr[:, :, :2] = -1000.0
    arr[:, :, -2:] = -1000.0
    return Volume(arr, spacing, origin)


def with_lesion(image: Volume, mask: np.ndarray, hu: float = 10.0) -> Volume:
    arr = image.array.copy()
    arr[mask] = hu
    return image.with_array(arr)


def write_nifti(volume: Volume, path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path))
    return path


# --------------------------------------------------------------------------- measurements


@pytest.mark.parametrize(
    "spacing",
    [(1.0, 1.0, 1.0), (3.0, 0.7, 0.9)],  # isotropic; thick slices with unequal in-plane pixels
)
def test_sphere_measurements_match_geometry(spacing):
    shape = (24, 60, 50)
    centre = (11.3, 29.6, 24.2)
    radius = 9.0
    sphere = ellipsoid(shape, spacing, centre, (radius,) * 3)
    image = with_lesion(body_volume(shape, spacing), sphere, hu=12.0)
    ((lesion, mask),) = lesions_from_mask(
        image, image.with_array(sphere.astype(np.uint8)), None, "P7", "cyst"
    )

    assert mask.shape == image.shape and mask.dtype == bool
    np.testing.assert_array_equal(mask, sphere)
    true_ml = 4 / 3 * math.pi * radius**3 / 1000
    assert lesion.volume_ml == pytest.approx(true_ml, rel=0.04)
    assert lesion.n_voxels == int(sphere.sum())
    # Feret diameter on the largest axial slice: within one in-plane pixel of 2r
    assert abs(lesion.max_axial_diameter_mm - 2 * radius) <= max(spacing[1:])
    assert abs(lesion.min_axis_mm - 2 * radius) <= max(spacing) * 1.5
    expected_centroid = image.index_to_physical(centre)
    np.testing.assert_allclose(lesion.centroid_mm, expected_centroid, atol=0.25 * max(spacing))
    zz, yy, xx = np.nonzero(sphere)
    assert lesion.bbox_zyx == (zz.min(), yy.min(), xx.min(), zz.max() + 1, yy.max() + 1, xx.max() + 1)
    assert lesion.hu_mean == pytest.approx(12.0) and lesion.hu_std == pytest.approx(0.0)
    assert lesion.lesion_id == "P7-L01" and lesion.source == "mask" and lesion.label is None


def test_centroid_is_in_lps_mm_with_origin_and_spacing():
    spacing = (2.0, 0.5, 0.8)
    image = body_volume((10, 20, 20), spacing, origin=(100.0, -50.0, 300.0))
    m = np.zeros(image.shape, bool)
    m[4, 6, 10] = True  # one voxel: centroid = origin + index * spacing (x, y, z)
    ((lesion, _),) = lesions_from_mask(image, image.with_array(m.astype(np.uint8)))
    assert lesion.centroid_mm == pytest.approx((100.0 + 10 * 0.8, -50.0 + 6 * 0.5, 300.0 + 4 * 2.0))
    assert lesion.volume_ml == pytest.approx(2.0 * 0.5 * 0.8 / 1000)
    # a single pixel's caliper diameter is one pixel across
    assert lesion.max_axial_diameter_mm == pytest.approx(0.8, abs=1e-6)
    assert lesion.min_axis_mm == pytest.approx(0.5)


def test_ellipsoid_axes_diameter_uses_largest_slice_and_min_axis():
    spacing = (1.0, 1.0, 1.0)
    shape = (20, 40, 50)
    semi = (4.0, 8.0, 14.0)  # z, y, x
    ell = ellipsoid(shape, spacing, (10, 20, 25), semi)
    image = with_lesion(body_volume(shape, spacing), ell)
    ((lesion, _),) = lesions_from_mask(image, image.with_array(ell.astype(np.uint8)))
    assert abs(lesion.max_axial_diameter_mm - 2 * semi[2]) <= 1.0
    assert abs(lesion.min_axis_mm - 2 * semi[0]) <= 1.0


def test_axial_diameter_of_a_diagonal_bar():
    image = body_volume((3, 30, 30), (5.0, 1.0, 1.0))
    m = np.zeros(image.shape, bool)
    for i in range(20):
        m[1, 5 + i, 5 + i] = True
    ((lesion, _),) = lesions_from_mask(image, image.with_array(m.astype(np.uint8)))
    # centres span 19*sqrt(2) mm; the pixel outline adds about one pixel
    assert 19 * math.sqrt(2) <= lesion.max_axial_diameter_mm <= 20 * math.sqrt(2) + 0.01
    assert lesion.min_axis_mm < 2.0


def test_to_row_has_lesion_table_columns():
    image = body_volume((5, 10, 10), (1.0, 1.0, 1.0))
    m = np.zeros(image.shape, np.uint8)
    m[1:3, 2:5, 3:7] = 4
    ((lesion, _),) = lesions_from_mask(
        image, image.with_array(m), 4, "p", "cyst", image_ref="a.nii", mask_ref="b.nii"
    )
    row = lesion.to_row()
    assert tuple(row) == LESION_COLUMNS
    assert (row["bbox_z0"], row["bbox_y1"], row["bbox_x1"]) == (1, 5, 7)
    assert row["label"] == 4 and row["image"] == "a.nii" and row["mask"] == "b.nii"
    assert row["centroid_x_mm"] == lesion.centroid_mm[0]


# --------------------------------------------------------------------------- components vs labels


def three_blob_mask(shape=(12, 30, 30)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[2:5, 3:8, 3:8] = 1  # blob A (first in raster order)
    m[6:10, 15:25, 15:25] = 2  # blob B, another label
    m[11, 29, 29] = 1  # one-voxel speck
    return m


def test_multi_label_mask_keeps_its_labels_as_lesion_ids():
    """Labels 2 and 5 (label 2 in two parts, touching label 5): two lesions, L02 and L05, not components."""
    image = body_volume((12, 30, 30), (2.0, 1.0, 1.0))
    m = np.zeros(image.shape, np.uint8)
    m[2:5, 3:8, 3:8] = 5
    m[2:5, 8:12, 3:8] = 2  # touches label 5: one component, two lesions
    m[11, 29, 29] = 2  # a separate part of label 2
    items = lesions_from_mask(image, image.with_array(m), None, "P", "metastasis", first_number=3)
    assert [les.lesion_id for les, _ in items] == ["P-L02", "P-L05"]
    assert [les.label for les, _ in items] == [2, 5]
    assert [les.n_voxels for les, _ in items] == [3 * 4 * 5 + 1, 75]
    np.testing.assert_array_equal(items[0][1], m == 2)
    # label 0 is the same as None
    assert [les.lesion_id for les, _ in lesions_from_mask(image, image.with_array(m), 0, "P")] == [
        "P-L02",
        "P-L05",
    ]


def test_components_mode_each_component_is_a_lesion():
    m = (three_blob_mask() > 0).astype(np.uint8)  # binary: connected components, numbered in order
    image = body_volume(m.shape, (2.0, 1.0, 1.0))
    items = lesions_from_mask(image, image.with_array(m), None, "P", "metastasis", first_number=3)
    assert [les.lesion_id for les, _ in items] == ["P-L03", "P-L04", "P-L05"]
    assert [les.n_voxels for les, _ in items] == [75, 400, 1]
    union = np.zeros(m.shape, bool)
    for _, mask in items:
        assert mask.shape == m.shape
        assert not (union & mask).any()
        union |= mask
    np.testing.assert_array_equal(union, m > 0)
    # label 0 means the same as None
    assert len(lesions_from_mask(image, image.with_array(m), 0)) == 3
    # min_voxels drops the speck
    assert [les.n_voxels for les, _ in lesions_from_mask(image, image.with_array(m), None, min_voxels=2)] == [
        75,
        400,
    ]


def test_components_use_26_connectivity():
    image = body_volume((4, 6, 6), (1.0, 1.0, 1.0))
    m = np.zeros(image.shape, np.uint8)
    m[1, 1, 1] = m[2, 2, 2] = 1  # touch at a corner only
    assert len(lesions_from_mask(image, image.with_array(m))) == 1


def test_label_mode_one_lesion_per_label_even_when_split(caplog):
    m = three_blob_mask()
    image = body_volume(m.shape, (2.0, 1.0, 1.0))
    with caplog.at_level(logging.INFO, logger="liverlesion.lesions"):
        ((lesion, mask),) = lesions_from_mask(image, image.with_array(m), 1, "P", "cyst")
    assert lesion.n_voxels == 76 and lesion.label == 1  # blob A + speck
    np.testing.assert_array_equal(mask, m == 1)
    assert lesion.bbox_zyx == (2, 3, 3, 12, 30, 30)
    assert "2 separate parts" in caplog.text
    ((lesion2, _),) = lesions_from_mask(image, image.with_array(m), 2)
    assert lesion2.n_voxels == 400


def test_mask_errors():
    m = three_blob_mask()
    image = body_volume(m.shape, (2.0, 1.0, 1.0))
    with pytest.raises(UserError, match=r"label 3 is not in the mask; labels present: 1, 2"):
        lesions_from_mask(image, image.with_array(m), 3, mask_name="row 4 mask")
    with pytest.raises(UserError, match=r"row 4 mask: the mask is empty"):
        lesions_from_mask(image, image.with_array(np.zeros_like(m)), None, mask_name="row 4 mask")
    with pytest.raises(UserError, match=r"shape \(12, 30, 31\)"):
        lesions_from_mask(image, Volume(np.zeros((12, 30, 31), np.uint8), image.spacing))
    with pytest.raises(UserError, match="smaller than min_voxels=1000"):
        lesions_from_mask(image, image.with_array(m), None, min_voxels=1000)


# --------------------------------------------------------------------------- clicks


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.6, 0.75)])
def test_click_sphere_is_round_in_mm(spacing):
    shape = (20, 50, 50)
    image = body_volume(shape, spacing, origin=(-10.0, -20.0, 50.0))
    centre_idx = (9.6, 24.3, 25.1)
    point = image.index_to_physical(centre_idx)
    lesion, mask = lesion_from_click(image, point, 16.0, "P2", "metastasis", lesion_id="P2-L04")
    np.testing.assert_array_equal(mask, ellipsoid(shape, spacing, centre_idx, (8.0,) * 3))
    assert lesion.volume_ml == pytest.approx(4 / 3 * math.pi * 8.0**3 / 1000, rel=0.05)
    assert abs(lesion.max_axial_diameter_mm - 16.0) <= max(spacing[1:])
    np.testing.assert_allclose(lesion.centroid_mm, point, atol=0.25 * max(spacing))
    assert lesion.source == "click" and lesion.mask == "" and lesion.lesion_id == "P2-L04"
    assert lesion.hu_mean == pytest.approx(60.0)


def test_click_tiny_diameter_gives_nearest_voxel():
    image = body_volume((5, 10, 10), (3.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    lesion, mask = lesion_from_click(image, (5.3, 4.6, 6.2), 0.2)
    assert lesion.n_voxels == 1 and mask[2, 5, 5]


def test_click_near_edge_is_clipped_with_warning(caplog):
    image = body_volume((10, 30, 30), (1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    with caplog.at_level(logging.WARNING, logger="liverlesion.lesions"):
        lesion, mask = lesion_from_click(image, (15.0, 15.0, 1.0), 8.0)
    assert "clipped" in caplog.text
    full = ellipsoid((30, 30, 30), (1.0, 1.0, 1.0), (11.0, 15.0, 15.0), (4.0,) * 3)
    assert lesion.n_voxels == int(full[10:20].sum()) < int(full.sum())
    assert lesion.bbox_zyx[0] == 0 and mask.shape == image.shape


def test_click_outside_volume_reports_extent_and_ras_hint():
    image = body_volume((10, 40, 40), (2.0, 1.0, 1.0), origin=(10.0, 20.0, 100.0))
    with pytest.raises(UserError) as e:
        lesion_from_click(image, (-30.0, -40.0, 110.0), 10.0, point_name="--point")
    msg = str(e.value)
    assert "--point (-30.0, -40.0, 110.0) mm is outside the image" in msg
    assert "x 9.5..49.5, y 19.5..59.5, z 99.0..119.0" in msg
    assert "negate x and y" in msg and "(30.0, 40.0, 110.0)" in msg
    with pytest.raises(UserError) as e2:
        lesion_from_click(image, (30.0, 40.0, 500.0), 10.0)
    assert "outside the image" in str(e2.value) and "negate" not in str(e2.value)
    with pytest.raises(UserError) as e3:  # an absurd coordinate stays short (was printed digit by digit)
        lesion_from_click(image, (1e308, 40.0, 110.0), 10.0, point_name="--point")
    assert "--point (1e+308, 40.0, 110.0) mm is outside the image" in str(e3.value)


def test_click_in_air_is_outside_the_body():
    image = body_volume((10, 40, 40), (2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    with pytest.raises(UserError, match=r"in air \(HU -1000 < -500\): outside the body"):
        lesion_from_click(image, (0.0, 20.0, 10.0), 10.0)


@pytest.mark.parametrize("diameter", [0.0, -2.0, float("nan")])
def test_click_bad_diameter(diameter):
    image = body_volume((5, 10, 10), (1.0, 1.0, 1.0))
    with pytest.raises(UserError, match="diameter"):
        lesion_from_click(image, image.index_to_physical((2, 5, 5)), diameter)


# --------------------------------------------------------------------------- manifests


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """Two patients as NIfTI: A (two-blob mask + a click), B (label mask, label 2); returns the manifest."""
    spacing = (2.0, 0.8, 0.8)
    a_mask = np.zeros((12, 40, 40), np.uint8)
    a_mask[2:5, 5:12, 5:12] = 1
    a_mask[7:10, 25:35, 25:35] = 1
    a_img = with_lesion(body_volume(a_mask.shape, spacing), a_mask > 0, 5.0)
    b_mask = np.zeros((10, 36, 36), np.uint8)
    b_mask[3:7, 10:20, 10:20] = 2
    b_mask[1, 1, 1] = 1
    b_img = with_lesion(body_volume(b_mask.shape, spacing, origin=(0.0, 0.0, 0.0)), b_mask == 2, 50.0)
    (tmp_path / "data").mkdir()
    write_nifti(a_img, tmp_path / "data/a.nii.gz")
    write_nifti(a_img.with_array(a_mask), tmp_path / "data/a_mask.nii.gz")
    write_nifti(b_img, tmp_path / "data/b.nii.gz")
    write_nifti(b_img.with_array(b_mask), tmp_path / "data/b_mask.nii.gz")
    click = a_img.index_to_physical((6, 20, 10))
    rows = [
        "patient_id,image,mask,label,lesion_class,x_mm,y_mm,z_mm,diameter_mm",
        "A,data/a.nii.gz,data/a_mask.nii.gz,,metastasis,,,,",
        "B,data/b.nii.gz,data/b_mask.nii.gz,2,cyst,,,,",
        f"A,data/a.nii.gz,,,cyst,{click[0]},{click[1]},{click[2]},6",
    ]
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_iter_manifest_lesions_groups_images_and_numbers_stably(study: Path, monkeypatch):
    import liverlesion.manifest_lesions as lio

    calls: list[str] = []
    real = lio.read_volume

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(lio, "read_volume", counting)
    out = list(iter_manifest_lesions(study, progress=False))
    assert sorted(calls) == ["a.nii.gz", "a_mask.nii.gz", "b.nii.gz", "b_mask.nii.gz"]  # each file once
    assert [len(items) for _, items in out] == [3, 1]
    ids = [les.lesion_id for _, items in out for les, _ in items]
    assert ids == ["A-L01", "A-L02", "A-L03", "B-L01"]
    sources = [les.source for _, items in out for les, _ in items]
    assert sources == ["mask", "mask", "click", "mask"]
    (image_a, items_a), (image_b, items_b) = out
    for les, mask in items_a:
        assert mask.shape == image_a.shape
        assert les.image == "data/a.nii.gz"
    assert items_a[0][0].n_voxels == 3 * 7 * 7
    assert items_b[0][0].label == 2 and items_b[0][0].hu_mean == pytest.approx(50.0)
    assert items_a[2][0].lesion_class == "cyst" and items_a[2][0].mask == ""
    # stable across runs
    again = [les.lesion_id for _, items in iter_manifest_lesions(study, progress=False) for les, _ in items]
    assert again == ids


def test_lesion_table_columns_and_values(study: Path):
    table = lesion_table(study, progress=False)
    assert tuple(table.columns) == LESION_COLUMNS
    assert table["lesion_id"].tolist() == ["A-L01", "A-L02", "A-L03", "B-L01"]
    assert table.loc[0, "volume_ml"] == pytest.approx(3 * 7 * 7 * 2.0 * 0.8 * 0.8 / 1000)
    assert pd.isna(table.loc[0, "label"]) and table.loc[3, "label"] == 2


def test_series_option_that_no_dicom_row_can_take_is_refused(study: Path, capsys):
    from liverlesion.cli import main

    with pytest.raises(UserError, match=r"--series 1\.2\.3: no manifest row it applies to .* drop --series"):
        iter_manifest_lesions(study, series="1.2.3", progress=False)
    assert main(["inspect", str(study), "-o", str(study.parent / "l.csv"), "--series", "1.2.3"]) != 0
    assert "drop --series" in capsys.readouterr().err and not (study.parent / "l.csv").exists()
    assert len(list(iter_manifest_lesions(study, progress=False))) == 2  # without it: read as before


def test_geometry_mismatch_names_manifest_row(tmp_path: Path, study: Path):
    from liverlesion.io import read_volume

    mask = read_volume(tmp_path / "data/b_mask.nii.gz", kind="mask")
    shifted = Volume(mask.array, mask.spacing, (5.0, 0.0, 0.0))
    write_nifti(shifted, tmp_path / "data/b_mask.nii.gz")
    with pytest.raises(UserError, match="manifest row 2 mask"):
        lesion_table(study, progress=False)
    # a loose enough tolerance accepts it
    assert len(lesion_table(study, tolerance=10.0, progress=False)) == 4


def test_headers_are_checked_before_any_image_is_read(tmp_path: Path, study: Path, monkeypatch):
    """A click row (no mask) on a 4-D image, last in the manifest: refused with the full read's message
    before the first image is read; each image and mask header is read once, and no mask for a click."""
    import SimpleITK as sitk

    import liverlesion.manifest_lesions as lio
    from liverlesion.io import read_volume

    sitk.WriteImage(sitk.Image([8, 8, 4, 3], sitk.sitkInt16), str(tmp_path / "data/c.nii.gz"))
    study.write_text(study.read_text() + "C,data/c.nii.gz,,,cyst,1,2,3,6\n")
    with pytest.raises(UserError) as full:
        read_volume(tmp_path / "data/c.nii.gz", name="manifest row 4 image")
    reads: list[str] = []
    headers: list[str] = []
    real_grid = lio.read_grid
    monkeypatch.setattr(lio, "read_volume", lambda path, *a, **k: reads.append(path))
    monkeypatch.setattr(
        lio, "read_grid", lambda path, *a, **k: headers.append(Path(path).name) or real_grid(path, *a, **k)
    )
    with pytest.raises(UserError) as early:
        iter_manifest_lesions(study, progress=False)  # refused when called, not when first iterated
    assert str(early.value) == str(full.value) and "4-D image" in str(early.value)
    assert reads == []
    assert headers == ["a.nii.gz", "a_mask.nii.gz", "b.nii.gz", "b_mask.nii.gz", "c.nii.gz"]


def test_label_absent_names_manifest_row(tmp_path: Path, study: Path):
    text = study.read_text().replace("data/b_mask.nii.gz,2,", "data/b_mask.nii.gz,7,")
    study.write_text(text)
    with pytest.raises(
        UserError, match=r"manifest row 2 mask 'data/b_mask.nii.gz': label 7 .* present: 1, 2"
    ):
        lesion_table(study, progress=False)


# --------------------------------------------------------------------------- summary and printing


def fake_table(diameters: list[float], patients: list[str], classes: list[str]) -> pd.DataFrame:
    rows = []
    for i, (d, p, c) in enumerate(zip(diameters, patients, classes, strict=True)):
        lesion = Lesion(
            f"{p}-L{i:02d}",
            p,
            c,
            "img",
            "",
            None,
            "mask",
            10,
            (0, 0, 0, 1, 1, 1),
            (0, 0, 0),
            0.1 * (i + 1),
            d,
            d / 2,
            40.0,
            5.0,
        )
        rows.append(lesion.to_row())
    return pd.DataFrame(rows, columns=list(LESION_COLUMNS))


def test_summarize_lesions_counts_and_sizes():
    t = fake_table(
        [5, 10, 15, 20, 25], ["a", "a", "a", "b", "c"], ["cyst", "metastasis", "metastasis", "cyst", "cyst"]
    )
    s = summarize_lesions(t)
    assert s["n_patients"] == 3 and s["n_lesions"] == 5
    assert s["lesions_per_class"] == {"cyst": 3, "metastasis": 2}
    assert s["patients_per_class"] == {"cyst": 3, "metastasis": 1}
    assert s["lesions_per_patient"] == {"min": 1, "median": 1.0, "max": 3}
    d = s["diameter_mm"]
    assert (d["median"], d["q1"], d["q3"]) == (15.0, 10.0, 20.0)
    assert (d["lt10"], d["10to20"], d["gt20"]) == (1, 3, 1)
    assert s["volume_ml"]["min"] == pytest.approx(0.1) and s["volume_ml"]["max"] == pytest.approx(0.5)


@pytest.mark.parametrize("use_rich", [True, False])
def test_print_long_table_shows_first_and_last_rows(use_rich, monkeypatch, capsys):
    if not use_rich:
        monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails -> plain text
    n = 30
    t = fake_table([12.0] * n, [f"p{i:02d}" for i in range(n)], ["cyst"] * n)
    print_lesion_table(t, max_rows=10)
    out = capsys.readouterr().out
    assert "p00-L00" in out and "p29-L29" in out
    assert "p15-L15" not in out
    assert "20 more" in out
    assert "patients: 30" in out and "cyst 30" in out and "research use, not for diagnosis" in out


# --------------------------------------------------------------------------- CLI


def test_inspect_cli_writes_csv(study: Path, tmp_path: Path, capsys):
    from liverlesion.cli import main

    out = tmp_path / "results" / "lesions.csv"
    assert main(["inspect", str(study), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert tuple(table.columns) == LESION_COLUMNS
    assert table["lesion_id"].tolist() == ["A-L01", "A-L02", "A-L03", "B-L01"]
    printed = capsys.readouterr().out
    assert "patients: 2" in printed and "lesions: 4" in printed
    assert "metastasis 2" in printed and "cyst 2" in printed
    # the study's one click is marked as an estimate, in the table and in the summary
    assert table["measurement"].str.startswith("estimated from click").sum() == 1
    assert set(table.loc[table["source"] == "mask", "measurement"]) == {"mask"}
    assert "1 lesion(s) from clicks: sizes and HU estimated from the click" in printed
    assert not [p for p in out.parent.iterdir() if p.name != "lesions.csv"]


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.replace("lesion_class", "lesion_klass"), "unknown column(s) lesion_klass"),
        (
            lambda t: t.replace("data/b.nii.gz", "data/missing.nii.gz"),
            "image 'data/missing.nii.gz' not found",
        ),
        (lambda t: t.replace("data/b_mask.nii.gz,2,", "data/b_mask.nii.gz,9,"), "label 9 is not in the mask"),
        (lambda t: t.replace(",6\n", ",0\n"), "diameter_mm='0' must be > 0"),
    ],
)
def test_inspect_cli_bad_input_exits_2_with_one_line(study: Path, tmp_path: Path, capsys, edit, expected):
    from liverlesion.cli import main

    study.write_text(edit(study.read_text()))
    out = tmp_path / "lesions.csv"
    assert main(["inspect", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    # only the progress bar (if any) precedes the message, which is one line
    error_lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(error_lines) == 1 and err.splitlines()[-1].startswith("liverlesion: error:")
    assert expected in error_lines[0]
    assert not out.exists()


def test_inspect_cli_refuses_to_overwrite_manifest(study: Path, capsys):
    from liverlesion.cli import main

    before = study.read_text()
    assert main(["inspect", str(study), "--out", str(study)]) == 2
    assert "is the manifest itself" in capsys.readouterr().err
    assert study.read_text() == before
    # nor over one of its images or masks: the table was written over the CT (exit 0)
    for name, what in [
        ("a.nii.gz", "the image of manifest row 1"),
        ("b_mask.nii.gz", "the mask of manifest row 2"),
    ]:
        data = (study.parent / "data" / name).read_bytes()
        assert main(["inspect", str(study), "--out", str(study.parent / "data" / name)]) == 2
        assert f"is {what};" in capsys.readouterr().err
        assert (study.parent / "data" / name).read_bytes() == data


# --------------------------------------------------------------------------- real CT


@pytest.mark.realdata
def test_ircad_tumour_mask_and_click_agree(tmp_path: Path):
    if not (IRCAD_PATIENT1 / "PATIENT_DICOM").is_dir():
        pytest.skip(f"real data not found at {IRCAD_PATIENT1} (see shared/data/README.md)")
    from liverlesion.io import check_geometry, read_volume

    with zipfile.ZipFile(IRCAD_PATIENT1 / "MASKS_DICOM.zip") as z:
        z.extractall(tmp_path, [n for n in z.namelist() if "/livertumor01/" in n])
    image = read_volume(IRCAD_PATIENT1 / "PATIENT_DICOM")
    mask = read_volume(tmp_path / "MASKS_DICOM/livertumor01", kind="mask")
    check_geometry(image, mask, tolerance=1e-2)
    items = lesions_from_mask(image, mask, None, "ircad1", "metastasis", min_voxels=10)
    assert items
    lesion = max((les for les, _ in items), key=lambda les: les.n_voxels)
    assert 5.0 < lesion.max_axial_diameter_mm < 150.0
    assert -50.0 < lesion.hu_mean < 200.0  # soft tissue, not air or bone
    # a click at the tumour's centroid with its diameter lands inside the body, on similar tissue
    click, _ = lesion_from_click(image, lesion.centroid_mm, lesion.min_axis_mm, "ircad1", "metastasis")
    assert abs(click.hu_mean - lesion.hu_mean) < 40.0


# --------------------------------------------------------------------------- H9: fast paths agree with plain references


def _random_blobs(rng: np.random.Generator, shape=(7, 18, 16), threshold=0.55) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(rng.random(shape), 1.2) > threshold


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int16, np.float32])
def test_foreground_box_matches_find_objects(dtype):
    from scipy import ndimage

    rng = np.random.default_rng(5)
    for _ in range(10):
        arr = np.where(_random_blobs(rng, threshold=0.58), 3, 0).astype(dtype)
        if np.dtype(dtype).kind in "if":
            arr[0, 0, 0] = -2  # negative labels are not foreground
        expected = ndimage.find_objects((arr > 0).astype(np.uint8))
        assert foreground_box(arr) == (expected[0] if expected else None)


def test_min_axis_from_surface_voxels_equals_all_voxels():
    from scipy import ndimage

    rng = np.random.default_rng(6)
    spacing = (2.5, 0.7, 0.9)
    for _ in range(10):
        blob = _random_blobs(rng, threshold=0.5)
        if blob.sum() < 2:
            continue
        surface = blob & ~ndimage.binary_erosion(blob, border_value=0)
        got = min_axis_mm(np.argwhere(blob), spacing, np.argwhere(surface))
        assert got == pytest.approx(min_axis_mm(np.argwhere(blob), spacing), abs=1e-9)


def test_max_axial_diameter_equals_brute_force_over_all_pixel_edges():
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(7)
    spacing_y, spacing_x = 0.7, 0.9
    midpoints = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5]])
    apart = np.zeros((4, 18, 16), bool)  # small squares far apart on successive slices, one empty slice
    apart[0, 1:3, 1:3] = apart[1, 14:17, 12:15] = apart[3, 1:3, 12:15] = True
    for blob in [apart] + [_random_blobs(rng, threshold=0.52) for _ in range(8)]:
        if not blob.any():
            continue
        # every edge midpoint of every lesion pixel, every pair: no outline or hull shortcut
        expected = max(
            float(
                pdist((np.argwhere(sl)[:, None, :] + midpoints).reshape(-1, 2) * [spacing_y, spacing_x]).max()
            )
            for sl in blob
            if sl.any()
        )
        assert max_axial_diameter_mm(blob, spacing_y, spacing_x) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("tolerance", [-1.0, float("nan")])
def test_bad_tolerance_is_refused_before_reading(study: Path, tolerance, monkeypatch):
    import liverlesion.manifest_lesions as io

    def no_read(*a, **k):
        raise AssertionError("read an image despite a bad tolerance")

    monkeypatch.setattr(io, "read_volume", no_read)
    with pytest.raises(UserError, match="--tolerance"):
        list(iter_manifest_lesions(study, tolerance=tolerance, progress=False))


def test_lesion_masks_are_crops_and_patches_do_not_change():
    """Each lesion is handed on as its bounding-box crop; patches cut from it equal those from the full mask."""
    from liverlesion.config import PatchConfig
    from liverlesion.lesions import LesionMask
    from liverlesion.patches import extract_patch

    m = three_blob_mask()
    image = with_lesion(body_volume(m.shape, (2.0, 0.8, 0.8)), m > 0, 30.0)
    items = lesions_from_mask(image, image.with_array(m), None, "P")
    items.append(lesion_from_click(image, image.index_to_physical(np.array([6.0, 15.0, 15.0])), 6.0))
    cfg = PatchConfig(size_px=32, neighbours=1)
    for lesion, mask in items:
        assert isinstance(mask, LesionMask)
        z0, y0, x0, z1, y1, x1 = lesion.bbox_zyx
        assert mask.crop.shape == (z1 - z0, y1 - y0, x1 - x0) and mask.offset == (z0, y0, x0)
        full = np.asarray(mask)
        assert full.shape == image.shape and full.sum() == mask.sum() == lesion.n_voxels
        for z in (0, z0, z1 - 1, -1):
            np.testing.assert_array_equal(mask[z], full[z])
        a, b = extract_patch(image, mask, cfg), extract_patch(image, full, cfg)
        for k in ("image", "mask", "hu"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
        assert a.meta == b.meta


def test_manifest_label_mask_ids_are_its_labels_and_collisions_are_refused(tmp_path: Path, study: Path):
    """B's mask holds labels 1 and 2: with an empty label they are B-L01 and B-L02; a click continues at L03."""
    from liverlesion.io import read_volume

    click = read_volume(study.parent / "data/b.nii.gz").index_to_physical((5, 15, 15))
    xyz = ",".join(str(v) for v in click)
    head = "patient_id,image,mask,label,lesion_class,x_mm,y_mm,z_mm,diameter_mm"
    mask_row = "B,data/b.nii.gz,data/b_mask.nii.gz,,cyst,,,,"
    click_row = f"B,data/b.nii.gz,,,cyst,{xyz},6"
    good = study.parent / "good.csv"
    good.write_text("\n".join([head, mask_row, click_row]) + "\n")
    items = [les for _, its in iter_manifest_lesions(good, progress=False) for les, _ in its]
    assert [(les.lesion_id, les.label) for les in items] == [("B-L01", 1), ("B-L02", 2), ("B-L03", None)]
    bad = study.parent / "bad.csv"
    bad.write_text("\n".join([head, click_row, mask_row]) + "\n")
    with pytest.raises(UserError, match=r"manifest row 2: lesion id B-L01 is already taken"):
        list(iter_manifest_lesions(bad, progress=False))


@pytest.mark.parametrize(
    ("mask", "point", "label", "diameter", "require_one", "expected"),
    [
        (True, False, False, None, True, None),
        (False, True, False, True, True, None),
        (True, True, False, None, True, "both"),
        (False, False, False, None, True, "neither"),
        (False, True, True, True, True, "label-without-mask"),
        (False, True, False, False, True, "point-without-diameter"),
        (False, True, False, None, True, None),  # diameter not checked
        (True, False, False, True, True, "diameter-without-point"),
        (False, False, True, None, False, "label-without-mask"),  # e.g. --manifest with --label
        (False, False, False, True, False, "diameter-without-point"),
        (False, False, False, False, False, None),
    ],
)
def test_lesion_source_problem(mask, point, label, diameter, require_one, expected):
    from liverlesion.lesions import LESION_SOURCE_PROBLEMS, lesion_source_problem

    got = lesion_source_problem(mask, point, label, diameter, require_one=require_one)
    assert got == expected
    assert got is None or got in LESION_SOURCE_PROBLEMS
