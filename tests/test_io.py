"""Tests for liverlesion.io: readers, series selection, checks and geometry."""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from helpers import make_ct_array, quantised_hu, write_dicom_series, write_non_image_objects
from liverlesion.errors import UserError
from liverlesion.io import check_geometry, list_series, read_volume, write_volume
from liverlesion.volume import Volume


def assert_same_geometry(a: Volume, b: Volume, atol: float = 1e-4) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- NIfTI / NRRD / MHA


def test_nifti_round_trip_keeps_values_and_geometry(tiny_ct, tiny_nifti):
    image, mask = tiny_ct
    image_path, mask_path = tiny_nifti
    got = read_volume(image_path)
    got_mask = read_volume(mask_path, kind="mask")
    assert got.array.dtype == np.float32
    np.testing.assert_array_equal(got.array, image.array)
    assert_same_geometry(got, image)
    assert got.meta["format"] == "nifti" and got.meta["source"] == str(image_path)
    assert np.issubdtype(got_mask.array.dtype, np.integer)
    np.testing.assert_array_equal(got_mask.array, mask.array)
    check_geometry(got, got_mask)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_other_formats_round_trip(tmp_path, tiny_ct, suffix):
    image, _ = tiny_ct
    path = write_volume(image, tmp_path / f"ct{suffix}")
    got = read_volume(path)
    np.testing.assert_array_equal(got.array, image.array)
    assert_same_geometry(got, image)
    assert [p.name for p in tmp_path.iterdir()] == [f"ct{suffix}"]  # no temp files left behind


def test_write_volume_refuses_two_file_formats(tmp_path, tiny_ct):
    with pytest.raises(UserError, match=r"\.mhd"):
        write_volume(tiny_ct[0], tmp_path / "ct.mhd")
    assert list(tmp_path.iterdir()) == []


def test_ras_nifti_comes_back_in_lps_with_correct_physical_points(tmp_path):
    # A NIfTI array indexed (i, j, k) with a RAS affine, as nibabel writes it.
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ras.nii.gz")

    vol = read_volume(tmp_path / "ras.nii.gz")

    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-6)
    assert vol.shape == (4, 5, 6)
    np.testing.assert_allclose(vol.spacing, (4.0, 3.0, 2.0))
    for ijk in [(0, 0, 0), (1, 2, 3), (5, 4, 0)]:
        ras = affine @ np.array([*ijk, 1.0])
        lps = np.array([-ras[0], -ras[1], ras[2]])
        idx = vol.physical_to_index(lps)
        zyx = tuple(int(round(v)) for v in idx)
        np.testing.assert_allclose(idx, zyx, atol=1e-6)
        assert vol.array[zyx] == data[ijk]
        np.testing.assert_allclose(vol.index_to_physical(zyx), lps, atol=1e-6)


def test_nifti_with_nan_is_refused_with_count(tmp_path, tiny_ct):
    image, _ = tiny_ct
    arr = image.array.copy()
    arr[0, 0, :3] = np.nan
    arr[1, 1, 1] = np.inf
    write_volume(image.with_array(arr), tmp_path / "nan.nii.gz")
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / "nan.nii.gz", name="--image")
    msg = one_line(exc)
    assert msg.startswith("--image:") and "4 NaN/inf voxels" in msg and "fix" in msg


def test_float_mask_with_whole_numbers_becomes_integer(tmp_path, tiny_ct):
    _, mask = tiny_ct
    write_volume(mask.with_array(mask.array.astype(np.float32) * 2), tmp_path / "m.nii.gz")
    got = read_volume(tmp_path / "m.nii.gz", kind="mask")
    assert got.array.dtype == np.uint8
    np.testing.assert_array_equal(got.array, mask.array * 2)
    write_volume(mask.with_array(mask.array.astype(np.float32) * 0.5), tmp_path / "p.nii.gz")
    with pytest.raises(UserError, match="non-integer"):
        read_volume(tmp_path / "p.nii.gz", kind="mask")


def test_2d_and_4d_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(tmp_path / "slice.nii.gz"))
    sitk.WriteImage(sitk.Image(16, 16, 1, sitk.sitkInt16), str(tmp_path / "oneslice.nii.gz"))
    sitk.WriteImage(sitk.Image([8, 8, 4, 3], sitk.sitkInt16), str(tmp_path / "phases.nii.gz"))
    for name in ("slice.nii.gz", "oneslice.nii.gz"):
        with pytest.raises(UserError) as exc:
            read_volume(tmp_path / name)
        assert "2-D" in one_line(exc) and "3-D volume is needed" in str(exc.value)
    with pytest.raises(UserError, match="4-D image"):
        read_volume(tmp_path / "phases.nii.gz")


def test_sheared_nifti_is_named_sheared_not_corrupt(tmp_path):
    # ITK refuses non-orthogonal axes; the message was 'corrupt, truncated or not an image file'
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    affine[0, 1] = 0.5
    path = tmp_path / "sheared.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), affine), path)
    with pytest.raises(UserError, match="sheared or skewed orientation") as e:
        read_volume(path, name="--image")
    assert "corrupt" not in one_line(e)


