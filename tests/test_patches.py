"""Tests for patches.py (geometry of the cut, windowing) and patch_cache.py (the on-disk cache)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from liverlesion import patch_cache as PC
from liverlesion import patches as P
from liverlesion.config import PatchConfig
from liverlesion.errors import UserError
from liverlesion.lesions import foreground_box
from liverlesion.volume import Volume

SPACING = (3.0, 0.8, 0.8)  # anisotropic: thick slices, fine pixels


def sphere_mask(shape, spacing, centre_idx, radius_mm) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of ``centre_idx`` (z, y, x index units)."""
    z, y, x = np.indices(shape, dtype=float)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((z, y, x), centre_idx, spacing, strict=True))
    return d2 <= radius_mm**2


def make_volume(shape=(20, 64, 64), spacing=SPACING, centre=(10, 32, 32), radius=6.0, background=60.0):
    """Soft tissue (60 HU) with a water sphere (0 HU); returns (Volume, lesion mask)."""
    mask = sphere_mask(shape, spacing, centre, radius)
    arr = np.full(shape, background, dtype=np.float32)
    arr[mask] = 0.0
    vol = Volume(arr, spacing, origin=(-20.0, 15.0, -100.0))
    return vol, mask


def cfg_(**kw) -> PatchConfig:
    base = dict(size_px=32, neighbours=1, stacks=0, margin_mm=5.0, min_field_mm=24.0)
    base.update(kw)
    return PatchConfig(**base)


def centroid(mask2d: np.ndarray) -> tuple[float, float]:
    r, c = np.nonzero(mask2d)
    return float(r.mean()), float(c.mean())


# --------------------------------------------------------------------------- window


def test_window_maps_edges_and_clips():
    c, w = 40.0, 400.0
    out = P.window(np.array([c - w / 2, c, c + w / 2, -2000.0, 3000.0]), c, w)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 0.0, 1.0], atol=1e-6)


def test_window_rejects_non_positive_width():
    with pytest.raises(UserError, match="width"):
        P.window(np.zeros(3), 40, 0)


# --------------------------------------------------------------------------- extract_patch


def test_patch_centred_on_lesion_with_expected_area():
    # Sphere centre 0.3 slices above slice 10: slice 10 (0.9 mm off-centre) is the largest section.
    centre = (10.3, 30.0, 35.0)
    r = 7.0
    vol, mask = make_volume(centre=centre, radius=r)
    p = P.extract_patch(vol, mask, cfg_())
    assert p.image.shape == (1, 3, 32, 32) and p.mask.shape == (1, 32, 32) and p.hu.shape == (1, 32, 32)
    assert p.image.dtype == np.float32 and p.mask.dtype == np.uint8 and p.hu.dtype == np.float32
    assert 0.0 <= p.image.min() and p.image.max() <= 1.0
    assert p.meta["centre_slice"] == 10
    rc, cc = centroid(p.mask[0])
    assert abs(rc - 15.5) <= 1.0 and abs(cc - 15.5) <= 1.0
    dz = (10 - centre[0]) * SPACING[0]
    expected_mm2 = np.pi * (r**2 - dz**2)
    got_mm2 = p.mask[0].sum() * p.meta["pixel_mm"] ** 2
    assert abs(got_mm2 - expected_mm2) / expected_mm2 < 0.10
    # the water sphere reads 0 HU in the middle of the patch, tissue 60 HU in the corner
    assert abs(p.hu[0, 15, 15]) < 5 and abs(p.hu[0, 0, 0] - 60) < 1e-3
    # centre in LPS mm = the physical position of the lesion centroid on slice 10
    np.testing.assert_allclose(
        p.meta["centre_lps_mm"], vol.index_to_physical([10, centre[1], centre[2]]), atol=0.5
    )


def test_centre_slice_is_the_largest_cross_section_not_the_middle():
    shape = (12, 48, 48)
    mask = np.zeros(shape, bool)
    yy, xx = np.indices(shape[1:])
    radii = {4: 2.0, 5: 9.0, 6: 5.0, 7: 4.0, 8: 3.0, 9: 2.0}  # mm; largest at slice 5
    for z, rad in radii.items():
        mask[z] = ((yy - 24) * 0.8) ** 2 + ((xx - 24) * 0.8) ** 2 <= rad**2
    vol = Volume(np.where(mask, 0.0, 60.0).astype(np.float32), SPACING)
    p = P.extract_patch(vol, mask, cfg_(neighbours=0))
    assert p.meta["centre_slice"] == 5
    assert abs(p.meta["max_area_mm2"] - mask[5].sum() * 0.64) < 1e-6


def test_anisotropic_in_plane_spacing_gives_round_lesion():
    spacing = (3.0, 0.6, 0.9)
    r = 6.0
    vol, mask = make_volume(shape=(12, 80, 56), spacing=spacing, centre=(6, 40, 28), radius=r)
    p = P.extract_patch(vol, mask, cfg_(size_px=48))
    rows, cols = np.nonzero(p.mask[0])
    height = (rows.max() - rows.min() + 1) * p.meta["pixel_mm"]
    width = (cols.max() - cols.min() + 1) * p.meta["pixel_mm"]
    assert abs(height - width) <= 2 * p.meta["pixel_mm"]
    area = p.mask[0].sum() * p.meta["pixel_mm"] ** 2
    assert abs(area - np.pi * r**2) / (np.pi * r**2) < 0.10


