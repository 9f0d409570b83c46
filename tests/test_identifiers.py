"""No patient identifiers where they don't belong.

A tiny cohort is written as DICOM series whose PatientName, PatientID, PatientBirthDate,
AccessionNumber and InstitutionName hold distinctive values. Every command a user runs on it
(inspect, patches, cv, predict with and without --dicom-sr, export, serve) must keep those
values out of stdout, stderr, log records and warnings, and out of every file it writes:
CSV, JSON, YAML, PNG (bytes and text chunks), HTML, logs, checkpoints, ONNX, npz caches, and
out of what is left in the temporary folder (extracted zips, uploads).
Only DICOM objects (the SR, the SEG) may hold them, because the standard requires the patient
module there; they are also the positive control that shows the scanner finds them.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import logging
import re
import tempfile
import threading
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import http_post, make_ct_array, multipart_body, torch_threads, write_dicom_series
from liverlesion.cli import main
from liverlesion.io import read_volume, write_volume
from liverlesion.volume import Volume

IDENTIFIERS = {
    "PatientName": "Quaxworth^Zebulonia",
    "PatientID": "PIDQ7Z31X",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACCZ90Q12",
    "InstitutionName": "Xylophant Memorial Hospital",
}
# The values and the forms they could be rewritten into (name parts, a formatted date).
NEEDLES = sorted({*IDENTIFIERS.values(), "Quaxworth", "Zebulonia", "1923-04-17", "Xylophant"}, key=str.lower)

TINY_CV = [
    "--folds", "2",
    "--no-baselines",
    "--set", "model.backbone=test_resnet",
    "--set", "model.weights=none",
    "--set", "model.head_hidden=16",
    "--set", "model.tta=none",
    "--set", "patch.size_px=32",
    "--set", "train.epochs=1",
    "--set", "train.probe_epochs=2",
    "--set", "train.aug_views=1",
    "--set", "train.batch_size=8",
    "--set", "eval.n_bootstrap=10",
    "--set", "eval.gradcam_max=2",
]  # fmt: skip


# --------------------------------------------------------------------------- the scanner


def _expand(name: str, data: bytes, depth: int = 0):
    """``(where, bytes)`` for a file and what it packs: zip members (.pt, .npz), gzip, PNG text."""
    yield name, data
    if depth > 3:
        return
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                yield from _expand(f"{name}!{info.filename}", zf.read(info), depth + 1)
    elif data[:2] == b"\x1f\x8b":
        yield from _expand(f"{name}!gunzip", gzip.decompress(data), depth + 1)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            text = json.dumps({str(k): str(v) for k, v in im.info.items()})
        yield f"{name}!png-text", text.encode()


def _leaks_in(where: str, data: bytes) -> list[str]:
    found = []
    low = data.lower()
    for needle in NEEDLES:
        for enc in ("utf-8", "utf-16-le"):
            if needle.lower().encode(enc) in low:
                found.append(f"{where}: {needle!r} ({enc})")
    return found


def _is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def scan_tree(root: Path, allow_empty: bool = False) -> tuple[list[str], list[Path]]:
    """Leaks in every file under ``root``, and the DICOM files (allowed to hold identifiers)."""
    leaks, dicom = [], []
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files or allow_empty, f"nothing written under {root}"
    for path in files:
        data = path.read_bytes()
        if _is_dicom(data):
            dicom.append(path)
            continue
        for where, blob in _expand(str(path.relative_to(root)), data):
            leaks += _leaks_in(where, blob)
    return leaks, dicom


def scan_text(where: str, text: str) -> list[str]:
    return _leaks_in(where, text.encode())


@pytest.fixture
def watch(capfd, caplog, tmp_path, monkeypatch):
    """Collects everything a command says (stdout, stderr, every liverlesion log record, warnings).

    The temporary folder is a private one here; afterwards it must hold no DICOM file and no identifier.
    """
    tmp = tmp_path / "TMPDIR"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    caplog.set_level(logging.DEBUG, logger="liverlesion")

    def said() -> list[str]:
        out, err = capfd.readouterr()
        return scan_text("stdout", out) + scan_text("stderr", err) + scan_text("log", caplog.text)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield said
    assert not scan_text("warnings", "\n".join(str(w.message) for w in caught))
    leaks, dicom = scan_tree(tmp, allow_empty=True)
    assert not leaks and not dicom, (leaks, dicom)


# --------------------------------------------------------------------------- the cohort


def _two_lesion_ct(seed: int) -> tuple[Volume, Volume]:
    """A tiny CT with a cyst (label 1, 5 HU) left and a metastasis (label 2, 55 HU) right of centre."""
    image, mask = make_ct_array(lesion_hu=5.0, seed=seed, center_zyx=(11.5, 23.5, 14.0), lesion_radius_mm=5.5)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=float) for n in image.shape], indexing="ij")
    radius = 5.0 + seed % 3
    met = (
        sum(
            ((g - c) * sp) ** 2
            for g, c, sp in zip((zz, yy, xx), (11.5, 23.5, 34.0), image.spacing, strict=True)
        )
        <= radius**2
    )
    image.array[met] = 55.0
    labels = mask.array.copy()
    labels[met] = 2
    return image, image.with_array(labels)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """6 patients with a cyst and a metastasis each, as identifying DICOM series.

    Patient 1's image is a zip of its series and its mask a DICOM series too (with the same tags);
    the others have NIfTI masks. Folder names say nothing about the patient.
    """
    root = tmp_path_factory.mktemp("ids") / "cohort"
    rows = []
    for i in range(6):
        image, mask = _two_lesion_ct(seed=i)
        series = root / f"ct{i}"
        write_dicom_series(image, series, tags=IDENTIFIERS, seed=i)
        image_ref = f"ct{i}"
        if i == 1:
            with zipfile.ZipFile(root / "ct1.zip", "w") as zf:
                for f in sorted(series.iterdir()):
                    zf.write(f, f"series/{f.name}")
            image_ref = "ct1.zip"
            write_dicom_series(mask, root / "mask1", intercept=0.0, tags=IDENTIFIERS)
            mask_ref = "mask1"
        else:
            write_volume(mask, root / f"mask{i}.nii.gz")
            mask_ref = f"mask{i}.nii.gz"
        for label, cls in ((1, "cyst"), (2, "metastasis")):
            rows.append(
                {
                    "patient_id": f"P{i}",
                    "image": image_ref,
                    "mask": mask_ref,
                    "label": label,
                    "lesion_class": cls,
                }
            )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


@contextlib.contextmanager
def recording():
    """Python-level stdout, stderr, liverlesion log records (DEBUG up) and warnings of a block, as text."""
    out, err, logs = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logger = logging.getLogger("liverlesion")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    said: dict[str, str] = {}
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            warnings.simplefilter("always")
            yield said
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        said.update(
            stdout=out.getvalue(),
            stderr=err.getvalue(),
            log=logs.getvalue(),
            warnings="\n".join(str(w.message) for w in caught),
        )


@pytest.fixture(scope="module")
def cv_run(cohort, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tiny 2-fold cv on the cohort, and what it said."""
    run = tmp_path_factory.mktemp("ids_cv") / "run"
    with torch_threads(1), recording() as said:
        rc = main(["cv", str(cohort / "manifest.csv"), str(run), *TINY_CV])
    assert rc == 0, said
    return run, said