@pytest.mark.parametrize("name", ["fake.nii", "fake.nii.gz", "fake.dcm", "fake"])
def test_non_image_file_is_refused(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not an image\n")
    with pytest.raises(UserError) as exc:
        read_volume(path, name="--image")
    msg = one_line(exc)
    assert msg.startswith("--image:") and str(path) in msg


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_volume(tmp_path / "nope.nii.gz", name="manifest row 3 image")


# --------------------------------------------------------------------------- DICOM


def test_dicom_series_matches_source(tiny_ct, tiny_dicom_dir):
    image, _ = tiny_ct
    vol = read_volume(tiny_dicom_dir)
    np.testing.assert_array_equal(vol.array, quantised_hu(image.array))
    assert vol.array.dtype == np.float32
    assert_same_geometry(vol, image)
    assert vol.meta["modality"] == "CT" and vol.meta["format"] == "dicom"
    assert vol.meta["series_description"] == "synthetic"
    ref = vol.dicom
    assert ref.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert ref.series_instance_uid == str(pydicom.dcmread(next(tiny_dicom_dir.iterdir())).SeriesInstanceUID)
    assert "PixelData" not in ref.header
    assert ref.slices_along_array_z is True
    # SOP instances in array slice order: the k-th UID is the file whose position is slice k.
    by_uid = {}
    for f in tiny_dicom_dir.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_uid[ds.SOPInstanceUID] = float(ds.ImagePositionPatient[2])
    z = [by_uid[u] for u in ref.sop_instance_uids]
    np.testing.assert_allclose(z, [vol.index_to_physical([k, 0, 0])[2] for k in range(vol.shape[0])])


@pytest.mark.parametrize(
    ("slope", "intercept", "storage"),
    [(1.0, -1024.0, np.uint16), (2.0, -1024.0, np.uint16), (1.0, 0.0, np.int16), (0.5, -1000.0, np.int16)],
)
def test_rescale_is_applied_exactly_once(tmp_path, slope, intercept, storage):
    image, _ = make_ct_array(shape=(6, 16, 16), lesion_radius_mm=3)
    write_dicom_series(image, tmp_path / "s", slope=slope, intercept=intercept)
    stored = pydicom.dcmread(next((tmp_path / "s").iterdir()))
    assert stored.pixel_array.dtype == storage
    vol = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, quantised_hu(image.array, slope, intercept))
    assert vol.array.min() == pytest.approx(-1000, abs=25)  # air stays air (not -2024, not +24)


@pytest.mark.parametrize(
    "direction",
    [np.diag([1.0, 1.0, -1.0]), np.diag([-1.0, -1.0, 1.0]), np.diag([-1.0, 1.0, -1.0])],
    ids=["reverse-z", "ras-like-xy", "flip-xz"],
)
def test_flipped_series_comes_back_canonical(tmp_path, direction):
    image, _ = make_ct_array(shape=(8, 20, 24), lesion_radius_mm=4)
    # The same patient voxels stored with flipped axes: physical point of each voxel unchanged.
    flips = tuple(slice(None, None, -1) if direction[a, a] < 0 else slice(None) for a in (2, 1, 0))
    corner = [image.shape[i] - 1 if flips[i] != slice(None) else 0 for i in range(3)]
    flipped = Volume(image.array[flips].copy(), image.spacing, image.index_to_physical(corner), direction)
    write_dicom_series(flipped, tmp_path / "f", shuffle_instance_numbers=True)

    vol = read_volume(tmp_path / "f")

    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-6)
    assert_same_geometry(vol, image)
    np.testing.assert_array_equal(vol.array, quantised_hu(image.array))


def test_oblique_series_keeps_physical_coordinates(tmp_path):
    image, _ = make_ct_array(shape=(6, 16, 16), lesion_radius_mm=3)
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    oblique = Volume(image.array, image.spacing, image.origin, rot)
    write_dicom_series(oblique, tmp_path / "o")
    vol = read_volume(tmp_path / "o")
    np.testing.assert_allclose(vol.direction, rot, atol=1e-5)
    np.testing.assert_allclose(
        vol.index_to_physical([3, 5, 7]), oblique.index_to_physical([3, 5, 7]), atol=1e-3
    )


def test_messy_export_folder(tmp_path, tiny_ct):
    """Subfolders, .dcm and extension-less names, shuffled InstanceNumber, SR, DICOMDIR, junk."""
    image, _ = tiny_ct
    root = tmp_path / "export"
    paths = write_dicom_series(image, root / "a", shuffle_instance_numbers=True, suffix=".dcm")
    for p in paths[::2]:  # half the slices in another subfolder, names without extension
        (root / "b").mkdir(exist_ok=True)
        p.rename(root / "b" / p.stem)
    write_non_image_objects(root)
    vol = read_volume(root)
    np.testing.assert_array_equal(vol.array, quantised_hu(image.array))
    assert_same_geometry(vol, image)
    assert len(list_series(root)) == 1


def test_large_junk_file_is_skipped_unparsed_and_bare_datasets_still_read(tmp_path, tiny_ct, monkeypatch):
    """A big non-DICOM file (zeros: millions of empty elements to a forced pydicom, minutes) is refused from
    its first bytes; a file without the 128-byte preamble and DICM (an old export) is still read."""
    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s")
    ds = pydicom.dcmread(paths[0])
    ds.preamble = None
    del ds.file_meta
    pydicom.dcmwrite(paths[0], ds, enforce_file_format=False, little_endian=True, implicit_vr=False)
    assert pydicom.dcmread(paths[0], force=True).SOPInstanceUID and paths[0].read_bytes()[:2] == b"\x08\x00"
    (tmp_path / "s" / "zeros.bin").write_bytes(bytes(1_000_000))
    forced = []
    real = pydicom.dcmread

    def spy(fp, *args, **kw):
        if kw.get("force"):
            forced.append(Path(fp).name)
        return real(fp, *args, **kw)

    monkeypatch.setattr(pydicom, "dcmread", spy)
    vol = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, quantised_hu(image.array))
    assert "zeros.bin" not in forced and paths[0].name in forced


