"""Lesions grown from a click (click.py: lesion_from_click): volume accuracy, leaks, fallbacks."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import ndimage

from liverlesion.click import LEAK_NOTE, MEASUREMENT, lesion_from_click
from liverlesion.volume import Volume

LIVER_HU = 100.0


def synthetic_lesion(
    semi_mm: tuple[float, float, float],
    spacing: tuple[float, float, float],
    lesion_hu: float,
    *,
    noise_hu: float = 12.0,
    seed: int = 0,
    psf_mm: float = 0.8,
    rotation: float = 0.5,
    extra: np.ndarray | None = None,
) -> tuple[Volume, np.ndarray, float]:
    """An ellipsoidal lesion (semi-axes z, y, x in mm, turned in-plane) in liver, with partial volume.

    Each voxel holds its ellipsoid occupancy (4^3 sub-samples), then a Gaussian point-spread blur
    and Gaussian noise are applied. Returns ``(image, centre index, true volume in mL)``.
    """
    sp = np.asarray(spacing, dtype=float)
    half = 1.7 * max(semi_mm) + 6.0
    shape = tuple(int(math.ceil(2 * half / s)) | 1 for s in sp)
    centre = (np.asarray(shape) - 1) / 2 + np.array([0.3, 0.2, -0.4])
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    occ = np.zeros(shape, dtype=np.float32)
    offsets = (np.arange(4) + 0.5) / 4 - 0.5
    cr, sr = math.cos(rotation), math.sin(rotation)
    for oz in offsets:
        for oy in offsets:
            for ox in offsets:
                pz = (z + oz - centre[0]) * sp[0]
                py = (y + oy - centre[1]) * sp[1]
                px = (x + ox - centre[2]) * sp[2]
                qy, qx = cr * py - sr * px, sr * py + cr * px
                occ += (pz / semi_mm[0]) ** 2 + (qy / semi_mm[1]) ** 2 + (qx / semi_mm[2]) ** 2 <= 1
    occ /= 64
    if extra is not None:
        occ = np.maximum(occ, extra)
    img = LIVER_HU + occ * (lesion_hu - LIVER_HU)
    img = ndimage.gaussian_filter(img, psf_mm / sp)
    img += np.random.default_rng(seed).normal(0.0, noise_hu, shape)
    true_ml = 4 / 3 * math.pi * float(np.prod(semi_mm)) / 1000
    return Volume(img.astype(np.float32), spacing, (-30.0, 10.0, 80.0)), centre, true_ml


CASES = [
    # (semi-axes z, y, x mm), spacing (z, y, x mm), lesion HU
    pytest.param((5.0, 5.0, 5.0), (2.5, 0.8, 0.8), 20.0, id="10mm-sphere-cyst"),
    pytest.param((5.0, 6.0, 8.0), (3.0, 0.7, 0.7), 50.0, id="16mm-ellipsoid-metastasis"),
    pytest.param((7.5, 7.5, 7.5), (5.0, 0.75, 0.75), 10.0, id="15mm-sphere-5mm-slices"),
    pytest.param((6.0, 9.0, 12.5), (2.5, 0.8, 0.8), 35.0, id="25mm-ellipsoid"),
    pytest.param((12.5, 12.5, 12.5), (1.25, 0.9, 0.9), 40.0, id="25mm-sphere"),
    pytest.param((7.5, 7.5, 6.0), (2.5, 0.8, 0.8), 180.0, id="15mm-brighter-than-liver"),
]


@pytest.mark.parametrize(("semi", "spacing", "hu"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_grown_volume_within_20_percent(semi, spacing, hu, seed):
    image, centre, true_ml = synthetic_lesion(semi, spacing, hu, seed=seed)
    diameter = 2 * max(semi)
    lesion, mask = lesion_from_click(image, image.index_to_physical(centre), diameter)
    sphere, _ = lesion_from_click(image, image.index_to_physical(centre), diameter, method="sphere")
    assert lesion.measurement == MEASUREMENT["grown"] == "estimated from click"
    assert abs(lesion.volume_ml / true_ml - 1) <= 0.20, (lesion.volume_ml, true_ml)
    # the grown mask is measured: its smallest axis is never larger than its long axis
    assert lesion.min_axis_mm <= lesion.max_axial_diameter_mm + max(spacing)
    assert abs(lesion.max_axial_diameter_mm - 2 * max(semi[1:])) <= 0.2 * 2 * max(semi[1:]) + 2 * spacing[1]
    assert abs(lesion.hu_mean - hu) < abs(LIVER_HU - hu) / 2  # lesion voxels, not liver
    assert mask.sum() == lesion.n_voxels
    if max(semi) > 1.5 * min(semi):  # an elongated lesion: the sphere overstates it, the grown mask does not
        assert sphere.volume_ml > 1.8 * true_ml


def test_click_off_centre_still_finds_the_lesion():
    image, centre, true_ml = synthetic_lesion((7.5, 7.5, 7.5), (2.5, 0.8, 0.8), 20.0)
    off = centre + np.array([0.0, 3.0, -2.0])  # 3 mm from the centre
    lesion, _ = lesion_from_click(image, image.index_to_physical(off), 15.0)
    assert lesion.measurement == "estimated from click"
    assert abs(lesion.volume_ml / true_ml - 1) <= 0.20


def test_diameter_misjudged_by_30_percent_still_measures_the_lesion():
    image, centre, true_ml = synthetic_lesion((7.5, 7.5, 7.5), (2.5, 0.8, 0.8), 20.0)
    point = image.index_to_physical(centre)
    for diameter in (15.0 / 1.3, 15.0 * 1.3):
        lesion, _ = lesion_from_click(image, point, diameter)
        assert lesion.measurement == "estimated from click"
        assert abs(lesion.volume_ml / true_ml - 1) <= 0.20, diameter


def test_synth_generator_lesions():
    """Plain lesions (no enhancing rim, no necrosis) of the project's synthetic CT generator, clicked at their centre.

    The generator's mask holds the voxels at least half occupied by the lesion, with partial volume,
    point-spread blur and CT noise; its 384 matrix gives 1 mm pixels and 2.5 mm slices here.
    """
    from liverlesion.synth import simulate_patient

    p = simulate_patient("s", ["metastasis", "cyst", "metastasis"], seed=4, difficulty=0.0)
    image = Volume(p.hu.astype(np.float32), p.spacing, p.origin)
    checked = 0
    for rec in p.lesions:
        if rec.diameter_mm < 10 or rec.rim or rec.necrotic:
            continue
        truth = p.labels == rec.label
        truth_ml = truth.sum() * image.voxel_volume_ml
        centre = ndimage.center_of_mass(truth)
        lesion, _ = lesion_from_click(image, image.index_to_physical(centre), rec.diameter_mm)
        assert lesion.measurement == "estimated from click"
        assert abs(lesion.volume_ml / truth_ml - 1) <= 0.20, (rec, lesion.volume_ml, truth_ml)
        checked += 1
    assert checked >= 1


def test_click_in_homogeneous_liver_is_capped_with_one_line(caplog):
    image, centre, _ = synthetic_lesion((5.0, 5.0, 5.0), (2.5, 0.8, 0.8), LIVER_HU)  # no lesion at all
    with caplog.at_level(logging.WARNING):
        lesion, mask = lesion_from_click(image, image.index_to_physical(centre), 15.0, point_name="--point")
    assert lesion.measurement == MEASUREMENT["capped"] and lesion.measurement.startswith(
        "estimated from click"
    )
    sphere, smask = lesion_from_click(image, image.index_to_physical(centre), 15.0, method="sphere")
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(smask))  # stopped at the diameter, no further
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("--point (") and LEAK_NOTE in warnings[0]


def test_region_leaking_to_the_bound_is_cut_at_the_diameter(caplog):
    """A lesion that opens broadly into a large region of the same HU (the grown region runs to the bound)."""
    semi, spacing = (7.5, 7.5, 7.5), (2.5, 0.8, 0.8)
    image0, centre, _ = synthetic_lesion(semi, spacing, 20.0, noise_hu=0.0)
    slab = np.zeros(image0.shape, dtype=np.float32)
    x0 = int(round(centre[2] + 5.0 / spacing[2]))
    slab[:, :, x0:] = 1.0  # cyst-like fluid filling one side, touching the lesion
    image, centre, _ = synthetic_lesion(semi, spacing, 20.0, extra=slab)
    point = image.index_to_physical(centre)
    with caplog.at_level(logging.WARNING):
        lesion, mask = lesion_from_click(image, point, 15.0)
    assert lesion.measurement == MEASUREMENT["capped"]
    assert "reached the diameter bound" in caplog.text and "bound's surface" in caplog.text
    # cut at the sphere of the diameter: nothing beyond 7.5 mm of the click
    idx = np.argwhere(np.asarray(mask))
    dist = np.sqrt((((idx - centre) * np.asarray(spacing)) ** 2).sum(axis=1))
    assert dist.max() <= 7.5 + 1e-6


def test_failed_growth_falls_back_to_the_sphere(caplog):
    """A 6 mm lesion clicked with a 30 mm diameter: the grown region is far below the sphere."""
    image, centre, _ = synthetic_lesion((3.0, 3.0, 3.0), (1.0, 0.8, 0.8), 10.0, noise_hu=5.0)
    padded = np.pad(image.array, ((12, 12), (18, 18), (18, 18)), constant_values=LIVER_HU)
    image = Volume(padded, image.spacing, image.origin)
    centre = centre + np.array([12, 18, 18])
    with caplog.at_level(logging.WARNING):
        lesion, _ = lesion_from_click(image, image.index_to_physical(centre), 30.0)
    assert lesion.measurement == MEASUREMENT["sphere"]
    assert "sphere used" in caplog.text
    assert lesion.volume_ml == pytest.approx(math.pi / 6 * 30.0**3 / 1000, rel=0.1)


def test_tiny_diameter_is_the_sphere_without_growing():
    image, centre, _ = synthetic_lesion((2.0, 2.0, 2.0), (2.5, 0.8, 0.8), 10.0)
    lesion, _ = lesion_from_click(image, image.index_to_physical(centre), 1.0)
    assert lesion.measurement == MEASUREMENT["sphere"] and lesion.n_voxels >= 1


def test_unknown_method_is_refused():
    from liverlesion.errors import UserError

    image, centre, _ = synthetic_lesion((5.0, 5.0, 5.0), (2.5, 0.8, 0.8), 20.0)
    with pytest.raises(UserError, match="click method 'ball'"):
        lesion_from_click(image, image.index_to_physical(centre), 10.0, method="ball")


def test_lesion_table_and_patch_use_the_grown_mask():
    """The grown mask, not the sphere, is what patches (and so radiomics and fusion) see."""
    from liverlesion.config import PatchConfig
    from liverlesion.patches import extract_patch

    image, centre, _ = synthetic_lesion((4.0, 6.0, 10.0), (2.5, 0.8, 0.8), 20.0)
    lesion, mask = lesion_from_click(image, image.index_to_physical(centre), 20.0)
    sphere, smask = lesion_from_click(image, image.index_to_physical(centre), 20.0, method="sphere")
    row = lesion.to_row()
    assert row["measurement"] == "estimated from click" and row["source"] == "click"
    cfg = PatchConfig(size_px=32, neighbours=1)
    grown_patch, sphere_patch = extract_patch(image, mask, cfg), extract_patch(image, smask, cfg)
    assert grown_patch.mask.sum() < 0.8 * sphere_patch.mask.sum()


@pytest.mark.realdata
def test_ircad_clicks_are_closer_to_the_masks_than_spheres(tmp_path):
    """3D-IRCADb-01 patient 1: each tumour clicked at its mask's centroid with its mask's diameter.

    Measured: the grown volume is 2-60% below the (generously drawn) masks, the sphere 30-220% above;
    one of the seven tumours falls back to the sphere.
    """
    import zipfile
    from pathlib import Path

    from liverlesion.io import read_volume
    from liverlesion.lesions import lesions_from_mask

    patient = Path(__file__).resolve().parents[2] / "shared/data/3Dircadb1/3Dircadb1.1"
    if not (patient / "PATIENT_DICOM").is_dir():
        pytest.skip(f"real data not found at {patient} (see shared/data/README.md)")
    with zipfile.ZipFile(patient / "MASKS_DICOM.zip") as z:
        z.extractall(tmp_path, [n for n in z.namelist() if "/livertumor" in n])
    image = read_volume(patient / "PATIENT_DICOM")
    closer = total = 0
    for folder in sorted((tmp_path / "MASKS_DICOM").iterdir()):
        for ref, _ in lesions_from_mask(image, read_volume(folder, kind="mask"), None, min_voxels=10):
            args = (image, ref.centroid_mm, ref.max_axial_diameter_mm)
            grown, _ = lesion_from_click(*args)
            sphere, _ = lesion_from_click(*args, method="sphere")
            err = abs(grown.volume_ml / ref.volume_ml - 1)  # the volume error, as the issue measures it
            closer += err < abs(sphere.volume_ml / ref.volume_ml - 1)
            total += 1
    assert total >= 5 and closer >= total - 1, (closer, total)
