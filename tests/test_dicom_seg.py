"""DICOM SEG both ways: SEGs written with highdicom from fixtures, read back through every entry point.

Entry points: the library (``seg_labelmap`` / ``seg_mask`` / ``seg_lesions``), the manifest
(``lesion_table``), ``predict --mask SEG`` and ``predict --dicom-seg`` (written, then read back).
``serve`` (a SEG uploaded to the viewer or the form, the viewer's SEG download) is tested over HTTP
in ``test_viewer.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest

from helpers import build_seg, make_ct_with_two_lesions, make_tiny_checkpoint, write_dicom_series
from liverlesion.cli import main
from liverlesion.dicom_seg import seg_labelmap, seg_lesions, seg_mask
from liverlesion.errors import UserError
from liverlesion.io import read_volume, write_volume
from liverlesion.lesions import lesions_from_mask
from liverlesion.manifest_lesions import lesion_table
from liverlesion.seg_select import SEG_SOP_CLASS_UID, is_seg, parse_selector
from liverlesion.volume import Volume


def _sphere(shape, centre_zyx, radius_vox) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = centre_zyx
    return ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= radius_vox**2


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """A DICOM CT of two lesions, its masks, and a multi-segment SEG (Liver, Tumor_1, Tumor_2; liver overlaps)."""
    d = tmp_path_factory.mktemp("segstudy")
    image, mask = make_ct_with_two_lesions()
    files = write_dicom_series(image, d / "ct")
    big = mask.array.copy()
    big[_sphere(image.shape, (12, 12, 36), 3)] = 0  # the big sphere only
    small = (mask.array > 0) & ~(big > 0)
    liver = np.zeros(image.shape, bool)
    liver[2:22, 8:40, 8:44] = True
    seg = build_seg(files, {"Liver": liver, "Tumor_1": big, "Tumor_2": small}, d / "seg.dcm")
    return {
        "dir": d,
        "image": image,
        "files": files,
        "ct": d / "ct",
        "seg": seg,
        "big": big > 0,
        "small": small,
        "liver": liver,
    }


# --------------------------------------------------------------------------- reading


def test_detects_seg_by_sop_class(study, tmp_path):
    assert is_seg(study["seg"]) and pydicom.dcmread(study["seg"]).SOPClassUID == SEG_SOP_CLASS_UID
    renamed = tmp_path / "mask_without_suffix"
    renamed.write_bytes(study["seg"].read_bytes())
    assert is_seg(renamed)
    assert not is_seg(study["files"][0]) and not is_seg(study["ct"])
    nifti = write_volume(study["image"].with_array(study["big"].astype(np.uint8)), tmp_path / "m.nii.gz")
    assert not is_seg(nifti)


def test_selector_parsing():
    assert parse_selector(None) is None and parse_selector("") is None and parse_selector("0") is None
    assert parse_selector("2") == 2 and parse_selector(3) == 3 and parse_selector(" Tumor_1 ") == "Tumor_1"


def test_multi_segment_round_trip_by_number_and_label(study):
    ct = read_volume(study["ct"])
    labels, chosen = seg_labelmap(study["seg"], ct, "Tumor_1")
    assert [s.number for s in chosen] == [2] and labels.array.dtype == np.uint8
    np.testing.assert_array_equal(labels.array == 2, study["big"])
    assert not labels.array[~study["big"]].any()
    by_number, _ = seg_labelmap(study["seg"], ct, 3)
    np.testing.assert_array_equal(by_number.array == 3, study["small"])
    both, chosen = seg_labelmap(study["seg"], ct, "tumor*")  # a pattern, case-insensitive
    assert [s.label for s in chosen] == ["Tumor_1", "Tumor_2"]
    np.testing.assert_array_equal(both.array, study["big"] * 2 + study["small"] * 3)
    # same geometry and physical positions as the CT
    assert both.spacing == ct.spacing and both.origin == ct.origin


def test_lesions_refer_to_segments_and_keep_physical_positions(study):
    ct = read_volume(study["ct"])
    items = seg_lesions(ct, study["seg"], "Tumor*", "p1", "metastasis")
    reference = lesions_from_mask(
        ct, ct.with_array((study["big"] | study["small"]).astype(np.uint8)), None, "p1"
    )
    assert [les.label for les, _ in items] == [2, 3]
    for (got, gmask), (want, wmask) in zip(items, reference, strict=True):
        np.testing.assert_allclose(got.centroid_mm, want.centroid_mm, atol=1e-6)
        assert got.n_voxels == want.n_voxels and got.bbox_zyx == want.bbox_zyx
        np.testing.assert_array_equal(np.asarray(gmask), np.asarray(wmask))
    one = seg_lesions(ct, study["seg"], "Tumor_1", "p1")
    assert len(one) == 1 and one[0][0].label == 2


def test_seg_on_a_subset_of_slices(study, tmp_path):
    ct = read_volume(study["ct"])
    keep = list(range(8, 16))
    seg = build_seg(study["files"], {"Tumor_1": study["big"]}, tmp_path / "subset.dcm", slices=keep)
    assert pydicom.dcmread(seg).NumberOfFrames <= len(keep)
    labels, _ = seg_labelmap(seg, ct)
    want = np.zeros_like(study["big"])
    want[keep] = study["big"][keep]
    np.testing.assert_array_equal(labels.array == 1, want)


def test_fractional_seg(study, tmp_path):
    ct = read_volume(study["ct"])
    seg = build_seg(study["files"], {"Tumor_1": study["big"]}, tmp_path / "frac.dcm", fractional=True)
    labels, label = seg_mask(seg, ct, "Tumor_1")
    assert label == 1  # an exact label names one segment: one lesion
    assert seg_mask(seg, ct)[1] is None  # every segment: connected components
    np.testing.assert_array_equal(labels.array == 1, study["big"])


def test_flipped_series_is_placed_by_position(tmp_path):
    """Rows stored posterior-to-anterior: the canonical CT is flipped, the SEG must follow."""
    image, mask = make_ct_with_two_lesions()  # the small lesion is off-centre: a missed flip shows
    ny = image.shape[1]
    flipped = Volume(
        image.array[:, ::-1, :].copy(),
        image.spacing,
        tuple(image.index_to_physical([0, ny - 1, 0])),
        np.diag([1.0, -1.0, 1.0]),
    )
    files = write_dicom_series(flipped, tmp_path / "ct")
    seg = build_seg(files, {"Tumor": mask.array[:, ::-1, :]}, tmp_path / "seg.dcm")
    ct = read_volume(tmp_path / "ct")
    np.testing.assert_allclose(ct.origin, image.origin, atol=1e-4)  # canonical again
    labels, _ = seg_labelmap(seg, ct)
    np.testing.assert_array_equal(labels.array, mask.array)


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0])], ids=["LPS", "flipped-x-y"])
def test_segment_numbers_are_the_labels_on_the_ct_grid(tmp_path, direction):
    """Segments 1 and 5 (2..4 empty) of a series stored in either orientation: values = segment numbers."""
    from scipy import ndimage

    image, mask = make_ct_with_two_lesions()
    native = Volume(image.array, image.spacing, image.origin, direction, {"modality": "CT"})
    comp, _ = ndimage.label(mask.array > 0, structure=np.ones((3, 3, 3)))
    files = write_dicom_series(native, tmp_path / "dcm")
    empty = np.zeros(comp.shape, bool)
    segments = {
        "lesion 1": comp == 1,
        "lesion 2": empty,
        "lesion 3": empty,
        "lesion 4": empty,
        "lesion 5": comp == 2,
    }
    seg = build_seg(files, segments, tmp_path / "seg.dcm")
    ct = read_volume(tmp_path / "dcm")  # reoriented to LPS
    write_volume(native.with_array(np.where(comp == 2, 5, comp).astype(np.uint8)), tmp_path / "labels.nii.gz")
    expected = read_volume(tmp_path / "labels.nii.gz", kind="mask")  # the same reorientation
    got, chosen = seg_labelmap(seg, ct)
    assert [s.number for s in chosen] == [1, 2, 3, 4, 5]
    assert got.shape == ct.shape and np.array_equal(got.array, expected.array)
    assert set(np.unique(got.array)) == {0, 1, 5}


def test_nifti_ct_is_mapped_by_position_and_says_so(study, tmp_path, caplog):
    nifti = write_volume(read_volume(study["ct"]), tmp_path / "ct.nii.gz")
    ct = read_volume(nifti)
    with caplog.at_level(logging.WARNING, logger="liverlesion.dicom_seg"):
        labels, _ = seg_labelmap(study["seg"], ct, "Tumor_1")
    assert "cannot be checked" in caplog.text and "physical position" in caplog.text
    np.testing.assert_array_equal(labels.array == 2, study["big"])


# --------------------------------------------------------------------------- bad input


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_seg_of_another_series_is_refused_naming_both_uids(study, tmp_path):
    other = write_dicom_series(study["image"], tmp_path / "other")
    ct = read_volume(tmp_path / "other")
    seg_series = pydicom.dcmread(study["seg"]).ReferencedSeriesSequence[0].SeriesInstanceUID
    with pytest.raises(UserError) as exc:
        seg_labelmap(study["seg"], ct, name="--mask", image_name="--image")
    msg = _one_line(exc)
    assert seg_series in msg and ct.dicom.series_instance_uid in msg and str(study["seg"]) in msg
    assert other  # the series exists; only the reference differs


def test_seg_without_segments_is_refused(study, tmp_path):
    ds = pydicom.dcmread(study["seg"])
    ds.SegmentSequence = []
    bad = tmp_path / "empty.dcm"
    ds.save_as(bad)
    ct = read_volume(study["ct"])
    with pytest.raises(UserError) as exc:
        seg_labelmap(bad, ct)
    assert "no segments" in _one_line(exc) and str(bad) in str(exc.value)


def test_overlapping_segments_are_refused_naming_them(study):
    ct = read_volume(study["ct"])
    with pytest.raises(UserError) as exc:
        seg_labelmap(study["seg"], ct)  # every segment: the liver holds the tumours
    msg = _one_line(exc)
    assert "overlap" in msg and "'Liver'" in msg and "'Tumor_1'" in msg


def test_overlapping_segments_of_one_label_are_refused(study, tmp_path):
    seg = build_seg(study["files"], {"Tumor": study["big"], "tumor": study["big"]}, tmp_path / "dup.dcm")
    ct = read_volume(study["ct"])
    with pytest.raises(UserError, match="overlap"):
        seg_labelmap(seg, ct, "Tumor")
    labels, _ = seg_labelmap(seg, ct, 2)  # one of them by number is fine
    np.testing.assert_array_equal(labels.array == 2, study["big"])


def test_unknown_segment_lists_the_segments(study):
    ct = read_volume(study["ct"])
    with pytest.raises(UserError) as exc:
        seg_labelmap(study["seg"], ct, "Kidney")
    msg = _one_line(exc)
    assert "'Kidney'" in msg and "1 'Liver'" in msg and "3 'Tumor_2'" in msg
    with pytest.raises(UserError, match="segment number 9"):
        seg_labelmap(study["seg"], ct, 9)


def test_frame_off_the_grid_is_refused(study, tmp_path):
    ds = pydicom.dcmread(study["seg"])
    for item in ds.PerFrameFunctionalGroupsSequence:
        pos = item.PlanePositionSequence[0]
        pos.ImagePositionPatient = [float(pos.ImagePositionPatient[0]) + 0.5, *pos.ImagePositionPatient[1:]]
    bad = tmp_path / "shifted.dcm"
    ds.save_as(bad)
    with pytest.raises(UserError) as exc:
        seg_labelmap(bad, read_volume(study["ct"]), "Tumor_1")
    assert "off the CT voxel grid" in _one_line(exc)


def test_truncated_seg_is_refused(study, tmp_path):
    data = study["seg"].read_bytes()
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(data[: len(data) - 2000])
    with pytest.raises(UserError) as exc:
        seg_labelmap(bad, read_volume(study["ct"]), "Tumor_1")
    _one_line(exc)


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_seg_cut_before_its_pixels_is_named_truncated(study, tmp_path, keep):
    """pydicom reads a file cut short up to where it ends: the rest looked like 'no segments' or a
    highdicom AttributeError ('not a valid DICOM SEG'), never like the interrupted copy it is."""
    data = study["seg"].read_bytes()
    pixels_at = data.rindex(b"\xe0\x7f\x10\x00")  # the PixelData tag (7FE0,0010), little endian
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(data[: int(pixels_at * keep)])
    assert is_seg(bad)  # also when the cut falls inside SOPClassUID: the file meta says SEG
    with pytest.raises(UserError) as exc:
        seg_labelmap(bad, read_volume(study["ct"]), "Tumor_1")
    msg = _one_line(exc)
    assert "ends before its pixel data" in msg and "truncated" in msg and str(bad) in msg


# --------------------------------------------------------------------------- manifest


def _manifest(folder: Path, rows: list[str]) -> Path:
    m = folder / "manifest.csv"
    m.write_text("patient_id,image,mask,label,lesion_class\n" + "\n".join(rows) + "\n")
    return m


def test_manifest_rows_select_segments(study):
    d = study["dir"]
    from liverlesion.manifest import read_manifest, write_manifest

    m = _manifest(d, ["p1,ct,seg.dcm,Tumor*,metastasis"])
    table = lesion_table(m, progress=False)
    assert list(table["lesion_id"]) == ["p1-L01", "p1-L02"] and list(table["label"]) == [2, 3]
    assert list(table["n_voxels"]) == [int(study["big"].sum()), int(study["small"].sum())]
    m = _manifest(d, ["p1,ct,seg.dcm,Tumor_1,metastasis", "p1,ct,seg.dcm,3,cyst"])
    df = read_manifest(m)
    assert list(df["label"]) == ["Tumor_1", 3]
    table = lesion_table(df, progress=False)
    assert list(table["label"]) == [2, 3] and list(table["lesion_class"]) == ["metastasis", "cyst"]
    out = write_manifest(df, d / "copy.csv")
    assert "Tumor_1" in out.read_text() and list(read_manifest(out)["label"]) == ["Tumor_1", 3]
    with pytest.raises(UserError, match="covers"):  # the liver segment is not a lesion mask
        lesion_table(_manifest(d, ["p1,ct,seg.dcm,Liver,metastasis"]), progress=False)


def test_manifest_refuses_bad_segment_before_any_work(study):
    m = _manifest(study["dir"], ["p1,ct,seg.dcm,Kidney,metastasis"])
    from liverlesion.manifest import read_manifest

    with pytest.raises(UserError) as exc:
        read_manifest(m)
    assert "row 1" in _one_line(exc) and "'Kidney'" in str(exc.value)


def test_manifest_text_label_needs_a_seg(study, tmp_path):
    write_volume(study["image"].with_array(study["big"].astype(np.uint8)), study["dir"] / "m.nii.gz")
    m = _manifest(study["dir"], ["p1,ct,m.nii.gz,Tumor_1,metastasis"])
    from liverlesion.manifest import read_manifest

    with pytest.raises(UserError, match="DICOM SEG mask only"):
        read_manifest(m)


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "a.pt", 0)


def test_predict_with_seg_mask_and_dicom_seg_round_trip(study, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", "--model", str(ckpt), "--image", str(study["ct"]), "--mask", str(study["seg"])]
    assert (
        main([*args, "--label", "Tumor*", "--out", str(out), "--dicom-seg", "--dicom-sr", "--no-gradcam"])
        == 0
    )
    capsys.readouterr()
    import pandas as pd

    results = pd.read_csv(out / "results.csv")
    assert list(results["label"]) == [2, 3]
    written = out / "segmentation.dcm"
    ct = read_volume(study["ct"])
    ds = pydicom.dcmread(written)
    assert ds.SOPClassUID == SEG_SOP_CLASS_UID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.dicom.series_instance_uid
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["case-L01", "case-L02"]
    # every frame sits on its CT slice, and references that slice's instance
    for item in ds.PerFrameFunctionalGroupsSequence:
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        z = ct.physical_to_index(ipp)
        np.testing.assert_allclose(z, np.round(z), atol=1e-6)
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert uid == ct.dicom.sop_instance_uids[int(round(z[0]))]
    # read it back: the same masks
    labels, _ = seg_labelmap(written, ct)
    np.testing.assert_array_equal(labels.array, study["big"] * 1 + study["small"] * 2)
    # the SR refers to each segment, with the SEG's tracking UIDs
    sr = pydicom.dcmread(out / "report.dcm")
    text = str(sr)
    assert ds.SOPInstanceUID in text
    for seg_item in ds.SegmentSequence:
        assert seg_item.TrackingUID in text


def test_predict_dicom_seg_of_a_click_holds_the_estimated_mask(study, ckpt, tmp_path, capsys):
    ct = read_volume(study["ct"])
    point = ",".join(f"{v:.3f}" for v in ct.index_to_physical((11.5, 23.5, 23.5)))
    out = tmp_path / "click"
    args = [
        "predict",
        "--model",
        str(ckpt),
        "--image",
        str(study["ct"]),
        "--point",
        point,
        "--diameter",
        "12",
    ]
    assert main([*args, "--out", str(out), "--dicom-seg", "--no-gradcam"]) == 0
    capsys.readouterr()
    ds = pydicom.dcmread(out / "segmentation.dcm")
    assert ds.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    labels, _ = seg_labelmap(out / "segmentation.dcm", ct)
    import pandas as pd

    assert int((labels.array == 1).sum()) == int(pd.read_csv(out / "results.csv")["n_voxels"].iloc[0])
    assert not (out / "report.dcm").exists()


def test_predict_manifest_with_seg_writes_one_seg_per_image(study, ckpt, tmp_path, capsys):
    m = _manifest(study["dir"], ["p1,ct,seg.dcm,Tumor_1,metastasis"])
    out = tmp_path / "batch"
    assert (
        main(
            [
                "predict",
                "--model",
                str(ckpt),
                "--manifest",
                str(m),
                "--out",
                str(out),
                "--dicom-seg",
                "--no-gradcam",
            ]
        )
        == 0
    )
    capsys.readouterr()
    written = sorted((out / "segmentations").iterdir())
    assert [p.name for p in written] == ["p1_1.dcm"]
    labels, _ = seg_labelmap(written[0], read_volume(study["ct"]))
    np.testing.assert_array_equal(labels.array == 1, study["big"])


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--label", "Kidney"], "'Kidney'"),
        (["--label", "abc", "--mask-nifti"], "not an integer"),
        (["--dicom-seg", "--image-nifti"], "--dicom-seg needs a DICOM --image"),
        (["--swap"], "DICOM SEG object without an image"),  # the SEG in the --image slot
        (["--other-series"], "references series"),
        # TCIA's SEG folder (N.000000-Segmentation-NNNNN/1-1.dcm): was 'no DICOM image series found ... pass a
        # folder or .zip holding CT DICOM slices'
        (["--seg-folder"], "is a folder holding a DICOM SEG (1-1.dcm), not a mask series; pass the SEG file"),
    ],
)
def test_predict_bad_seg_input_is_one_line(study, ckpt, tmp_path, capsys, extra, fragment):
    image, mask = str(study["ct"]), str(study["seg"])
    if "--mask-nifti" in extra:
        mask = str(
            write_volume(study["image"].with_array(study["big"].astype(np.uint8)), tmp_path / "m.nii.gz")
        )
    if "--image-nifti" in extra:
        image = str(write_volume(read_volume(study["ct"]), tmp_path / "ct.nii.gz"))
    if "--swap" in extra:
        image, mask = mask, image
    if "--other-series" in extra:
        write_dicom_series(study["image"], tmp_path / "other")
        image = str(tmp_path / "other")
    if "--seg-folder" in extra:
        (tmp_path / "100.000000-Segmentation-53960").mkdir()
        mask = str(tmp_path / "100.000000-Segmentation-53960" / "1-1.dcm")
        Path(mask).write_bytes(study["seg"].read_bytes())
        mask = str(Path(mask).parent)
    extra = [
        e
        for e in extra
        if not e.startswith(("--mask-nifti", "--image-nifti", "--swap", "--other-series", "--seg-folder"))
    ]
    out = tmp_path / "out"
    rc = main(["predict", "--model", str(ckpt), "--image", image, "--mask", mask, *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and fragment in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    assert not out.exists()


def test_write_seg_without_per_slice_instances_places_frames_by_position(study, tmp_path):
    """A multi-frame source has no instance per array slice: frames are placed by the CT's affine."""
    from liverlesion.seg_write import write_seg

    ct = read_volume(study["ct"])
    ct.dicom = ct.dicom.replace(slices_along_array_z=False)
    ref = write_seg(ct, {"a": study["big"], "b": study["small"]}, tmp_path / "seg.dcm")
    assert ref.segments == {"a": 1, "b": 2}
    labels, _ = seg_labelmap(ref.path, read_volume(study["ct"]))
    np.testing.assert_array_equal(labels.array, study["big"] * 1 + study["small"] * 2)