def test_localizer_in_series_is_skipped(tmp_path, tiny_ct):
    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s")
    scout = pydicom.dcmread(paths[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal scout
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(tmp_path / "s" / "scout")
    vol = read_volume(tmp_path / "s")
    assert vol.shape == image.shape


def test_mask_series_keeps_integer_labels(tmp_path, tiny_ct):
    _, mask = tiny_ct
    write_dicom_series(mask.with_array(mask.array * 255), tmp_path / "m", intercept=0.0)
    got = read_volume(tmp_path / "m", kind="mask")
    assert np.issubdtype(got.array.dtype, np.integer)
    np.testing.assert_array_equal(got.array, mask.array * 255)
    assert_same_geometry(got, mask)


def test_several_series_need_a_choice(tmp_path, tiny_ct):
    image, _ = tiny_ct
    write_dicom_series(image, tmp_path / "x" / "art", series_uid="1.2.3.1", description="arterial")
    write_dicom_series(image, tmp_path / "x" / "pv", series_uid="1.2.3.2", description="portal venous")
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / "x", name="--image")
    msg = one_line(exc)
    for text in ("1.2.3.1", "1.2.3.2", "arterial", "portal venous", "CT", "24 slices", "in pv", "--series"):
        assert text in msg
    assert "Test^Synthetic" not in msg and "SYNTH-0001" not in msg  # never print identifying tags
    assert read_volume(tmp_path / "x", series="1.2.3.2").meta["series_description"] == "portal venous"
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / "x", series="9.9.9")
    assert "9.9.9" in one_line(exc) and "1.2.3.1" in str(exc.value)
    listed = [(s["uid"], s["n_slices"], s["folder"]) for s in list_series(tmp_path / "x")]
    assert listed == [("1.2.3.1", 24, "art"), ("1.2.3.2", 24, "pv")]


def test_mr_is_refused_for_images_only(tmp_path, tiny_ct):
    image, mask = tiny_ct
    write_dicom_series(image, tmp_path / "mr", modality="MR")
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / "mr", name="--image")
    assert "modality MR" in one_line(exc) and "not CT" in str(exc.value)
    write_dicom_series(mask.with_array(mask.array.astype(np.float32)), tmp_path / "mr_mask", modality="MR")
    assert read_volume(tmp_path / "mr_mask", kind="mask").shape == image.shape


def _rtstruct(path: Path) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    sop = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, meta.MediaStorageSOPInstanceUID, "RTSTRUCT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN0042"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rtstruct_given_as_the_mask_says_how_to_convert_it(tmp_path):
    # contours exported from a planning system are a common "mask"; they are not a label image
    f = _rtstruct(tmp_path / "rt" / "RS.dcm")
    for path, verb in ((f, "is"), (f.parent, "holds only")):
        with pytest.raises(UserError) as exc:
            read_volume(path, kind="mask", name="--mask")
        msg = one_line(exc)
        assert f"--mask: {path} {verb} a DICOM RT Structure Set" in msg and "DICOM SEG" in msg
        assert "Doe" not in msg and "MRN0042" not in msg
    with pytest.raises(UserError, match="RTSTRUCT object without an image; pass the CT series"):
        read_volume(f, name="--image")  # as the image: the CT is what is missing


def test_non_image_dicom_as_the_mask_asks_for_a_mask_not_the_ct(tmp_path):
    # a DICOM SR (e.g. this tool's own report) in the --mask slot was told to 'pass the CT series folder'
    import pydicom

    f = _rtstruct(tmp_path / "sr" / "SR.dcm")
    ds = pydicom.dcmread(f)
    ds.Modality = "SR"
    ds.save_as(f)
    with pytest.raises(UserError) as exc:
        read_volume(f, kind="mask", name="--mask")
    msg = one_line(exc)
    assert "DICOM SR object without an image; pass the lesion mask" in msg and "CT series" not in msg
    with pytest.raises(UserError, match="SR object without an image; pass the CT series folder"):
        read_volume(f, name="--image")


@pytest.mark.parametrize(
    "keyword, value, expected",
    [
        ("PixelSpacing", [0, 0], "invalid PixelSpacing"),  # was a SimpleITK RuntimeError traceback
        ("PixelSpacing", [-0.7, -0.7], "invalid PixelSpacing"),  # was "mixes pixel spacings" (one spacing)
        ("RescaleSlope", 0, "invalid RescaleSlope ('0.0')"),  # GDCM quietly read these as 1
        ("RescaleSlope", "nan", "invalid RescaleSlope ('nan')"),
        ("RescaleIntercept", "inf", "invalid RescaleIntercept ('inf')"),
    ],
)
def test_impossible_spacing_or_rescale_is_refused(tmp_path, tiny_ct, keyword, value, expected):
    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s", shuffle_names=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid DS values we write on purpose
        for p in paths:
            ds = pydicom.dcmread(p)
            setattr(ds, keyword, value)
            ds.save_as(p)
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / "s", name="--image")
    msg = one_line(exc)
    assert msg.startswith("--image: DICOM file") and expected in msg and "re-export" in msg


def test_series_without_rescale_tags_is_named_when_its_values_are_not_hu(tmp_path, tiny_ct):
    """Stored values of 0..4095 with no RescaleSlope/Intercept read as 'HU' with no negatives: the check
    that refuses them says which tags are missing, not only that the values are not HU."""
    from liverlesion.case_input import check_ct_volume

    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s", shuffle_names=False)  # intercept -1024: all stored >= 0
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(p)
    vol = read_volume(tmp_path / "s", name="--image")
    assert vol.meta["rescale_absent"] and float(vol.array.min()) >= 0
    with pytest.raises(UserError) as exc:
        check_ct_volume(vol, "--image")
    assert "no negative values, and the DICOM series has no RescaleSlope or RescaleIntercept" in one_line(exc)
    with_tags = read_volume(write_dicom_series(image, tmp_path / "t")[0].parent)
    assert "rescale_absent" not in with_tags.meta
    check_ct_volume(with_tags, "--image")