def _z_coded_volume(nz=20):
    """Background HU = 10 * slice index, plus a small sphere at slice 10."""
    vol, mask = make_volume(shape=(nz, 64, 64), radius=4.0)
    arr = np.broadcast_to((10.0 * np.arange(nz, dtype=np.float32))[:, None, None], vol.shape).copy()
    arr[mask] = -50.0
    return Volume(arr, vol.spacing, vol.origin), mask


def test_25d_channels_follow_z_at_native_spacing():
    vol, mask = _z_coded_volume()
    cfg = cfg_(neighbours=2, window_center=100.0, window_width=400.0)
    p = P.extract_patch(vol, mask, cfg)
    assert p.image.shape == (1, 5, 32, 32)
    corner = p.image[0, :, 0, 0]
    expected = P.window(10.0 * np.array([8, 9, 10, 11, 12]), 100.0, 400.0)
    np.testing.assert_allclose(corner, expected, atol=1e-5)
    assert p.meta["slice_indices"] == [8, 9, 10, 11, 12]
    # the stored HU is the centre channel
    assert abs(p.hu[0, 0, 0] - 100.0) < 1e-3


@pytest.mark.parametrize("step_slices", [2.0, 1.5])
def test_slice_step_mm_samples_along_z(step_slices):
    vol, mask = _z_coded_volume()
    step_mm = step_slices * SPACING[0]
    p = P.extract_patch(
        vol, mask, cfg_(neighbours=1, slice_step_mm=step_mm, window_center=100.0, window_width=400.0)
    )
    hu_expected = 10.0 * (10 + step_slices * np.array([-1, 0, 1]))  # linear in z, so interpolation is exact
    np.testing.assert_allclose(p.image[0, :, 0, 0], P.window(hu_expected, 100.0, 400.0), atol=1e-5)
    np.testing.assert_allclose(p.meta["slice_indices"], 10 + step_slices * np.array([-1, 0, 1]))


def test_2d_mode_shapes_and_content_match_25d():
    vol, mask = make_volume(radius=6.0)
    p25 = P.extract_patch(vol, mask, cfg_(neighbours=2))
    p2 = P.extract_patch(vol, mask, cfg_(neighbours=2, mode="2d"))
    assert p2.image.shape == (5, 1, 32, 32)
    assert p2.mask.shape == (5, 32, 32) and p2.hu.shape == (5, 32, 32)
    np.testing.assert_array_equal(p2.image[:, 0], p25.image[0])
    np.testing.assert_array_equal(p2.mask[2], p25.mask[0])
    areas = p2.mask.sum(axis=(1, 2))
    assert areas.argmax() == 2 and areas[0] < areas[2]  # each sample's own slice of the sphere


@pytest.mark.parametrize("stacks", [1, 2])
def test_25d_stacks_are_the_neighbouring_slices_stacks(stacks):
    # patch.stacks=m: 2m+1 samples, each the 2.5-D stack centred on one slice; the centre one is the
    # patch of stacks=0, and sample j's channels are the slices of the wider 2-D cut around it
    vol, mask = _z_coded_volume()
    one = P.extract_patch(vol, mask, cfg_(neighbours=1, window_center=100.0, window_width=400.0))
    many = P.extract_patch(
        vol, mask, cfg_(neighbours=1, stacks=stacks, window_center=100.0, window_width=400.0)
    )
    wide = P.extract_patch(
        vol, mask, cfg_(mode="2d", neighbours=1 + stacks, window_center=100.0, window_width=400.0)
    )
    n = 2 * stacks + 1
    assert (
        many.image.shape == (n, 3, 32, 32) and many.mask.shape == (n, 32, 32) and many.hu.shape == (n, 32, 32)
    )
    np.testing.assert_array_equal(many.image[stacks], one.image[0])
    np.testing.assert_array_equal(many.mask[stacks], one.mask[0])
    for j in range(n):
        np.testing.assert_array_equal(many.image[j], wide.image[j : j + 3, 0])
        np.testing.assert_array_equal(many.mask[j], wide.mask[j + 1])
        np.testing.assert_array_equal(many.hu[j], wide.hu[j + 1])
    assert len(many.meta["slice_indices"]) == 2 * (1 + stacks) + 1


def test_stacks_do_not_change_2d_mode_or_the_radiomics_features():
    from liverlesion.features import lesion_features

    vol, mask = make_volume()
    plain, stacked = (P.extract_patch(vol, mask, cfg_(mode="2d", stacks=m)) for m in (0, 2))
    np.testing.assert_array_equal(plain.image, stacked.image)  # 2d: the samples are the neighbours
    one, three = (P.extract_patch(vol, mask, cfg_(stacks=m)) for m in (0, 1))
    assert three.hu.shape[0] == 3 and not np.array_equal(three.mask[0], three.mask[1])
    assert lesion_features(three.hu, three.mask, 1.0) == lesion_features(one.hu, one.mask, 1.0)
    with pytest.raises(UserError, match=r"patch.stacks=-1: must be 0 or more"):
        P.extract_patch(vol, mask, cfg_(stacks=-1))