def test_dicom_seg_needs_a_frame_of_reference(study, ckpt, tmp_path, capsys):
    """Some anonymised exports (3D-IRCADb-01) drop FrameOfReferenceUID: --dicom-seg is refused, nothing written."""
    files = write_dicom_series(study["image"], tmp_path / "nofor")
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    ct = read_volume(tmp_path / "nofor")
    point = ",".join(f"{v:.3f}" for v in ct.index_to_physical((11.5, 23.5, 23.5)))
    out = tmp_path / "out"
    args = ["predict", "--model", str(ckpt), "--image", str(tmp_path / "nofor"), "--point", point]
    rc = main([*args, "--diameter", "12", "--out", str(out), "--dicom-seg", "--no-gradcam"])
    err = capsys.readouterr().err
    assert rc != 0 and "no FrameOfReferenceUID" in err and "--dicom-sr works without it" in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1 and not out.exists()


def test_written_seg_has_the_physical_positions_highdicom_reads(study, tmp_path):
    """An independent reader (highdicom's own volume) finds each lesion voxel at the CT's LPS position."""
    import highdicom as hd

    from liverlesion.seg_write import write_seg

    ct = read_volume(study["ct"])
    ref = write_seg(ct, {"a": study["big"], "b": study["small"]}, tmp_path / "seg.dcm")
    seg = hd.seg.segread(ref.path)
    for number, mask in ((1, study["big"]), (2, study["small"])):
        vol = seg.get_volume(segment_numbers=[number])
        arr = vol.array[..., 0] if vol.array.ndim == 4 else vol.array
        idx = np.argwhere(arr)
        got = (vol.affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T
        want = ct.index_to_physical(np.argwhere(mask))

        def order(p):
            p = np.round(p, 3)
            return p[np.lexsort(p.T)]

        assert got.shape == want.shape
        np.testing.assert_allclose(order(got), order(want), atol=1e-3)