def test_undecodable_compressed_series_is_one_line_without_the_decoders_own_lines(tmp_path, tiny_ct, capfd):
    """GDCM/OpenJPEG print a line per slice straight to file descriptor 2 ("Expected a SOC marker")."""
    from pydicom.encaps import encapsulate

    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s", shuffle_names=False)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000, with no JPEG 2000 in it
        ds.PixelData = encapsulate([b"\x00" * 100])
        ds["PixelData"].VR = "OB"
        ds.save_as(p, enforce_file_format=True)
    capfd.readouterr()
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / "s", name="--image")
    assert "could not be decoded" in one_line(exc)
    out, err = capfd.readouterr()
    assert "SOC" not in err and err.strip() == "", err[:300]


def test_missing_slice_names_the_gap(tmp_path, tiny_ct):
    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s", shuffle_names=False)
    paths[10].unlink()
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / "s")
    msg = one_line(exc)
    z9 = image.index_to_physical([9, 0, 0])[2]
    assert "missing slice" in msg and "5.000 mm" in msg and f"{z9:.2f}" in msg


def test_uneven_spacing_is_refused_beyond_tolerance(tmp_path, tiny_ct):
    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s", shuffle_names=False)
    for k in range(12, len(paths)):  # shift the upper half by 0.5 mm (20 % of 2.5 mm)
        ds = pydicom.dcmread(paths[k])
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.5
        ds.save_as(paths[k])
    with pytest.raises(UserError, match="uneven slice spacing: gap of 3.000 mm"):
        read_volume(tmp_path / "s")
    assert read_volume(tmp_path / "s", slice_tolerance=0.3).shape == image.shape


def test_duplicate_positions_are_refused(tmp_path, tiny_ct):
    image, _ = tiny_ct
    write_dicom_series(image, tmp_path / "s", series_uid="1.2.3")
    write_dicom_series(image, tmp_path / "s" / "again", series_uid="1.2.3", seed=1)
    with pytest.raises(UserError, match="same position"):
        read_volume(tmp_path / "s")


def test_mixed_sizes_in_one_series_are_refused(tmp_path, tiny_ct):
    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s", series_uid="1.2.3")
    small, _ = make_ct_array(shape=(1, 32, 32), origin=(0, 0, 500))
    paths[0].unlink()
    write_dicom_series(small, tmp_path / "s" / "small", series_uid="1.2.3")
    with pytest.raises(UserError, match="mixes image sizes"):
        read_volume(tmp_path / "s")


def test_corrupt_and_truncated_dicom(tmp_path, tiny_ct):
    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s", shuffle_names=False)
    data = paths[5].read_bytes()
    paths[5].write_bytes(data[:-1000])  # pixel data cut short: GDCM alone would read garbage
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / "s", name="--image")
    assert "truncated" in one_line(exc) and paths[5].name in str(exc.value)
    paths[5].write_bytes(data[:300])  # header cut short: the slice cannot be read at all
    with pytest.raises(UserError):
        read_volume(tmp_path / "s")
    with pytest.raises(UserError, match="truncated"):
        read_volume(paths[5])


def test_folder_without_images(tmp_path):
    write_non_image_objects(tmp_path / "junk")
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / "junk")
    assert "no DICOM image series" in one_line(exc) and "non-image SR" in str(exc.value)


def test_pydicom_ct_small_single_slice_is_refused(tmp_path):
    ct_small = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    with pytest.raises(UserError) as exc:
        read_volume(ct_small, name="--image")
    assert "single DICOM slice" in one_line(exc) and "3-D volume is needed" in str(exc.value)
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(ct_small, folder / "CT_small.dcm")
    with pytest.raises(UserError, match="single slice"):
        read_volume(folder)
    assert list_series(folder)[0]["n_slices"] == 1


def test_zip_input_reads_and_cleans_up(tmp_path, tiny_ct, tiny_dicom_dir, monkeypatch):
    image, _ = tiny_ct
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in tiny_dicom_dir.iterdir():
            zf.write(f, f"study/series/{f.name}")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    vol = read_volume(archive)
    np.testing.assert_array_equal(vol.array, quantised_hu(image.array))
    assert vol.meta["format"] == "dicom-zip" and vol.meta["source"] == str(archive)
    assert "PatientName" in vol.dicom.header  # usable after the temp dir is gone
    assert list(scratch.iterdir()) == []
    assert list_series(archive)[0]["n_slices"] == image.shape[0]
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(UserError):
        read_volume(bad)
    assert list(scratch.iterdir()) == []


def test_checkpoint_or_nested_zip_given_as_the_image_says_what_it_is(tmp_path, tiny_dicom_dir):
    # torch.save writes a zip: a model.pt given as --image was unpacked and scanned for DICOM ('no DICOM
    # image series found (skipped: 102 not DICOM or unreadable)'), and a zip inside the zip read as 'not DICOM'
    import torch

    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, ckpt)
    for kind in ("image", "mask"):
        with pytest.raises(UserError, match=r"model.pt is a PyTorch file .* not a CT image") as e:
            read_volume(ckpt, kind=kind, name="--image")
        assert "--model" in one_line(e)
    inner = tmp_path / "series.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        for f in tiny_dicom_dir.iterdir():
            zf.write(f, f"series/{f.name}")
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "series.zip")
    with pytest.raises(UserError, match=r"no DICOM image series .*skipped: 1 zip archive \(unzip it first\)"):
        read_volume(outer)
    locked = (
        tmp_path / "locked.zip"
    )  # Python cannot encrypt: set the flag readers go by (bit 0) in both headers
    with zipfile.ZipFile(locked, "w") as zf:
        zf.writestr("series/IM0001", b"\x00" * 64)
    data = bytearray(locked.read_bytes())
    data[data.index(b"PK\x03\x04") + 6] |= 0x1  # the local header's flags
    data[data.index(b"PK\x01\x02") + 8] |= 0x1  # the central directory's
    locked.write_bytes(bytes(data))
    with pytest.raises(
        UserError, match=r"locked.zip is password-protected .*unzip it with its password"
    ) as e:
        read_volume(locked)
    assert "ZipInfo" not in one_line(e)  # it printed the entry's repr