def test_lesion_at_volume_edge_pads_with_air_and_clamps_slices():
    # lesion touching column 0 and slice 0
    vol, mask = make_volume(centre=(0, 32, 2), radius=5.0)
    p = P.extract_patch(vol, mask, cfg_(neighbours=2, min_field_mm=40.0))
    assert p.meta["centre_slice"] == 0
    assert p.meta["slice_indices"] == [0, 0, 0, 1, 2]
    assert p.meta["clamped"] is True
    # outside the volume to the patient's right (low x): air, windowed to 0
    assert np.all(p.hu[0, :, 0] == P.AIR_FILL_HU)
    assert np.all(p.image[0, :, :, 0] == 0.0)
    # inside the volume: tissue
    assert abs(p.hu[0, 0, -1] - 60.0) < 1e-3
    # repeated edge slices are identical channels
    np.testing.assert_array_equal(p.image[0, 0], p.image[0, 2])


def test_orientation_row0_anterior_col0_patient_right():
    vol, mask = make_volume(radius=4.0)
    arr = vol.array.copy()
    # patient's right = lower x index; anterior = lower y index (canonical LPS array)
    arr[9:12, 30:35, 18:22] = 1000.0  # right of the lesion, same rows
    arr[9:12, 18:22, 30:35] = -500.0  # anterior of the lesion, same columns
    vol = Volume(arr, vol.spacing, vol.origin)
    p = P.extract_patch(vol, mask, cfg_(min_field_mm=32.0, size_px=40))
    c = (40 - 1) / 2
    r_right, c_right = centroid(p.hu[0] > 500)
    r_ant, c_ant = centroid(p.hu[0] < -250)
    assert c_right < c - 5 and abs(r_right - c) < 2  # left part of the image, middle rows
    assert r_ant < c - 5 and abs(c_ant - c) < 2  # top of the image, middle columns


def test_field_scales_with_lesion_or_is_fixed():
    vol, mask = make_volume(shape=(24, 96, 96), centre=(12, 48, 48), radius=20.0)
    p = P.extract_patch(vol, mask, cfg_(margin_mm=10.0, min_field_mm=24.0))
    # lesion diameter 40 mm (to voxel edges: up to +0.8) + 2 x 10 mm margin
    assert 60.0 <= p.meta["field_mm"] <= 61.0
    assert abs(p.meta["pixel_mm"] - p.meta["field_mm"] / 32) < 1e-9
    fixed = P.extract_patch(vol, mask, cfg_(scale_with_lesion=False, min_field_mm=50.0))
    assert fixed.meta["field_mm"] == 50.0
    small_vol, small_mask = make_volume(radius=3.0)
    small = P.extract_patch(small_vol, small_mask, cfg_(margin_mm=2.0, min_field_mm=30.0))
    assert small.meta["field_mm"] == 30.0


@pytest.mark.parametrize("interp", ["nearest", "bspline"])
def test_other_interpolations(interp):
    vol, mask = make_volume(radius=6.0)
    p = P.extract_patch(vol, mask, cfg_(interpolation=interp))
    assert p.image.shape == (1, 3, 32, 32)
    assert 0.0 <= p.image.min() and p.image.max() <= 1.0
    rc, cc = centroid(p.mask[0])
    assert abs(rc - 15.5) <= 1.0 and abs(cc - 15.5) <= 1.0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mode": "3d"}, "patch.mode"),
        ({"interpolation": "cubic"}, "patch.interpolation"),
        ({"neighbours": -1}, "patch.neighbours"),
        ({"slice_step_mm": -2.0}, "patch.slice_step_mm"),
        ({"size_px": 2}, "patch.size_px"),
        ({"min_field_mm": 0.0}, "patch.min_field_mm"),
        ({"margin_mm": -1.0}, "patch.margin_mm"),
        ({"window_width": 0.0}, "patch.window_width"),
        ({"window_center": float("nan")}, "patch.window_center"),
    ],
)
def test_bad_config_is_a_user_error(kw, match):
    vol, mask = make_volume()
    with pytest.raises(UserError, match=match):
        P.extract_patch(vol, mask, cfg_(**kw))


def test_empty_or_misshaped_mask_is_a_user_error():
    vol, mask = make_volume()
    with pytest.raises(UserError, match="empty"):
        P.extract_patch(vol, np.zeros_like(mask), cfg_())
    with pytest.raises(UserError, match="shape"):
        P.extract_patch(vol, mask[:, :-1], cfg_())


# --------------------------------------------------------------------------- build_patches (cache)


class FakeLesion:
    def __init__(self, lesion_id, patient_id, cls, diameter):
        self.row = {
            "lesion_id": lesion_id,
            "patient_id": patient_id,
            "lesion_class": cls,
            "image": f"{patient_id}.nii.gz",
            "mask": f"{patient_id}_mask.nii.gz",
            "max_axial_diameter_mm": diameter,
        }

    def to_row(self):
        return dict(self.row)