def _assert_clean(leaks: list[str]) -> None:
    assert not leaks, "patient identifiers found:\n" + "\n".join(leaks[:20])


# --------------------------------------------------------------------------- the reader itself


def test_volume_repr_and_masks_carry_no_header(cohort):
    vol = read_volume(cohort / "ct0")
    text = repr(vol) + str(vol) + repr(vol.dicom) + str(vol.meta)
    _assert_clean(scan_text("repr", text))
    assert "UID" not in text and vol.dicom.series_instance_uid not in text
    assert re.fullmatch(
        r"Volume\(shape \(z,y,x\) \(24, 48, 48\), spacing \(z,y,x\) \(2\.5, 1, 1\) mm, "
        r"origin \(x,y,z\) \(-24, -24, 100\) mm, orientation LPS, HU -?\d+(\.\d+)?\.\.\d+(\.\d+)? \(float32\), "
        r"format dicom, DICOM reference withheld\)",
        repr(vol),
    ), repr(vol)
    assert str(vol.dicom.header.PatientName) == IDENTIFIERS["PatientName"]  # still there for the SR writer
    mask = vol.with_array((vol.array > 0).astype("uint8"))
    assert mask.dicom is None
    assert "values 0..1 (uint8)" in repr(mask)
    # The zip reader's volume and a DICOM mask series read the same way.
    for v in (read_volume(cohort / "ct1.zip"), read_volume(cohort / "mask1", kind="mask")):
        _assert_clean(scan_text("repr", repr(v) + str(v.meta)))