def test_zip_cut_short_says_so(tmp_path, tiny_dicom_dir):
    # an interrupted download keeps the zip's start but loses its index (the end): 'File is not a zip file'
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in tiny_dicom_dir.iterdir():
            zf.write(f, f"series/{f.name}")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        read_volume(archive, name="--image")
    msg = one_line(e)
    assert msg.startswith("--image: ") and "probably cut short" in msg and "copy it again" in msg


def test_zip_that_would_unpack_beyond_any_ct_series_is_refused_before_extracting(tmp_path, monkeypatch):
    # a zip bomb's entries claim gigabytes while the archive holds bytes; the cap is checked on the
    # central directory, before anything is written
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(3):
            zf.writestr(f"series/IM{i:04d}", b"\x00" * 64)
    data = bytearray(bomb.read_bytes())
    at = 0
    for _ in range(3):  # each central-directory entry now claims 0xFFFFFFF0 bytes (4 GiB) unpacked
        at = data.index(b"PK\x01\x02", at)
        data[at + 24 : at + 28] = (0xFFFFFFF0).to_bytes(4, "little")
        at += 4
    bomb.write_bytes(bytes(data))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(UserError, match=r"bomb.zip would unpack to 12 GiB, more than any one CT series") as e:
        read_volume(bomb, name="--image")
    assert one_line(e).startswith("--image: ") and "pass the folder" in one_line(e)
    assert list(scratch.iterdir()) == []  # nothing extracted, the private folder removed


def test_multiframe_enhanced_ct(tmp_path, tiny_ct):
    highdicom = pytest.importorskip("highdicom")
    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s", shuffle_names=False)
    frames = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    (tmp_path / "mf").mkdir()
    frames.save_as(tmp_path / "mf" / "enhanced.dcm")
    for source in (tmp_path / "mf" / "enhanced.dcm", tmp_path / "mf"):
        vol = read_volume(source)
        np.testing.assert_array_equal(vol.array, quantised_hu(image.array))
        assert_same_geometry(vol, image)


# --------------------------------------------------------------------------- check_geometry


def test_check_geometry_accepts_rounding_and_reports_mismatch(tiny_ct):
    image, mask = tiny_ct
    nudged = Volume(mask.array, mask.spacing, np.add(mask.origin, 1e-4), mask.direction)
    check_geometry(image, nudged)
    shifted = Volume(mask.array, mask.spacing, np.add(mask.origin, (0.0, 0.0, 0.01)), mask.direction)
    with pytest.raises(UserError) as exc:
        check_geometry(image, shifted, image_name="--image", mask_name="--mask")
    msg = one_line(exc)
    assert (
        "origin" in msg and "--tolerance" in msg and "(-24, -24, 100)" in msg and "(-24, -24, 100.01)" in msg
    )
    check_geometry(image, shifted, tolerance=0.02)

    cropped = Volume(mask.array[:, :40], (2.5, 0.8, 0.8), mask.origin)
    with pytest.raises(UserError) as exc:
        check_geometry(image, cropped, image_name="img.nii.gz", mask_name="mask.nii.gz")
    msg = one_line(exc)
    for text in (
        "shape (24, 48, 48)",
        "shape (24, 40, 48)",
        "spacing (2.5, 1, 1)",
        "spacing (2.5, 0.8, 0.8)",
    ):
        assert text in msg
    assert "sitkNearestNeighbor" in msg and "--tolerance" not in msg


def test_check_geometry_direction(tiny_ct):
    image, mask = tiny_ct
    flipped = Volume(mask.array, mask.spacing, mask.origin, np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(UserError, match="direction"):
        check_geometry(image, flipped)


# --------------------------------------------------------------------------- real CT


@pytest.mark.realdata
def test_ircadb_patient1_dicom(ircad_patient1):
    folder = ircad_patient1 / "PATIENT_DICOM"
    vol = read_volume(folder)
    assert vol.shape == (129, 512, 512)
    np.testing.assert_allclose(vol.spacing, (1.6, 0.57, 0.57), atol=1e-4)
    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-6)
    assert vol.meta["modality"] == "CT"
    assert vol.array.dtype == np.float32
    # Header positions of the first and last slices, read independently.
    first = pydicom.dcmread(folder / "image_0", stop_before_pixels=True)
    last = pydicom.dcmread(folder / "image_128", stop_before_pixels=True)
    np.testing.assert_allclose(vol.origin, [float(v) for v in first.ImagePositionPatient], atol=1e-3)
    np.testing.assert_allclose(
        vol.index_to_physical([128, 0, 0]), [float(v) for v in last.ImagePositionPatient], atol=1e-2
    )
    hu = vol.array
    assert np.mean(hu < -900) > 0.2  # air around the patient
    body = hu[hu > -500]
    assert -100 < np.median(body) < 150  # soft tissue, not raw stored values
    assert hu.min() >= -1100 and hu.max() <= 3100