@pytest.fixture
def fake_cohort(tmp_path, monkeypatch):
    """A manifest on disk and a stand-in lesion reader that counts its calls."""
    man = tmp_path / "data" / "manifest.csv"
    man.parent.mkdir()
    for pid in ("007", "008"):
        (man.parent / f"{pid}.nii.gz").write_bytes(b"image " + pid.encode())
        (man.parent / f"{pid}_mask.nii.gz").write_bytes(b"mask " + pid.encode())
    man.write_text(
        "patient_id,image,mask,label,lesion_class\n"
        "007,007.nii.gz,007_mask.nii.gz,,metastasis\n"
        "008,008.nii.gz,008_mask.nii.gz,,cyst\n"
    )
    state = {"calls": 0, "fail_after": None}

    def fake_iter(manifest, tolerance, series):
        state["calls"] += 1
        # the manifest as read once by build_patches (manifest.read_manifest), not the path
        assert list(manifest["patient_id"]) == ["007", "008"]
        assert Path(manifest["image_path"][0]) == (man.parent / "007.nii.gz").resolve()
        specs = [
            ("007", "metastasis", [(10, 30, 30, 6.0), (10, 20, 45, 3.0)]),
            ("008", "cyst", [(8, 32, 32, 5.0)]),
        ]
        for i, (pid, cls, spheres) in enumerate(specs):
            if state["fail_after"] is not None and i >= state["fail_after"]:
                raise RuntimeError("reader failed mid-way")
            vol, _ = make_volume()
            items = []
            for n, (z, y, x, r) in enumerate(spheres, start=1):
                m = sphere_mask(vol.shape, vol.spacing, (z, y, x), r)
                items.append((FakeLesion(f"{pid}-L{n:02d}", pid, cls, 2 * r), m))
            yield vol, items

    monkeypatch.setattr(PC, "_iter_lesions", fake_iter)
    return man, state


def test_build_patches_parses_the_manifest_once_with_the_manifest_module(fake_cohort, tmp_path, monkeypatch):
    man, _ = fake_cohort
    calls = []
    real = PC.read_manifest

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(PC, "read_manifest", counting)
    key = PC.build_patches(man, tmp_path / "patches", cfg_()).name
    assert calls == [man]
    assert key == PC.patch_cache_key(man, cfg_())  # the same key whether given the table or the path


