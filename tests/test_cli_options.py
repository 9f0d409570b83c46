"""CLI options that reach the library: `patches --tolerance/--series/--overwrite`,
`predict --tolerance/--patient-id` and `inspect --tolerance`, on tiny synthetic CT."""

from __future__ import annotations

from pathlib import Path

import nibabel  # noqa: F401  (imported at collection: its log handler must not bind to a test's captured stderr)
import numpy as np
import pandas as pd
import pytest

from helpers import make_ct_array, make_tiny_checkpoint, torch_threads
from liverlesion.cli import main
from liverlesion.io import write_volume

# Mask origin off by this much (mm): refused at the default tolerance (0.001), accepted at 0.01.
SHIFT_MM = 0.004


def _run(args: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("liverlesion: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def cohort(tmp_path: Path) -> dict[str, Path]:
    """One patient as NIfTI: image, a mask on its grid, a mask shifted by SHIFT_MM, and manifests for both."""
    data = tmp_path / "data"
    image, mask = make_ct_array()
    write_volume(image, data / "ct.nii.gz")
    write_volume(mask, data / "mask.nii.gz")
    shifted = mask.with_array(mask.array)
    shifted.origin = tuple(o + d for o, d in zip(mask.origin, (SHIFT_MM, 0.0, 0.0), strict=True))
    write_volume(shifted, data / "mask_shifted.nii.gz")
    header = "patient_id,image,mask,label,lesion_class\n"
    (data / "manifest.csv").write_text(header + "p1,ct.nii.gz,mask.nii.gz,,cyst\n")
    (data / "shifted.csv").write_text(header + "p1,ct.nii.gz,mask_shifted.nii.gz,,cyst\n")
    return {
        "image": data / "ct.nii.gz",
        "mask": data / "mask.nii.gz",
        "shifted": data / "mask_shifted.nii.gz",
        "manifest": data / "manifest.csv",
        "shifted_manifest": data / "shifted.csv",
    }


SMALL_PATCHES = ["--set", "patch.size_px=16", "--set", "patch.neighbours=0"]


# --------------------------------------------------------------------------- patches


def test_patches_passes_tolerance_series_overwrite_to_build_patches(tmp_path, monkeypatch, capsys):
    import liverlesion.patch_cache as P

    seen = {}

    def fake_build(manifest, out, cfg, tolerance=1e-3, series=None, overwrite=False):
        seen.update(manifest=manifest, out=out, tolerance=tolerance, series=series, overwrite=overwrite)
        return Path(out) / "key"

    monkeypatch.setattr(P, "build_patches", fake_build)
    args = ["patches", tmp_path / "m.csv", tmp_path / "out", "--tolerance", "0.05", "--series", "1.2.3"]
    rc, out, err = _run([*args, "--overwrite"], capsys)
    assert rc == 0, err
    assert seen == {
        "manifest": tmp_path / "m.csv",
        "out": tmp_path / "out",
        "tolerance": 0.05,
        "series": "1.2.3",
        "overwrite": True,
    }
    rc, out, err = _run(["patches", tmp_path / "m.csv", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert (seen["tolerance"], seen["series"], seen["overwrite"]) == (1e-3, None, False)


def test_patches_tolerance_accepts_a_mask_off_by_rounding(cohort, tmp_path, capsys):
    out = tmp_path / "patches"
    rc, _, err = _run(["patches", cohort["shifted_manifest"], out, *SMALL_PATCHES], capsys)
    assert rc == 2
    assert "origin" in _one_error_line(err) and "--tolerance" in err
    assert not out.exists() or not any(p.name.endswith("index.csv") for p in out.rglob("*"))

    rc, stdout, err = _run(
        ["patches", cohort["shifted_manifest"], out, *SMALL_PATCHES, "--tolerance", "0.01"], capsys
    )
    assert rc == 0, err
    folder = Path(stdout.split("patches: ", 1)[1].split(" (", 1)[0])
    index = pd.read_csv(folder / "index.csv", dtype=str)
    assert list(index["lesion_id"]) == ["p1-L01"]


def test_patches_overwrite_recomputes_the_cache(cohort, tmp_path, capsys):
    out = tmp_path / "patches"
    assert _run(["patches", cohort["manifest"], out, *SMALL_PATCHES], capsys)[0] == 0
    rc, _, err = _run(["patches", cohort["manifest"], out, *SMALL_PATCHES], capsys)
    assert rc == 0 and "using cached patches" in err
    rc, _, err = _run(["patches", cohort["manifest"], out, *SMALL_PATCHES, "--overwrite"], capsys)
    assert rc == 0
    assert "using cached patches" not in err and "wrote 1 lesion patches" in err


def test_patches_series_must_be_in_the_dicom_folder(tmp_path, capsys):
    from helpers import write_dicom_series

    image, mask = make_ct_array()
    write_dicom_series(image, tmp_path / "dicom", series_uid="1.2.826.0.1.3680043.8.498.1")
    write_volume(mask, tmp_path / "mask.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,image,mask,label,lesion_class\np1,dicom,mask.nii.gz,,cyst\n")
    out = tmp_path / "patches"
    rc, _, err = _run(["patches", manifest, out, *SMALL_PATCHES, "--series", "1.2.3.999"], capsys)
    assert rc == 2
    line = _one_error_line(err)
    assert "1.2.3.999" in line and "1.2.826.0.1.3680043.8.498.1" in line
    rc, _, err = _run(
        ["patches", manifest, out, *SMALL_PATCHES, "--series", "1.2.826.0.1.3680043.8.498.1"], capsys
    )
    assert rc == 0, err


@pytest.mark.parametrize("command", ["patches", "inspect"])
@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bad_tolerance_is_one_line_and_writes_nothing(cohort, tmp_path, capsys, command, value):
    out = tmp_path / "out"
    args = [command, cohort["manifest"]]
    args += [out] if command == "patches" else ["--out", out / "lesions.csv"]
    rc, _, err = _run([*args, "--tolerance", value], capsys)
    assert rc == 2
    assert f"--tolerance {float(value)!r}" in _one_error_line(err)
    assert not out.exists()


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained 32 px checkpoint of timm's tiny ``test_resnet`` (the plumbing is under test, not accuracy)."""
    with torch_threads(1):
        return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", 0, size_px=32)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


def test_predict_passes_tolerance_and_patient_id(tmp_path, monkeypatch, capsys):
    import liverlesion.predict as predict

    seen = {}

    def fake_predict_cli(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(predict, "predict_cli", fake_predict_cli)
    base = [
        "predict",
        "--model",
        tmp_path / "m.pt",
        "--out",
        tmp_path / "o",
        "--image",
        tmp_path / "ct.nii.gz",
    ]
    rc, _, err = _run(
        [*base, "--point", "1,2,3", "--diameter", "8", "--tolerance", "0.02", "--patient-id", "P7"], capsys
    )
    assert rc == 0, err
    assert seen["tolerance"] == 0.02 and seen["patient_id"] == "P7"
    rc, _, err = _run([*base, "--point", "1,2,3", "--diameter", "8"], capsys)
    assert rc == 0, err
    assert seen["tolerance"] == 1e-3 and seen["patient_id"] is None


def _with_cohort(args: list, cohort: dict[str, Path]) -> list:
    """``args`` with the placeholders IMAGE, MASK, SHIFTED, MANIFEST, SHIFTED_MANIFEST as the cohort's paths."""
    return [cohort.get(a.lower(), a) if isinstance(a, str) and a.isupper() else a for a in args]


def test_predict_patient_id_names_the_lesions(cohort, checkpoint, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    args = _with_cohort(["predict", "--model", checkpoint, "--image", "IMAGE", "--mask", "MASK"], cohort)
    rc, stdout, err = _run([*args, "--out", out, "--patient-id", "P7", "--no-gradcam"], capsys)
    assert rc == 0, err
    results = pd.read_csv(out / "results.csv", dtype={"lesion_id": str, "patient_id": str})
    assert list(results["lesion_id"]) == ["P7-L01"]
    assert list(results["patient_id"]) == ["P7"]
    assert (out / "overlays" / "P7-L01.png").is_file()


@pytest.mark.parametrize(
    "source, lesion_id",
    [(["--image", "IMAGE", "--mask", "SHIFTED"], "case-L01"), (["--manifest", "SHIFTED_MANIFEST"], "p1-L01")],
    ids=["image", "manifest"],
)
def test_predict_tolerance_accepts_a_mask_off_by_rounding(
    cohort, checkpoint, tmp_path, capsys, one_thread, source, lesion_id
):
    args = _with_cohort(["predict", "--model", checkpoint, *source, "--no-gradcam"], cohort)
    rc, _, err = _run([*args, "--out", tmp_path / "strict"], capsys)
    assert rc == 2
    assert "origin" in _one_error_line(err)
    assert not (tmp_path / "strict").exists()
    rc, _, err = _run([*args, "--out", tmp_path / "loose", "--tolerance", "0.01"], capsys)
    assert rc == 0, err
    assert list(pd.read_csv(tmp_path / "loose" / "results.csv", dtype=str)["lesion_id"]) == [lesion_id]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--manifest", "MANIFEST", "--patient-id", "P7"], "--patient-id 'P7': applies to --image only"),
        (["--image", "IMAGE", "--mask", "MASK", "--patient-id", "  "], "--patient-id '': must not be empty"),
        (["--image", "IMAGE", "--mask", "MASK", "--tolerance", "-0.5"], "--tolerance -0.5"),
    ],
)
def test_predict_bad_patient_id_or_tolerance(cohort, checkpoint, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    rc, _, err = _run(
        _with_cohort(["predict", "--model", checkpoint, "--out", out, "--no-gradcam", *extra], cohort), capsys
    )
    assert rc == 2
    assert fragment in _one_error_line(err)
    assert not out.exists()
    assert np.all([not p.name.startswith(".out.") for p in tmp_path.iterdir()])