def test_sagittal_series_is_reoriented_to_axial_array(tmp_path):
    image, _ = make_ct_array(shape=(10, 12, 14), spacing=(1.5, 1.0, 0.8), lesion_radius_mm=3)
    # Sagittal slices: rows run posterior, columns inferior, slices step towards the patient's right.
    sagittal = np.column_stack([(0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)])
    source = Volume(image.array, image.spacing, (50.0, -20.0, 80.0), sagittal)
    write_dicom_series(source, tmp_path / "sag")

    vol = read_volume(tmp_path / "sag")

    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-6)
    # Source rows step inferior (1.0 mm), columns posterior (0.8 mm), slices right (1.5 mm).
    assert vol.shape == (12, 14, 10)
    np.testing.assert_allclose(vol.spacing, (1.0, 0.8, 1.5), atol=1e-6)
    for idx in [(0, 0, 0), (3, 5, 7), (9, 11, 13)]:
        point = source.index_to_physical(idx)
        back = np.round(vol.physical_to_index(point)).astype(int)
        np.testing.assert_allclose(vol.index_to_physical(back), point, atol=1e-4)
        assert vol.array[tuple(back)] == quantised_hu(image.array[idx])
    assert vol.dicom.slices_along_array_z is False


# --------------------------------------------------------------------------- H9: voxel size, fast paths


def _nifti_with_pixdim(tmp_path: Path, pixdim_xyz, gz: bool) -> Path:
    """A NIfTI whose stored pixdim[1:4] is ``pixdim_xyz``, patched in the raw header as a broken writer would."""
    import gzip
    import struct

    image, _ = make_ct_array(shape=(6, 8, 10))
    plain = write_volume(image, tmp_path / "raw.nii")
    raw = bytearray(plain.read_bytes())
    raw[80:92] = struct.pack("<3f", *pixdim_xyz)  # NIfTI-1: pixdim is float32[8] at byte 76
    if gz:
        plain.unlink()
        out = tmp_path / "bad.nii.gz"
        out.write_bytes(gzip.compress(bytes(raw)))
        return out
    plain.write_bytes(bytes(raw))
    return plain


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "pixdim", [(1.0, 1.0, 0.0), (1.0, -1.0, 2.5), (0.0, 0.0, 0.0), (1.0, float("nan"), 2.5)]
)
def test_nifti_zero_or_negative_voxel_size_is_refused(tmp_path, pixdim, gz):
    path = _nifti_with_pixdim(tmp_path, pixdim, gz)
    # SimpleITK would read it without complaint (as 1 mm or the absolute value)
    assert all(s > 0 for s in sitk.ReadImage(str(path)).GetSpacing())
    with pytest.raises(UserError) as exc:
        read_volume(path, name="--image")
    msg = one_line(exc)
    assert msg.startswith("--image: ") and str(path) in msg
    assert "pixdim" in msg and "zero, negative" in msg


@pytest.mark.parametrize("gz", [False, True])
def test_nifti_with_valid_patched_voxel_size_reads_that_size(tmp_path, gz):
    path = _nifti_with_pixdim(tmp_path, (0.7, 0.8, 2.5), gz)
    vol = read_volume(path)
    np.testing.assert_allclose(vol.spacing, (2.5, 0.8, 0.7), atol=1e-6)


@pytest.mark.parametrize("tolerance", [-0.1, float("nan"), float("inf")])
def test_check_geometry_refuses_bad_tolerance(tiny_ct, tolerance):
    image, mask = tiny_ct
    with pytest.raises(UserError, match="--tolerance") as exc:
        check_geometry(image, mask, tolerance=tolerance)
    one_line(exc)


@pytest.mark.parametrize(
    "direction",
    [
        np.eye(3),
        # slightly oblique (gantry tilt about x, and a small in-plane rotation): already closest to LPS
        np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]]),
        np.array([[np.cos(0.1), -np.sin(0.1), 0], [np.sin(0.1), np.cos(0.1), 0], [0, 0, 1]]),
        np.diag([-1.0, 1.0, -1.0]),  # needs flips
        np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, -1]]),  # needs a permutation
    ],
)
def test_reorientation_shortcut_matches_dicomorient(direction):
    from liverlesion.io.common import sitk_to_volume

    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    fast = sitk_to_volume(img, {})
    ref = Volume.from_sitk(img, reorient=True)  # always DICOMOrient
    np.testing.assert_array_equal(fast.array, ref.array)
    assert fast.spacing == ref.spacing and fast.origin == ref.origin
    np.testing.assert_array_equal(fast.direction, ref.direction)