def test_build_patches_writes_the_cache_contract(fake_cohort, tmp_path):
    man, state = fake_cohort
    cfg = cfg_()
    out = PC.build_patches(man, tmp_path / "patches", cfg)
    assert out.parent == tmp_path / "patches" and len(out.name) == 12
    assert state["calls"] == 1
    idx = PC.load_patch_index(out)
    assert list(idx["lesion_id"]) == ["007-L01", "007-L02", "008-L01"]
    assert list(idx["patient_id"]) == ["007", "007", "008"]  # leading zeros kept
    assert {"file", "lesion_class", "max_axial_diameter_mm"} <= set(idx.columns)
    assert json.loads((out / "settings.json").read_text()) == dataclasses.asdict(cfg)
    assert PC.load_patch_config(out) == cfg
    assert (out / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for _, row in idx.iterrows():
        arrays = PC.load_patch(out, row)
        assert arrays["image"].shape == (1, 3, 32, 32) and arrays["image"].dtype == np.float32
        assert arrays["mask"].shape == (1, 32, 32) and arrays["mask"].dtype == np.uint8
        assert arrays["hu"].shape == (1, 32, 32) and arrays["hu"].dtype == np.float32
        assert arrays["mask"].sum() > 0
        assert arrays["meta"]["field_mm"] == pytest.approx(row["patch_field_mm"], abs=1e-3)
    # the npz holds what extract_patch gives
    vol, _ = make_volume()
    expected = P.extract_patch(vol, sphere_mask(vol.shape, vol.spacing, (8, 32, 32), 5.0), cfg)
    got = PC.load_patch(out, idx.iloc[2])
    np.testing.assert_array_equal(got["image"], expected.image)
    np.testing.assert_array_equal(got["mask"], expected.mask)
    # the parent folder resolves to its single cache
    assert PC.resolve_patch_dir(tmp_path / "patches") == out


def test_cache_readers(fake_cohort, tmp_path):
    man, _ = fake_cohort
    cfg = cfg_()
    out = PC.build_patches(man, tmp_path / "patches", cfg)
    idx = PC.load_patch_index(tmp_path / "patches")  # the parent resolves to its single cache
    files = PC.patch_files(out)
    assert list(files) == list(idx["lesion_id"]) and all(
        f.parent == out and f.is_file() for f in files.values()
    )
    hu_only = PC.load_patch(out, files["008-L01"], arrays=("hu",))
    assert set(hu_only) == {"hu", "meta"}
    np.testing.assert_array_equal(hu_only["hu"], PC.load_patch(out, idx.iloc[2])["hu"])
    assert PC.load_patch_settings(out)["window_width"] == cfg.window_width
    (out / "settings.json").unlink()
    assert PC.load_patch_settings(out) == {}  # a cache without settings.json: callers use defaults
    whole = (out / "index.csv").read_bytes()
    (out / "index.csv").write_bytes(whole[: whole.rindex(b",")])  # a copy cut short in its last row
    with pytest.raises(UserError, match=r"index.csv: looks truncated: .*delete the patch cache folder"):
        PC.load_patch_index(out)
    idx.drop(columns=["file"]).to_csv(out / "index.csv", index=False)
    with pytest.raises(UserError, match=r"index.csv: missing column\(s\) file; rebuild the patch cache"):
        PC.load_patch_index(out)
    with pytest.raises(UserError, match="not found; the cache is incomplete"):
        PC.load_patch(out, "gone.npz")


def test_contact_sheet_caps_lesions_and_is_drawn_from_files(fake_cohort, tmp_path):
    man, _ = fake_cohort
    out = PC.build_patches(man, tmp_path / "patches", cfg_())
    idx = PC.load_patch_index(out)
    png = PC.draw_contact_sheet(out, idx, tmp_path / "sheet.png", max_lesions=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the third lesion is not drawn, so its missing file does not matter; the first one's does
    (out / idx.iloc[2]["file"]).unlink()
    PC.draw_contact_sheet(out, idx, tmp_path / "sheet2.png", max_lesions=2)
    (out / idx.iloc[0]["file"]).unlink()
    with pytest.raises(UserError, match="not found"):
        PC.draw_contact_sheet(out, idx, tmp_path / "sheet3.png", max_lesions=2)
    assert not (tmp_path / "sheet3.png").exists()


def test_second_call_uses_the_cache(fake_cohort, tmp_path, capsys):
    man, state = fake_cohort
    out1 = PC.build_patches(man, tmp_path / "patches", cfg_())
    mtime = (out1 / "index.csv").stat().st_mtime_ns
    capsys.readouterr()
    out2 = PC.build_patches(man, tmp_path / "patches", cfg_())
    assert out2 == out1
    assert state["calls"] == 1  # not recomputed
    assert (out1 / "index.csv").stat().st_mtime_ns == mtime
    assert "using cached patches at" in capsys.readouterr().err
    PC.build_patches(man, tmp_path / "patches", cfg_(), overwrite=True)
    assert state["calls"] == 2


def test_changed_settings_or_inputs_change_the_key(fake_cohort, tmp_path):
    man, state = fake_cohort
    base = PC.build_patches(man, tmp_path / "patches", cfg_())
    other = PC.build_patches(man, tmp_path / "patches", cfg_(size_px=24))
    assert other != base and state["calls"] == 2
    assert PC.load_patch(other, PC.load_patch_index(other).iloc[0])["image"].shape == (1, 3, 24, 24)
    # 10 and 10.0 are the same setting
    assert PC.patch_cache_key(man, cfg_(margin_mm=10)) == PC.patch_cache_key(man, cfg_(margin_mm=10.0))
    # a newer image file -> new key
    img = man.parent / "007.nii.gz"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert PC.patch_cache_key(man, cfg_()) != base.name
    assert PC.patch_cache_key(man, cfg_(), tolerance=0.1) != PC.patch_cache_key(man, cfg_())
    # several caches: the parent folder is ambiguous
    with pytest.raises(UserError, match="several"):
        PC.load_patch_index(tmp_path / "patches")


def test_failure_midway_leaves_no_cache(fake_cohort, tmp_path):
    man, state = fake_cohort
    state["fail_after"] = 1
    with pytest.raises(RuntimeError, match="mid-way"):
        PC.build_patches(man, tmp_path / "patches", cfg_())
    parent = tmp_path / "patches"
    assert not parent.exists()  # not even the new, empty output folder
    state["fail_after"] = None
    out = PC.build_patches(man, parent, cfg_())
    assert len(PC.load_patch_index(out)) == 3


def test_bad_lesion_error_names_the_lesion(fake_cohort, tmp_path, monkeypatch):
    man, _ = fake_cohort

    def empty_iter(manifest, tolerance, series):
        vol, mask = make_volume()
        yield vol, [(FakeLesion("009-L01", "009", "cyst", 4.0), np.zeros_like(mask))]

    monkeypatch.setattr(PC, "_iter_lesions", empty_iter)
    with pytest.raises(UserError, match="009-L01.*empty"):
        PC.build_patches(man, tmp_path / "patches", cfg_())
    assert not (tmp_path / "patches").exists() or list((tmp_path / "patches").iterdir()) == []


def test_no_lesions_and_missing_inputs_are_user_errors(fake_cohort, tmp_path, monkeypatch):
    man, _ = fake_cohort
    monkeypatch.setattr(PC, "_iter_lesions", lambda *a: iter([]))
    with pytest.raises(UserError, match="no lesions"):
        PC.build_patches(man, tmp_path / "patches", cfg_())
    with pytest.raises(UserError, match="manifest .*nope.csv.*not found"):
        PC.build_patches(tmp_path / "nope.csv", tmp_path / "patches", cfg_())
    with pytest.raises(UserError, match="no index.csv"):
        PC.load_patch_index(tmp_path)
    with pytest.raises(UserError, match="patch.mode"):
        PC.build_patches(man, tmp_path / "patches", cfg_(mode="3d"))


def test_cli_missing_manifest_exits_2(tmp_path, capsys):
    from liverlesion.cli import main

    rc = main(["patches", str(tmp_path / "missing.csv"), str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing.csv" in err and "Traceback" not in err


# --------------------------------------------------------------------------- with the real lesion reader

try:
    from liverlesion.manifest_lesions import iter_manifest_lesions  # noqa: F401

    _LESIONS_ERROR = None
except ImportError as e:  # pragma: no cover - only while lesions.py is being written
    _LESIONS_ERROR = f"liverlesion.manifest_lesions.iter_manifest_lesions not importable yet: {e}"


def _write_nifti_cohort(folder: Path) -> Path:
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    rows = []
    for pid, cls, spheres in [
        ("001", "metastasis", [((10, 30, 30), 6.0), ((10, 20, 48), 3.5)]),
        ("002", "cyst", [((8, 32, 32), 5.0)]),
    ]:
        vol, _ = make_volume()
        lab = np.zeros(vol.shape, np.uint8)
        arr = vol.array.copy()
        arr[:, :2] = -1000.0  # air in front of the body: a manifest's images must be CT in HU
        for centre, r in spheres:
            m = sphere_mask(vol.shape, vol.spacing, centre, r)
            lab[m] = 1
            arr[m] = 0.0 if cls == "cyst" else 40.0
        img = sitk.GetImageFromArray(arr.astype(np.int16))
        img.SetSpacing(vol.spacing_xyz)
        img.SetOrigin(vol.origin)
        msk = sitk.GetImageFromArray(lab)
        msk.CopyInformation(img)
        sitk.WriteImage(img, str(folder / f"{pid}.nii.gz"))
        sitk.WriteImage(msk, str(folder / f"{pid}_mask.nii.gz"))
        rows.append(
            {
                "patient_id": pid,
                "image": f"{pid}.nii.gz",
                "mask": f"{pid}_mask.nii.gz",
                "label": "",
                "lesion_class": cls,
            }
        )
    man = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(man, index=False)
    return man


@pytest.mark.skipif(_LESIONS_ERROR is not None, reason=_LESIONS_ERROR or "")
def test_build_patches_with_real_reader_and_cli(tmp_path, capsys):
    from liverlesion.cli import main

    man = _write_nifti_cohort(tmp_path / "data")
    out = PC.build_patches(man, tmp_path / "patches", cfg_())
    idx = PC.load_patch_index(out)
    assert list(idx["lesion_id"]) == ["001-L01", "001-L02", "002-L01"]
    assert list(idx["lesion_class"]) == ["metastasis", "metastasis", "cyst"]
    for _, row in idx.iterrows():
        arrays = PC.load_patch(out, row)
        assert arrays["image"].shape == (1, 3, 32, 32)
        rc, cc = centroid(arrays["mask"][0])
        assert abs(rc - 15.5) <= 1.0 and abs(cc - 15.5) <= 1.0
    big = idx[idx["lesion_id"] == "001-L01"].iloc[0]
    assert PC.load_patch(out, big)["meta"]["centre_slice"] == 10
    # the CLI reuses the same cache (same default tolerance) and says so
    capsys.readouterr()
    rc = main(
        [
            "patches",
            str(man),
            str(tmp_path / "patches"),
            "--set",
            "patch.size_px=32",
            "--set",
            "patch.margin_mm=5",
            "--set",
            "patch.min_field_mm=24",
            "--set",
            "patch.stacks=0",
        ]
    )
    assert rc == 0
    assert "using cached patches at" in capsys.readouterr().err


@pytest.mark.skipif(_LESIONS_ERROR is not None, reason=_LESIONS_ERROR or "")
def test_cli_refused_for_a_bad_mask_leaves_no_new_output_folder(tmp_path, capsys):
    import SimpleITK as sitk

    from liverlesion.cli import main

    man = _write_nifti_cohort(tmp_path / "data")
    empty = sitk.ReadImage(str(tmp_path / "data" / "002_mask.nii.gz")) * 0
    sitk.WriteImage(empty, str(tmp_path / "data" / "002_mask.nii.gz"))
    rc = main(["patches", str(man), "-o", str(tmp_path / "new"), "--set", "patch.size_px=32"])
    assert rc == 2 and "the mask is empty" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # was left behind, empty
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    assert main(["patches", str(man), "-o", str(tmp_path / "mine"), "--set", "patch.size_px=32"]) == 2
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []


@pytest.mark.skipif(_LESIONS_ERROR is not None, reason=_LESIONS_ERROR or "")
def test_any_patient_id_gives_short_distinct_file_names_inside_the_cache(tmp_path):
    # patient ids are the user's: far too long for a file name, with path separators, or ids
    # that differ only in characters a file name cannot hold
    man = _write_nifti_cohort(tmp_path / "data")
    table = pd.read_csv(man, dtype=str, keep_default_na=False)
    long_id = "hospital-" + "x" * 300
    table["patient_id"] = table["patient_id"].map({"001": long_id, "002": "../../a/b"})
    table.to_csv(man, index=False)
    out = PC.build_patches(man, tmp_path / "patches", cfg_())
    idx = PC.load_patch_index(out)
    assert list(idx["lesion_id"]) == [f"{long_id}-L01", f"{long_id}-L02", "../../a/b-L01"]  # ids kept whole
    files = list(idx["file"])
    assert len(set(files)) == 3 and all(len(f) <= 100 and "/" not in f for f in files)
    assert files[0].endswith("-L01.npz") and files[1].endswith("-L02.npz")  # the lesion number stays readable
    assert sorted(p.name for p in out.glob("*.npz")) == sorted(files)  # nothing written outside the cache
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(_LESIONS_ERROR is not None, reason=_LESIONS_ERROR or "")
@pytest.mark.parametrize("damage", ["mask on another grid", "truncated image"])
def test_a_bad_last_row_is_refused_before_the_first_rows_patches_are_cut(tmp_path, monkeypatch, damage):
    """Validate before doing any work: every header is looked at first, with the full read's message."""
    import SimpleITK as sitk

    import liverlesion.manifest_lesions as ML

    man = _write_nifti_cohort(tmp_path / "data")
    data = tmp_path / "data"
    if damage == "mask on another grid":
        mask = sitk.ReadImage(str(data / "002_mask.nii.gz"))
        mask.SetOrigin(tuple(o + 2.0 for o in mask.GetOrigin()))
        sitk.WriteImage(mask, str(data / "002_mask.nii.gz"))
        says = (
            "manifest row 2 mask '002_mask.nii.gz' does not match manifest row 2 image '002.nii.gz' "
            "in origin (differs by 2 mm)"
        )
    else:  # an uncompressed NIfTI cut short: ITK alone would fill the missing voxels with zeros
        whole = sitk.ReadImage(str(data / "002.nii.gz"))
        sitk.WriteImage(whole, str(data / "002.nii"))
        (data / "002.nii").write_bytes((data / "002.nii").read_bytes()[:-3000])
        man.write_text(man.read_text().replace("002.nii.gz", "002.nii"))
        says = "manifest row 2 image: "
    cuts: list[str] = []
    real_extract = PC.extract_patch

    def counting_extract(volume, mask, cfg):
        cuts.append("cut")
        return real_extract(volume, mask, cfg)

    monkeypatch.setattr(PC, "extract_patch", counting_extract)
    # today's full check, met after row 1 was read and cut (the header check switched off)
    with monkeypatch.context() as m:
        m.setattr(ML, "check_manifest_headers", lambda *a, **k: None)
        with pytest.raises(UserError) as full:
            PC.build_patches(man, tmp_path / "full", cfg_())
    assert cuts == ["cut", "cut"]  # row 1's two lesions
    cuts.clear()

    reads: list[str] = []
    real_read = ML.read_volume
    monkeypatch.setattr(
        ML, "read_volume", lambda path, *a, **k: reads.append(path) or real_read(path, *a, **k)
    )
    with pytest.raises(UserError) as early:
        PC.build_patches(man, tmp_path / "patches", cfg_())
    assert str(early.value) == str(full.value)  # the same one line, naming row, file, what differs, the fix
    assert says in str(early.value) and "\n" not in str(early.value)
    assert reads == [] and cuts == []  # no image or mask read, no patch cut
    assert not (tmp_path / "patches").exists()


def test_safe_name_is_short_and_tells_long_ids_apart():
    from liverlesion.fileio import MAX_STEM, safe_name

    assert safe_name("P001-L02") == "P001-L02"
    assert safe_name("../x y/é") == "x_y"
    assert safe_name("") == safe_name("...") == "lesion"
    a, b = "p" * 200 + "A-L01", "p" * 200 + "B-L01"
    assert len(safe_name(a)) == len(safe_name(b)) == MAX_STEM
    assert safe_name(a) != safe_name(b) and safe_name(a) == safe_name(a)


# --------------------------------------------------------------------------- real CT


@pytest.mark.realdata
def test_real_ct_cyst_and_tumour_patches(ircad_patient1, tmp_path):
    """3D-IRCADb-01 patient 1: the cyst and a tumour, read from the published DICOM."""
    import zipfile

    from liverlesion.io import check_geometry, read_volume
    from liverlesion.lesions import lesions_from_mask

    with zipfile.ZipFile(ircad_patient1 / "MASKS_DICOM.zip") as z:
        wanted = [n for n in z.namelist() if n.split("/")[1:2] in (["liverkyst"], ["livertumor01"])]
        z.extractall(tmp_path, members=wanted)
    image = read_volume(ircad_patient1 / "PATIENT_DICOM")
    cfg = cfg_(size_px=64, neighbours=1, margin_mm=10.0, min_field_mm=32.0)
    for structure, cls in (("liverkyst", "cyst"), ("livertumor01", "metastasis")):
        mask = read_volume(tmp_path / "MASKS_DICOM" / structure, kind="mask")
        check_geometry(image, mask, tolerance=1e-2, image_name="image", mask_name=structure)
        (lesion, full), *_ = lesions_from_mask(image, mask, None, "ircad1", cls)
        p = P.extract_patch(image, full, cfg)
        assert p.image.shape == (1, 3, 64, 64)
        rc, cc = centroid(p.mask[0])
        assert abs(rc - 31.5) <= 1.0 and abs(cc - 31.5) <= 1.0
        # the largest section's area survives resampling
        area = p.mask[0].sum() * p.meta["pixel_mm"] ** 2
        assert abs(area - p.meta["max_area_mm2"]) / p.meta["max_area_mm2"] < 0.15
        # the patch centre shows the same HU as the volume at the lesion centroid (same geometry)
        zc, cy, cx = p.meta["centre_index_zyx"]
        ref = image.array[
            zc, int(round(cy)) - 1 : int(round(cy)) + 2, int(round(cx)) - 1 : int(round(cx)) + 2
        ]
        assert abs(float(p.hu[0, 30:34, 30:34].mean()) - float(ref.mean())) < 40
        # the recorded LPS centre lies inside the lesion's bounding box (from the lesion reader)
        z0, y0, x0, z1, y1, x1 = lesion.bbox_zyx
        lo = image.index_to_physical([z0 - 0.5, y0 - 0.5, x0 - 0.5])
        hi = image.index_to_physical([z1 - 0.5, y1 - 0.5, x1 - 0.5])
        c = np.asarray(p.meta["centre_lps_mm"])
        assert np.all(c >= np.minimum(lo, hi)) and np.all(c <= np.maximum(lo, hi))
        # the resampled mask covers the lesion's own HU (patient 1's liver is ~110 HU, the lesions ~75)
        inside = float(p.hu[0][p.mask[0] > 0].mean())
        assert abs(inside - lesion.hu_mean) < 25


# --------------------------------------------------------------------------- H9: cropped sampling, one progress bar


def test_foreground_box_of_a_bool_mask_matches_nonzero():
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = np.zeros((9, 14, 11), bool)
        lo = rng.integers(0, [9, 14, 11])
        hi = lo + rng.integers(1, 5, size=3)
        mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = (
            rng.random(tuple(np.minimum(hi, mask.shape) - lo)) > 0.3
        )
        nz = np.nonzero(mask)
        box = foreground_box(mask)
        if nz[0].size == 0:
            assert box is None
            continue
        assert box == tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)
    assert foreground_box(np.zeros((3, 4, 5), bool)) is None


@pytest.mark.parametrize("order", [0, 1, 3])
def test_sampling_a_cropped_mask_equals_sampling_the_full_mask(order):
    """The crop + offset path must give exactly what sampling the full-size (mostly empty) mask gives."""
    rng = np.random.default_rng(order)
    shape = (12, 30, 26)
    for _ in range(6):
        full = np.zeros(shape, np.float32)
        lo = rng.integers(0, [10, 26, 22])
        hi = np.minimum(lo + rng.integers(2, 8, size=3), shape)
        full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = rng.random(tuple(hi - lo)) > 0.4
        box = foreground_box(full > 0)
        if box is None:
            continue
        crop = full[box]
        offset = tuple(s.start for s in box)
        # grids that leave the volume in-plane and run past both ends in z (clamped slices)
        zs = np.clip(rng.uniform(-3, 15) + np.arange(-2, 3) * 1.5, 0, shape[0] - 1)
        rows = rng.uniform(-10, 35) + np.linspace(-12, 12, 17)
        cols = rng.uniform(-10, 30) + np.linspace(-9, 9, 15)
        ref = P._sample(full, zs, rows, cols, order=order, cval=0.0)
        got = P._sample(crop, zs, rows, cols, order=order, cval=0.0, offset=offset, shape=shape)
        np.testing.assert_array_equal(got, ref)


def test_patch_of_lesion_at_the_volume_corner_matches_a_full_size_reference():
    vol, _ = make_volume()
    mask = sphere_mask(vol.shape, vol.spacing, (0, 0, 63), 5.0)  # cut by three faces of the volume
    cfg = cfg_(neighbours=2)
    patch = P.extract_patch(vol, mask, cfg)
    zs = np.asarray(patch.meta["slice_indices"])
    zc, cy, cx = patch.meta["centre_index_zyx"]
    offsets = (np.arange(cfg.size_px) - (cfg.size_px - 1) / 2.0) * patch.meta["pixel_mm"]
    rows, cols = cy + offsets / vol.spacing[1], cx + offsets / vol.spacing[2]
    expected = P._sample(mask.astype(np.float32), zs, rows, cols, order=1, cval=0.0) > 0.5
    np.testing.assert_array_equal(patch.mask[0], expected[cfg.neighbours])
    assert patch.mask[0].any()


@pytest.mark.skipif(_LESIONS_ERROR is not None, reason=_LESIONS_ERROR or "")
def test_build_patches_shows_one_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIVERLESION_PROGRESS", "1")  # captured stderr is not a TTY: force the bars on
    man = _write_nifti_cohort(tmp_path / "data")
    capsys.readouterr()
    PC.build_patches(man, tmp_path / "patches", cfg_())
    err = capsys.readouterr().err
    assert "patches:" in err  # our bar, per image
    assert "lesions:" not in err  # the lesion reader's own bar is switched off


def test_a_cache_cut_before_patch_stacks_reads_as_one_stack(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"mode": "2.5d", "neighbours": 1, "size_px": 32}))
    (tmp_path / "index.csv").write_text("lesion_id,file\n")
    assert PC.load_patch_config(tmp_path).stacks == 0
    (tmp_path / "settings.json").write_text(json.dumps({"mode": "2.5d", "stacks": 2, "size_px": 32}))
    assert PC.load_patch_config(tmp_path).stacks == 2