def test_volume_repr_names_the_orientation():
    image, _ = make_ct_array(shape=(4, 6, 8))
    assert "orientation LPS," in repr(image)
    flipped = Volume(image.array, image.spacing, image.origin, np.diag([-1.0, 1.0, -1.0]))
    assert "orientation RPI," in repr(flipped)
    t = np.deg2rad(10)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    assert "orientation LPS (oblique)," in repr(Volume(image.array, image.spacing, image.origin, rot))
    sagittal = np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]])  # x->P, y->I, z->R
    assert "orientation PIR," in repr(Volume(image.array, image.spacing, image.origin, sagittal))


def test_scanner_finds_identifiers(cohort, tmp_path):
    """The checks below can fail: the scanner finds each value in plain, packed and PNG-text form."""
    from PIL import Image, PngImagePlugin

    (tmp_path / "a.csv").write_text(f"x,{IDENTIFIERS['AccessionNumber']}\n")
    with zipfile.ZipFile(tmp_path / "b.pt", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.pkl", IDENTIFIERS["PatientID"].encode())
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", IDENTIFIERS["InstitutionName"], zip=True)
    Image.new("L", (4, 4)).save(tmp_path / "c.png", pnginfo=info)
    (tmp_path / "d.json").write_bytes(json.dumps({"n": "Quaxworth Zebulonia"}).encode("utf-16-le"))
    leaks, dicom = scan_tree(tmp_path)
    assert {w.split(":")[0].split("!")[0] for w in leaks} == {"a.csv", "b.pt", "c.png", "d.json"}
    assert not dicom
    leaks, dicom = scan_tree(cohort / "ct0")
    assert not leaks and len(dicom) == 24
    assert _leaks_in("x", dicom[0].read_bytes())  # the source files do hold them


# --------------------------------------------------------------------------- the commands


def test_inspect_and_patches(cohort, tmp_path, watch):
    out = tmp_path / "out"
    assert main(["inspect", str(cohort / "manifest.csv"), "--out", str(out / "lesions.csv")]) == 0
    assert (
        main(["patches", str(cohort / "manifest.csv"), str(out / "patches"), "--set", "patch.size_px=32"])
        == 0
    )
    assert len(pd.read_csv(out / "lesions.csv")) == 12
    leaks, dicom = scan_tree(out)
    _assert_clean(leaks + watch())
    assert not dicom
    assert list((out / "patches").rglob("*.npz")) and list((out / "patches").rglob("provenance.json"))


def test_cv(cv_run):
    run, said = cv_run
    leaks, dicom = scan_tree(run)
    for stream, text in said.items():
        leaks += scan_text(stream, text)
    _assert_clean(leaks)
    assert not dicom
    assert (run / "predictions.csv").is_file() and list(run.rglob("*.pt")) and list(run.rglob("*.html"))
    assert list(run.rglob("*.png")) and list(run.rglob("*.yaml"))
    assert said["stdout"] or said["stderr"]  # it did say something


def test_predict_without_and_with_dicom_sr(cohort, cv_run, tmp_path, watch):
    model = str(cv_run[0] / "fold_0" / "model.pt")
    out = tmp_path / "out"
    common = ["--model", model, "--image", str(cohort / "ct3"), "--mask", str(cohort / "mask3.nii.gz")]
    assert main(["predict", *common, "--out", str(out / "plain")]) == 0
    assert main(["predict", *common, "--out", str(out / "sr"), "--dicom-sr", "--dicom-seg"]) == 0
    # a batch from the manifest: the zipped series and the DICOM mask
    assert (
        main(
            [
                "predict",
                "--model",
                model,
                "--manifest",
                str(cohort / "manifest.csv"),
                "--out",
                str(out / "batch"),
                "--dicom-sr",
                "--dicom-seg",
            ]
        )
        == 0
    )
    leaks, dicom = scan_tree(out)
    _assert_clean(leaks + watch())
    assert list((out / "plain").rglob("*.png")) and (out / "plain" / "results.json").is_file()
    assert dicom and all(p.suffix == ".dcm" for p in dicom)
    assert all(_leaks_in(str(p), p.read_bytes()) for p in dicom)  # the SR and SEG copy the patient module
    assert list(out.rglob("segmentation.dcm")) and list(out.rglob("segmentations/*.dcm"))


def test_export(cv_run, tmp_path, watch):
    onnx = tmp_path / "model.onnx"
    with torch_threads(1):
        assert (
            main(["export", "--model", str(cv_run[0] / "fold_0" / "model.pt"), "--format", "onnx", str(onnx)])
            == 0
        )
    leaks, dicom = scan_tree(tmp_path)
    _assert_clean(leaks + watch())
    assert onnx.stat().st_size > 0 and not dicom


def test_serve(cohort, cv_run, tmp_path, watch):
    from liverlesion.serve import make_server

    image = ("ct1.zip", (cohort / "ct1.zip").read_bytes())
    mask1 = tmp_path / "mask1.nii.gz"
    write_volume(read_volume(cohort / "mask1", kind="mask"), mask1)
    good, ctype = multipart_body(
        {"min_size_mm": "5"}, {"image": image, "mask": ("mask1.nii.gz", mask1.read_bytes())}
    )
    # an error path: the click lies outside the image
    bad, ctype_bad = multipart_body({"point": "900,900,900", "diameter": "10"}, {"image": image})
    responses = []
    with torch_threads(1):
        server = make_server(
            [cv_run[0] / "fold_0" / "model.pt"], host="127.0.0.1", port=0, max_upload_bytes=50_000_000
        )
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            for path, body, ct in [
                ("/api/predict", good, ctype),
                ("/predict", good, ctype),
                ("/api/predict", bad, ctype_bad),
                ("/predict", bad, ctype_bad),
            ]:
                responses.append((path, *http_post(url + path, body, ct)))
            with urllib.request.urlopen(url + "/", timeout=10) as r:
                responses.append(("/", r.status, r.read()))
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
    assert [s for _, s, _ in responses] == [200, 200, 400, 400, 200], [
        (p, s, b[:300]) for p, s, b in responses
    ]
    leaks = []
    for path, _, body in responses:
        leaks += _leaks_in(path, body)
        # inline PNGs and the JSON download, decoded
        for m in re.finditer(rb"data:[a-z/]+;base64,([A-Za-z0-9+/=]+)", body):
            for where, blob in _expand(f"{path} inline", base64.b64decode(m.group(1))):
                leaks += _leaks_in(where, blob)
    _assert_clean(leaks + watch())
    assert b"data:image/png;base64," in responses[1][2]


def test_serve_viewer(cohort, cv_run, tmp_path, watch):
    """The viewer's answers on a DICOM study: study info, slices, results, overlays, downloads (not the SR)."""
    from liverlesion.serve import make_server

    image = ("ct1.zip", (cohort / "ct1.zip").read_bytes())
    mask1 = tmp_path / "mask1.nii.gz"
    write_volume(read_volume(cohort / "mask1", kind="mask"), mask1)
    body, ctype = multipart_body({}, {"image": image, "mask": ("mask1.nii.gz", mask1.read_bytes())})
    responses = []
    with torch_threads(1):
        server = make_server([cv_run[0] / "fold_0" / "model.pt"], host="127.0.0.1", port=0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            status, info = http_post(url + "/api/studies", body, ctype)
            assert status == 201, info
            responses.append(("/api/studies", info))
            study = f"{url}/api/studies/{json.loads(info)['study_id']}"
            status, res = http_post(study + "/classify?wait=1", b'{"all": true}', "application/json")
            assert status == 200, res
            responses.append(("classify", res))
            lid = json.loads(res)["lesions"][0]["lesion_id"]
            paths = [
                "",
                "/slice/5.png",
                f"/lesions/{lid}/overlay.png?gradcam=1",
                "/results.csv",
                "/results.json",
            ]
            for p in paths:
                with urllib.request.urlopen(study + p, timeout=60) as r:
                    responses.append((p or "study", r.read()))
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
    leaks = []
    for path, data in responses:
        for where, blob in _expand(path, data):
            leaks += _leaks_in(where, blob)
    _assert_clean(leaks + watch())


# --------------------------------------------------------------------------- UIDs outside DICOM objects


def _source_uids(folder: Path) -> set[str]:
    """The SOP, series, study and frame-of-reference UIDs of a DICOM series (identifying outside DICOM)."""
    import pydicom

    uids = set()
    for f in folder.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        uids |= {str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)}
        uids.add(str(ds.FrameOfReferenceUID))
    return uids


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained 32-px checkpoint: enough for predict's plumbing (no cv needed)."""
    from helpers import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ids_model") / "model.pt", seed=0, size_px=32)


def test_sr_and_seg_writers_log_no_uid(cohort, tiny_model, tmp_path, caplog):
    """highdicom logs, at INFO, the SOPInstanceUID it copies the patient module from: with the root
    logger at DEBUG (``serve``'s log is at INFO, a Python caller's may be anything) no record of the
    SR/SEG writers may carry a source UID or tag value."""
    caplog.set_level(logging.DEBUG)  # the root logger: every library's records
    common = [
        "--model",
        str(tiny_model),
        "--image",
        str(cohort / "ct3"),
        "--mask",
        str(cohort / "mask3.nii.gz"),
    ]
    with torch_threads(1):
        rc = main(
            ["predict", *common, "--out", str(tmp_path / "out"), "--dicom-sr", "--dicom-seg", "--no-gradcam"]
        )
    assert rc == 0
    assert (tmp_path / "out" / "report.dcm").is_file() and (tmp_path / "out" / "segmentation.dcm").is_file()
    text = "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records)
    found = sorted(u for u in _source_uids(cohort / "ct3") if u in text)
    _assert_clean(scan_text("log", text) + [f"log: UID {u}" for u in found])
    assert logging.getLogger("highdicom").level == logging.NOTSET  # restored


def test_chosen_series_uid_stays_out_of_output_files(cohort, tiny_model, tmp_path, watch):
    """``--series UID`` picks a series of a folder holding two; the UID may be typed and listed in the
    error that names the series, but results.json and the patch cache's provenance record only that
    one was chosen."""
    import pydicom

    folder = tmp_path / "two"
    folder.mkdir()
    for i in (0, 3):
        for f in (cohort / f"ct{i}").iterdir():
            (folder / f"s{i}_{f.name}").write_bytes(f.read_bytes())
    uid = str(pydicom.dcmread(next((cohort / "ct0").iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "patient_id,image,mask,label,lesion_class\n"
        f"P0,{folder},{cohort / 'mask0.nii.gz'},1,cyst\nP0,{folder},{cohort / 'mask0.nii.gz'},2,metastasis\n"
    )
    out = tmp_path / "out"
    common = ["--series", uid, "--set", "patch.size_px=32"]
    assert main(["patches", str(manifest), "--out", str(out / "patches"), *common]) == 0
    with torch_threads(1):
        rc = main(
            [
                "predict",
                "--model", str(tiny_model),
                "--image", str(folder),
                "--series", uid,
                "--mask", str(cohort / "mask0.nii.gz"),
                "--out", str(out / "pred"),
                "--no-gradcam",
            ]
        )  # fmt: skip
    assert rc == 0
    leaks, _ = scan_tree(out)
    leaks += [
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and uid.encode() in p.read_bytes()
    ]
    _assert_clean(leaks + watch())
    assert (
        json.loads((out / "pred" / "results.json").read_text())["inputs"]["series"] == "given (UID withheld)"
    )
    (prov,) = (out / "patches").rglob("provenance.json")
    assert json.loads(prov.read_text())["series"] == "given (UID withheld)"