def test_dicom_reference_header_is_complete_although_the_scan_reads_few_tags(tiny_ct, tiny_dicom_dir):
    from liverlesion.io.scan import SCAN_TAGS

    vol = read_volume(tiny_dicom_dir)
    header = vol.dicom.header
    first_file = min(
        tiny_dicom_dir.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    full = pydicom.dcmread(first_file, stop_before_pixels=True)
    # tags the scan skips, that a DICOM SR writer needs (patient/study module)
    for keyword in ("PatientID", "PatientName", "StudyDate", "SliceThickness", "AccessionNumber"):
        assert keyword not in SCAN_TAGS
        assert header[keyword].value == full[keyword].value
    assert header.SOPInstanceUID == full.SOPInstanceUID
    assert 0x7FE00010 not in header  # no pixel data kept


def test_truncated_metaimage_refused_before_itk(tmp_path, capfd):
    """A cut-short .mha is named in one line; ITK's MetaIO never gets to print its own lines."""
    import SimpleITK as sitk

    from liverlesion.errors import UserError
    from liverlesion.io import read_volume

    noise = np.random.default_rng(0).integers(-1000, 1000, (6, 16, 16)).astype(np.int16)
    # compressed too (write_volume's own .mha), where the header gives CompressedDataSize
    for compressed in (False, True):
        sitk.WriteImage(sitk.GetImageFromArray(noise), str(tmp_path / "ct.mha"), useCompression=compressed)
        data = (tmp_path / "ct.mha").read_bytes()
        (tmp_path / "cut.mha").write_bytes(data[: len(data) - 100])
        assert read_volume(tmp_path / "ct.mha").array.shape == (6, 16, 16)
        with pytest.raises(UserError, match=r"cut\.mha is truncated.*copy or export it again"):
            read_volume(tmp_path / "cut.mha")
        err = capfd.readouterr().err
        assert "MetaImage" not in err


@pytest.mark.parametrize(
    ("header", "field", "reader_noise"),
    [("ct.mhd", "ElementDataFile", "MetaImage"), ("ct.nhdr", "NRRD 'data file'", "NRRD")],
)
def test_detached_header_with_missing_or_short_data_file_names_both_files(
    tmp_path, capfd, header, field, reader_noise
):
    """A .mhd or .nhdr without its data file next to it (or with a cut-short one) was a vague 'could not
    be read' error (for .mhd under MetaIO's lines on stderr); it now names the header and the data file."""
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 16, 16), np.int16)), str(tmp_path / header))
    assert read_volume(tmp_path / header).array.shape == (6, 16, 16)
    raw = tmp_path / "ct.raw"
    raw.write_bytes(raw.read_bytes()[:-100])
    stem = re.escape(header)
    with pytest.raises(UserError, match=rf"{stem} is truncated: .* 3072 bytes .* but .*ct\.raw holds 2972"):
        read_volume(tmp_path / header)
    raw.unlink()
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / header, name="--image")
    assert one_line(exc).startswith("--image: ")
    assert f"{tmp_path / header}: its pixel data file 'ct.raw' ({field}) is missing" in str(exc.value)
    assert f"looked for {raw}" in str(exc.value)
    assert reader_noise not in capfd.readouterr().err


def test_attached_nrrd_cut_short_is_named_truncated(tmp_path, capfd):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 16, 16), np.int16)), str(tmp_path / "a.nrrd"))
    data = (tmp_path / "a.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(data[:-10])
    with pytest.raises(UserError, match=r"cut\.nrrd is truncated: .* but the file holds 3062"):
        read_volume(tmp_path / "cut.nrrd")
    assert "NRRD" not in capfd.readouterr().err


def test_huge_finite_values_print_no_numpy_warnings(tmp_path):
    """The reader's NaN/inf shortcut sums the voxels: a float32 overflow there printed two numpy
    RuntimeWarnings (four lines) above the one-line error; the values are finite, so the read succeeds."""
    import warnings

    from liverlesion.io import read_volume, write_volume

    image, _ = make_ct_array()
    path = write_volume(
        image.with_array(np.where(image.array > 0, 3e38, -3e38).astype(np.float32)), tmp_path / "x.nii"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_volume(path).array.max() == np.float32(3e38)


def test_nifti_with_nan_in_its_orientation_is_refused_before_itk(tmp_path, capfd):
    """A NaN in the sform made ITK's SVD print a matrix dump (eight lines) on stderr above a vague
    'could not be read ... corrupt, truncated or not an image file'."""
    import nibabel as nib

    from liverlesion.errors import UserError
    from liverlesion.io import read_volume

    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    affine[0, 3] = np.nan
    img = nib.Nifti1Image(np.zeros((16, 16, 6), np.int16), affine)
    img.set_qform(None, code=0)  # the sform alone is in use
    nib.save(img, tmp_path / "nan.nii.gz")
    with pytest.raises(
        UserError, match=r"nan\.nii\.gz has NaN/inf in its orientation \(NIfTI header srow_x\)"
    ):
        read_volume(tmp_path / "nan.nii.gz")
    assert "vnl" not in capfd.readouterr().err


@pytest.mark.parametrize("tilt_deg", [0.0, 0.05, 12.0])
def test_gantry_tilted_series_is_refused_as_sheared(tmp_path, tiny_ct, tilt_deg):
    """Slices square to their normal but each shifted in y by gap * tan(tilt), as a tilted gantry writes them."""
    image, _ = tiny_ct
    paths = write_dicom_series(image, tmp_path / "s", shuffle_names=False)
    gap = image.spacing[0]
    for k, f in enumerate(paths):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + k * gap * np.tan(
            np.deg2rad(tilt_deg)
        )
        ds.GantryDetectorTilt = tilt_deg
        ds.save_as(f)
    if tilt_deg < 0.1:  # within half a pixel over the series: read as it is
        assert read_volume(tmp_path / "s").shape == image.shape
        return
    with pytest.raises(UserError) as exc:
        read_volume(tmp_path / "s")
    msg = one_line(exc)
    assert "sheared (gantry tilt of about 12.0 degrees" in msg and "dcm2niix" in msg


# --------------------------------------------------------------------------- header-only grid (read_grid)


def _refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as exc:
        fn(*args, **kwargs)
    return str(exc.value)


def assert_same_grid(grid, vol: Volume) -> None:
    assert grid.shape == vol.shape
    np.testing.assert_allclose(grid.spacing, vol.spacing, atol=1e-9)
    np.testing.assert_allclose(grid.origin, vol.origin, atol=1e-6)
    np.testing.assert_allclose(grid.direction, vol.direction, atol=1e-12)


@pytest.mark.parametrize("oblique", [0.0, 0.05])
def test_header_grid_is_the_loaded_volumes_grid_in_every_orientation(oblique):
    import itertools

    from liverlesion.io.common import header_grid, sitk_to_volume

    turn = np.array(
        [[np.cos(oblique), -np.sin(oblique), 0], [np.sin(oblique), np.cos(oblique), 0], [0, 0, 1]]
    )
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            direction = np.zeros((3, 3))
            for j, (i, sign) in enumerate(zip(perm, signs, strict=True)):
                direction[i, j] = sign
            direction = turn @ direction
            size, spacing, origin = (3, 4, 5), (0.7, 0.9, 2.5), (12.5, -40.0, 7.25)
            img = sitk.Image(list(size), sitk.sitkInt16)
            img.SetSpacing(spacing)
            img.SetOrigin(origin)
            img.SetDirection(tuple(direction.ravel()))
            assert_same_grid(header_grid(size, spacing, origin, direction), sitk_to_volume(img, {}))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_read_grid_of_a_file_is_the_full_reads_grid(tmp_path, tiny_ct, suffix):
    from liverlesion.io import read_grid

    image, _ = tiny_ct
    flipped = Volume(image.array, image.spacing, (3.0, -7.5, 40.0), np.diag([-1.0, 1.0, -1.0]))
    path = write_volume(flipped, tmp_path / f"ct{suffix}")
    assert_same_grid(read_grid(path), read_volume(path))


def test_read_grid_of_dicom_series_is_the_full_reads_grid(tmp_path, tiny_ct):
    from liverlesion.io import read_grid

    image, _ = tiny_ct
    sagittal = np.column_stack([(0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)])
    for name, source in [
        ("axial", image),
        ("sag", Volume(image.array, image.spacing, (50.0, -20.0, 80.0), sagittal)),
    ]:
        write_dicom_series(source, tmp_path / name)
        assert_same_grid(read_grid(tmp_path / name), read_volume(tmp_path / name))
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        for f in (tmp_path / "axial").iterdir():
            zf.write(f, f.name)
    assert (
        read_grid(tmp_path / "s.zip") is None
    )  # the headers are inside compressed entries: left to the full read


def test_read_grid_refuses_what_the_full_read_refuses_with_its_message(tmp_path, tiny_ct, monkeypatch):
    """2-D, 4-D, truncated, sheared, not an image, a cut-short zip, a truncated DICOM slice: the same one
    line, and no voxel decoded."""
    import liverlesion.io.itk as itk_module
    from liverlesion.io import read_grid

    image, _ = tiny_ct
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(tmp_path / "slice.nii.gz"))
    sitk.WriteImage(sitk.Image([8, 8, 4, 3], sitk.sitkInt16), str(tmp_path / "phases.nii.gz"))
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorInt16, 3), str(tmp_path / "rgb.nrrd"))
    for suffix in (".nii", ".mha"):
        data = write_volume(image, tmp_path / f"whole{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[:-500])
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    affine[0, 1] = 0.5
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), affine), tmp_path / "sheared.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all" * 20)
    paths = write_dicom_series(image, tmp_path / "s", shuffle_names=False)
    paths[5].write_bytes(paths[5].read_bytes()[:-1000])
    with zipfile.ZipFile(tmp_path / "whole.zip", "w") as zf:
        zf.writestr("a.dcm", b"x" * 1000)
    (tmp_path / "cut.zip").write_bytes((tmp_path / "whole.zip").read_bytes()[:-40])
    names = [
        "slice.nii.gz", "phases.nii.gz", "rgb.nrrd", "cut.nii", "cut.mha", "sheared.nii.gz", "junk.nii.gz",
        "s", "cut.zip", "missing.nii.gz",
    ]  # fmt: skip
    expected = {n: _refusal(read_volume, tmp_path / n, name="manifest row 3 image") for n in names}
    monkeypatch.setattr(sitk, "ReadImage", lambda *a, **k: pytest.fail("read_grid decoded voxels"))
    monkeypatch.setattr(itk_module, "_check_nifti_finite", lambda *a: pytest.fail("read_grid read voxels"))
    for n in names:
        assert _refusal(read_grid, tmp_path / n, name="manifest row 3 image") == expected[n], n


def test_check_geometry_gives_one_message_for_grids_and_volumes(tmp_path, tiny_ct):
    from liverlesion.io import read_grid

    image, mask = tiny_ct
    write_volume(image, tmp_path / "ct.nii.gz")
    write_volume(Volume(mask.array[:, :-1], mask.spacing, (1.0, 2.0, 3.0)), tmp_path / "m.nii.gz")
    args = dict(image_name="manifest row 2 image", mask_name="manifest row 2 mask")
    on_headers = _refusal(
        check_geometry,
        read_grid(tmp_path / "ct.nii.gz"),
        read_grid(tmp_path / "m.nii.gz", kind="mask"),
        **args,
    )
    loaded = _refusal(
        check_geometry,
        read_volume(tmp_path / "ct.nii.gz"),
        read_volume(tmp_path / "m.nii.gz", kind="mask"),
        **args,
    )
    assert on_headers == loaded and "shape, origin" in loaded


@pytest.mark.realdata
def test_ircadb_patient1_grid_from_headers(ircad_patient1):
    from liverlesion.io import read_grid

    folder = ircad_patient1 / "PATIENT_DICOM"
    assert_same_grid(read_grid(folder), read_volume(folder))


@pytest.mark.parametrize("scaled", [False, True])
def test_signed_8_bit_ct_is_refused_unless_its_header_scales_it_to_hu(tmp_path, scaled):
    from liverlesion.io import read_grid

    a = np.random.default_rng(0).integers(-64, 127, (10, 32, 32)).astype(np.int8)
    img = nib.Nifti1Image(a, np.eye(4))
    if scaled:  # scl_slope 16, scl_inter -1024: the stored bytes are HU / 16
        img.header.set_slope_inter(16, -1024)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    if scaled:
        assert read_volume(path).array.min() < -1000 and read_grid(path).shape == (32, 32, 10)
        return
    for read in (read_volume, read_grid):  # the header check and the full read say the same
        with pytest.raises(UserError, match="stores signed 8-bit values .* re-export the CT with its 16-bit"):
            read(path)
