"""The viewer's API over HTTP (loopback only): studies kept loaded, slices, clicks, downloads, bad input."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    build_seg,
    http_post,
    make_ct_with_two_lesions,
    make_tiny_checkpoint,
    multipart_body,
    torch_threads,
    write_dicom_series,
)
from liverlesion import DISCLAIMER
from liverlesion.errors import UserError
from liverlesion.io import read_volume, write_volume
from liverlesion.predict import Classifier
from liverlesion.serve import make_server
from liverlesion.serve.studies import StudyGone, StudyStore

BIG_PX = (11, 23.5, 23.5)  # (slice, y_px, x_px): the 12 mm lesion's centre in make_ct_with_two_lesions


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("viewer")
    ckpt = make_tiny_checkpoint(tmp / "model.pt", seed=3, size_px=32)
    image, mask = make_ct_with_two_lesions()
    write_volume(image, tmp / "ct.nii.gz")
    write_volume(mask, tmp / "mask.nii.gz")
    labels = np.where(mask.array > 0, 3, 0).astype(np.uint8)
    right = labels[:, :, 30:]  # a view: the small lesion (x ~ 36) gets label 6, the big one keeps 3
    right[right > 0] = 6
    write_volume(image.with_array(labels), tmp / "labels.nii.gz")
    files = write_dicom_series(image, tmp / "dicom")
    with zipfile.ZipFile(tmp / "ct.zip", "w") as zf:
        for f in files:
            zf.write(f, f.name)
    with torch_threads(1):
        server = make_server([ckpt], host="127.0.0.1", port=0, max_upload_bytes=5_000_000)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield {
                "url": f"http://127.0.0.1:{server.server_address[1]}",
                "ckpt": ckpt,
                "dir": tmp,
                "server": server,
                "image": image,
                "mask": mask,
            }
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def post_json(url: str, obj) -> tuple[int, dict]:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    status, body = http_post(url, data, "application/json")
    return status, json.loads(body)


def open_study(served, image="ct.nii.gz", mask: str | None = "mask.nii.gz") -> dict:
    d: Path = served["dir"]
    files = {"image": (image, (d / image).read_bytes())}
    if mask:
        files["mask"] = (mask, (d / mask).read_bytes())
    body, ctype = multipart_body({}, files)
    status, resp = http_post(served["url"] + "/api/studies", body, ctype)
    assert status == 201, resp
    return json.loads(resp)


def png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def error_of(status_body) -> str:
    status, body = status_body[:2]
    msg = (json.loads(body) if isinstance(body, bytes) else body)["error"]
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# --------------------------------------------------------------------------- opening and slices


def test_open_study_gives_geometry_and_leaves_no_upload(served, tmp_path):
    import tempfile

    old, tempfile.tempdir = tempfile.tempdir, str(tmp_path)
    try:
        info = open_study(served)
    finally:
        tempfile.tempdir = old
    assert list(tmp_path.iterdir()) == []  # the upload folder went with the request
    assert info["shape_zyx"] == [24, 48, 48] and info["n_slices"] == 24
    assert info["spacing_zyx_mm"] == [2.5, 1.0, 1.0]
    # each slice's z (LPS mm), for the page's "slice k of n, z = ... mm"
    assert info["slice_z_mm"] == pytest.approx([100.0 + 2.5 * k for k in range(24)])
    assert info["mask_kind"] == "components" and info["disclaimer"] == DISCLAIMER
    # a binary mask: its components, numbered as `predict --mask` numbers them
    assert [(m["lesion_id"], m["label"]) for m in info["mask_lesions"]] == [("case-L01", 1), ("case-L02", 2)]
    assert info["start_slice"] in (11, 12)  # the big lesion's largest cross-section
    assert info["downloads"] == {"csv": True, "json": True, "sr": False, "seg": False}
    assert "opened as" in info["unavailable"]["seg"] and "DICOM series" in info["unavailable"]["seg"]
    status, body, _ = get(f"{served['url']}/api/studies/{info['study_id']}")
    assert status == 200 and json.loads(body)["study_id"] == info["study_id"]


def test_slice_png_is_windowed_with_the_mask_outline(served):
    sid = open_study(served)["study_id"]
    base = f"{served['url']}/api/studies/{sid}/slice/11.png"
    status, png, ctype = get(base + "?wl=60&ww=250")
    assert status == 200 and ctype == "image/png"
    rgb = png_array(png)
    assert rgb.shape == (48, 48, 3)
    green = (rgb[..., 1] > 200) & (rgb[..., 0] < 50)
    assert green.any()  # the outline of the 12 mm lesion
    ys, xs = np.nonzero(green)
    assert abs(ys.mean() - 23.5) < 2 and abs(xs.mean() - 23.5) < 2
    plain = png_array(get(base + "?wl=60&ww=250&outline=0")[1])
    assert not ((plain[..., 1] > 200) & (plain[..., 0] < 50)).any()
    assert (plain[..., 0] == plain[..., 1]).all()  # grey only
    wide = png_array(get(base + "?wl=40&ww=2000&outline=0")[1])
    assert not np.array_equal(wide, plain)  # the window is applied
    # the expected grey: the liver window of the slice's HU
    hu = served["image"].array[11]
    expected = np.round(np.clip((hu - (60 - 125)) / 250, 0, 1) * 255)
    assert np.abs(plain[..., 0].astype(float) - expected).max() <= 1


def test_hu_under_the_mouse_is_the_voxels_value_and_lps_position(served):
    sid = open_study(served)["study_id"]
    url = f"{served['url']}/api/studies/{sid}/hu"
    image = served["image"]
    for k, y, x in ((11, 23, 23), (5, 1, 1), (0, 47, 0), (23, 0, 47)):
        status, body, ctype = get(f"{url}?k={k}&x={x}&y={y}")
        assert status == 200 and ctype.startswith("application/json")
        v = json.loads(body)
        assert (v["slice"], v["x_px"], v["y_px"]) == (k, x, y)
        assert v["hu"] == pytest.approx(float(image.array[k, y, x]), abs=0.05)
        assert v["lps_mm"] == pytest.approx(list(image.index_to_physical((k, y, x))), abs=0.01)
    assert json.loads(get(f"{url}?k=5&x=1&y=1")[1])["hu"] < -500  # air outside the body
    # out of the volume, missing or not whole: 400 in one line, as the slice route
    for q, expected in (
        ("k=24&x=3&y=3", "slices 0..23"),
        ("k=-1&x=3&y=3", "slices 0..23"),
        ("k=3&x=48&y=3", "outside the image"),
        ("k=3&x=3&y=-1", "outside the image"),
        ("k=3&x=3", "must be a whole number"),
        ("k=3&x=2.5&y=3", "must be a whole number"),
        ("k=3&x=abc&y=3", "must be a whole number"),
    ):
        status, body, _ = get(f"{url}?{q}")
        assert status == 400, (q, body)
        assert expected in error_of((status, body)), (q, body)
    status, body, _ = get(f"{served['url']}/api/studies/{'x' * 24}/hu?k=3&x=3&y=3")
    assert status == 404 and "no such study" in error_of((status, body))


# --------------------------------------------------------------------------- clicks


def test_click_matches_classifier_and_job_progress_is_polled(served):
    info = open_study(served)
    sid = info["study_id"]
    k, y, x = BIG_PX
    click = {"slice": k, "x_px": x, "y_px": y, "diameter_mm": 12, "use_mask": False}
    status, job = post_json(f"{served['url']}/api/studies/{sid}/classify", click)
    assert status == 202 and job["state"] in ("queued", "running", "done")
    assert job["status_url"] == f"/api/jobs/{job['job_id']}"
    for _ in range(600):
        st = json.loads(get(served["url"] + job["status_url"])[1])
        assert {"state", "stage", "elapsed_s"} <= set(st)
        if st["state"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert st["state"] == "done", st
    (row,) = st["result"]["lesions"]
    assert row["lesion_id"] == "case-C01" and row["source"] == "click"
    assert row["overlay_url"] == f"/api/studies/{sid}/lesions/case-C01/overlay.png"

    image = served["image"]
    point = image.index_to_physical((k, y, x))
    with torch_threads(1):
        clf = Classifier.load([served["ckpt"]])
        expected = clf.predict(image, point=point, diameter_mm=12).iloc[0]
    assert row["pred_class"] == expected["pred_class"]
    for c in clf.class_names:
        assert abs(row[f"prob_{c}"] - expected[f"prob_{c}"]) < 1e-6
    assert row["uncertainty"] == pytest.approx(expected["uncertainty"])
    assert row["centroid_x_mm"] == pytest.approx(point[0], abs=1.0)

    # A click inside the mask classifies that mask lesion (wait=1: the answer in one request).
    status, res = post_json(
        f"{served['url']}/api/studies/{sid}/classify?wait=1", {"slice": k, "x_px": x, "y_px": y}
    )
    assert status == 200
    (row,) = res["lesions"]
    with torch_threads(1):
        exp = clf.predict(image, mask=served["mask"]).set_index("lesion_id").loc["case-L01"]
    assert row["lesion_id"] == "case-L01" and row["source"] == "mask"
    assert abs(row["prob_metastasis"] - exp["prob_metastasis"]) < 1e-6
    assert row["volume_ml"] == pytest.approx(exp["volume_ml"])

    # The click's sphere is outlined (yellow) on its slice from now on.
    rgb = png_array(get(f"{served['url']}/api/studies/{sid}/slice/{k}.png")[1])
    assert ((rgb[..., 0] > 200) & (rgb[..., 1] > 150) & (rgb[..., 2] < 50)).any()

    # Overlay, with Grad-CAM on request.
    for q in ("", "?gradcam=1"):
        status, png, ctype = get(f"{served['url']}/api/studies/{sid}/lesions/case-C01/overlay.png{q}")
        assert status == 200 and ctype == "image/png" and png_array(png).shape[0] > 100


def test_multi_label_mask_keeps_its_labels_as_ids(served):
    info = open_study(served, mask="labels.nii.gz")
    assert info["mask_kind"] == "labels"
    assert [m["lesion_id"] for m in info["mask_lesions"]] == ["case-L03", "case-L06"]
    status, res = post_json(f"{served['url']}/api/studies/{info['study_id']}/classify?wait=1", {"all": True})
    assert status == 200
    assert [(r["lesion_id"], r["label"]) for r in res["lesions"]] == [("case-L03", 3), ("case-L06", 6)]
    status, res = post_json(f"{served['url']}/api/studies/{info['study_id']}/classify?wait=1", {"label": 6})
    assert status == 200 and [r["lesion_id"] for r in res["lesions"]] == ["case-L06"]
    assert res["lesions"][0]["status"] == "too small to characterise"


def test_downloads(served):
    import pandas as pd

    sid = open_study(served)["study_id"]
    url = f"{served['url']}/api/studies/{sid}"
    status, body, _ = get(url + "/results.csv")
    assert status == 409 and "click a lesion first" in error_of((status, body))
    assert post_json(url + "/classify?wait=1", {"all": True})[0] == 200
    status, body, ctype = get(url + "/results.csv")
    assert status == 200 and ctype.startswith("text/csv")
    df = pd.read_csv(io.BytesIO(body))
    assert df["lesion_id"].tolist() == ["case-L01", "case-L02"] and (df["disclaimer"] == DISCLAIMER).all()
    status, body, _ = get(url + "/results.json")
    info = json.loads(body)
    assert status == 200 and info["disclaimer"] == DISCLAIMER and len(info["lesions"]) == 2
    assert info["inputs"]["image"] == "ct.nii.gz"
    status, body, _ = get(url + "/report-sr.dcm")  # a NIfTI study: an SR cannot reference a series
    assert status == 409 and "DICOM" in error_of((status, body))
    status, body, _ = get(url + "/seg.dcm")  # a NIfTI study: a SEG cannot reference a series either
    msg = error_of((status, body))
    assert (
        status == 409
        and msg.startswith("DICOM SEG: the CT was opened as")
        and ".zip of the DICOM series" in msg
    )


def test_dicom_zip_study_gives_an_sr(served):
    import pydicom

    info = open_study(served, image="ct.zip", mask=None)
    assert info["format"] and info["downloads"]["sr"] is True and info["mask_kind"] == ""
    url = f"{served['url']}/api/studies/{info['study_id']}"
    k, y, x = BIG_PX
    status, res = post_json(url + "/classify?wait=1", {"slice": k, "x_px": x, "y_px": y, "diameter_mm": 12})
    assert status == 200, res
    status, body, ctype = get(url + "/report-sr.dcm")
    assert status == 200 and ctype == "application/dicom" and body[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(body))
    assert ds.Modality == "SR"


# --------------------------------------------------------------------------- bad input


def test_bad_study_slice_and_click_are_one_line_errors(served):
    sid = open_study(served)["study_id"]
    url = served["url"]
    status, body, _ = get(f"{url}/api/studies/{'x' * 24}/slice/3.png")
    assert status == 404 and "no such study" in error_of((status, body))
    for k in (24, -1):
        status, body, _ = get(f"{url}/api/studies/{sid}/slice/{k}.png")
        assert status == 400 and "slices 0..23" in error_of((status, body))
    status, body, _ = get(f"{url}/api/studies/{sid}/slice/3.png?ww=0")
    assert status == 400 and "width" in error_of((status, body))
    cases = [
        ({"slice": 5, "x_px": 60, "y_px": 10, "diameter_mm": 10}, "outside the image"),
        ({"slice": 5, "x_px": -3, "y_px": 10, "diameter_mm": 10}, "outside the image"),
        ({"slice": 30, "x_px": 10, "y_px": 10, "diameter_mm": 10}, "out of range"),
        ({"slice": 5, "x_px": 10, "y_px": 10}, "diameter"),
        ({"slice": 5, "x_px": 10, "y_px": 10, "diameter_mm": -4}, "positive"),
        ({"slice": 5, "x_px": "ten", "y_px": 10, "diameter_mm": 4}, "finite number"),
        ({"label": 9}, "not a lesion label"),
        ({"label": 0}, "not a lesion label"),  # the background
        ({"label": 10**400}, "finite number"),  # too large for a float: was a 500
        ({"slice": 5, "x_px": 10**400, "y_px": 10, "diameter_mm": 4}, "finite number"),
        ({"all": True, "min_size_mm": -(10**400)}, "finite number"),
        ({"all": "no"}, "true or false"),
        ({"slice": 5, "x_px": 10, "y_px": 10, "use_mask": "false"}, "true or false"),
        ({"slice": 5, "x_px": 10, "y_px": 10, "colour": "red"}, "unknown field"),
        ([1, 2], "JSON object"),
        # two requests in one: one of them was dropped silently ("all" won)
        ({"all": True, "label": 1}, 'gives a label and "all": true'),
        ({"slice": 5, "x_px": 10, "y_px": 10, "diameter_mm": 4, "label": 1}, "send one of them"),
    ]
    for body_obj, expected in cases:
        status, resp = post_json(f"{url}/api/studies/{sid}/classify", body_obj)
        assert status == 400, (body_obj, resp)
        assert expected in error_of((status, resp)), (body_obj, resp)
    for raw in (b"{not json", b"[" * 30000 + b"]" * 30000):  # the second: too deep for the parser (was a 500)
        status, resp = post_json(f"{url}/api/studies/{sid}/classify", raw)
        assert status == 400 and "not JSON" in error_of((status, resp))
    status, resp = post_json(f"{url}/api/studies/{'y' * 24}/classify", {"all": True})
    assert status == 404
    # over the JSON limit: the message is about the classify request, not --max-upload-mb
    status, resp = post_json(f"{url}/api/studies/{sid}/classify", b" " * 70_000)
    assert status == 413
    msg = error_of((status, resp))
    assert "classify request of 70000 bytes" in msg and "--max-upload-mb" not in msg
    status, body, _ = get(f"{url}/api/studies/{sid}/lesions/case-L09/overlay.png")
    assert status == 400 and "click it first" in error_of((status, body))
    status, body, _ = get(f"{url}/api/jobs/nosuchjob")
    assert status == 404 and "no such job" in error_of((status, body))  # was 400: a missing resource


def test_click_in_air_is_refused_in_the_pages_terms_before_the_queue(served):
    """A click outside the body: answered at once (400, no job) naming the slice and pixel, not LPS mm."""
    sid = open_study(served)["study_id"]
    status, resp = post_json(
        f"{served['url']}/api/studies/{sid}/classify", {"slice": 5, "x_px": 1, "y_px": 1, "diameter_mm": 10}
    )
    assert status == 400, resp
    msg = error_of((status, resp))
    # the slice as the page numbers it (from 1), and the request's index
    assert msg.startswith("click on slice 6 of 24 (index 5) at pixel (1, 1): air (HU ")
    assert msg.endswith("click inside the lesion")
    assert "LPS" not in msg and "coordinates" not in msg


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"image": ("notes.txt", b"this is not a CT\n" * 10)}, "'notes.txt': not a CT file type"),
        ({"image": ("ct.nii.gz", b"\x1f\x8b" + bytes(200))}, "ct.nii.gz"),
        (
            {"image": ("mask.nii.gz", None)},
            "as in a label mask (were the image and the mask swapped?)",
        ),  # a mask in the CT slot
        (
            {"image": ("ct.nii.gz", None), "mask": ("seg.dcm", b"DICM" * 10)},
            "'seg.dcm': not a readable DICOM SEG",
        ),
        (
            {"image": ("ct.nii.gz", None), "mask": ("notes.txt", b"x" * 10)},
            "'notes.txt': not a mask file type",
        ),
        ({"image": ("ct.nii.gz", None), "mask": ("ct.nii.gz", None)}, "mask"),  # the CT in the mask slot
        ({"mask": ("mask.nii.gz", None)}, "CT file: none uploaded"),
    ],
)
def test_wrong_files_are_400_naming_the_file(served, files, expected):
    d: Path = served["dir"]
    files = {
        k: (name, data if data is not None else (d / name).read_bytes()) for k, (name, data) in files.items()
    }
    body, ctype = multipart_body({}, files)
    status, resp = http_post(served["url"] + "/api/studies", body, ctype)
    assert status == 400, resp
    msg = error_of((status, resp))
    assert expected in msg and "liverlesion-serve-" not in msg


def test_oversized_upload_is_413_before_the_body(served):
    port = int(served["url"].rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", "/api/studies")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(5_000_001))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and "--max-upload-mb" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_expired_and_closed_studies_are_404_saying_so(served):
    store = served["server"].studies
    sid = open_study(served)["study_id"]
    real = store.clock
    store.clock = lambda: real() + store.ttl_s + 1
    try:
        status, body, _ = get(f"{served['url']}/api/studies/{sid}/slice/3.png")
    finally:
        store.clock = real
    assert (
        status == 404
        and "expired" in error_of((status, body))
        and "open the CT again" in error_of((status, body))
    )
    sid = open_study(served)["study_id"]
    req = urllib.request.Request(f"{served['url']}/api/studies/{sid}", method="DELETE")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    status, body, _ = get(f"{served['url']}/api/studies/{sid}")
    assert status == 404 and "expired or closed" in error_of((status, body))


# --------------------------------------------------------------------------- the store


def test_study_store_bounds_count_bytes_and_idle_time():
    from liverlesion.volume import Volume

    now = [0.0]
    store = StudyStore(max_studies=2, max_bytes=3 * 4000, ttl_s=10, clock=lambda: now[0])
    vol = Volume(np.zeros((10, 10, 10), np.float32), (1, 1, 1))  # 4000 bytes
    a, b = store.add(vol), store.add(vol)
    store.get(a.id)  # a is now the most recently used
    c = store.add(vol)  # over the count: b (least recently used) goes
    assert {s for s in (a.id, c.id)} == {store.get(a.id).id, store.get(c.id).id}
    with pytest.raises(StudyGone, match="expired or closed"):
        store.get(b.id)
    now[0] = 11.0  # idle past the TTL
    with pytest.raises(StudyGone, match="expired"):
        store.get(a.id)
    assert len(store) == 0
    big = Volume(np.zeros((20, 20, 20), np.float32), (1, 1, 1))  # 32000 bytes
    with pytest.raises(UserError, match="study memory"):
        store.add(big)
    store2 = StudyStore(max_studies=5, max_bytes=2 * 4000 + 100, ttl_s=10)
    ids = [store2.add(vol).id for _ in range(3)]  # over the bytes: the oldest goes
    assert len(store2) == 2 and store2.nbytes <= 2 * 4000
    with pytest.raises(StudyGone):
        store2.get(ids[0])
    with pytest.raises(UserError, match="--max-studies"):
        StudyStore(max_studies=0)


def test_cli_serve_bad_study_options_are_one_line(tmp_path, capsys):
    from liverlesion.cli import main

    ckpt = make_tiny_checkpoint(tmp_path / "model.pt", seed=3, size_px=32)
    for opt in ("--max-studies=0", "--study-ttl-min=-1"):
        assert main(["serve", "--model", str(ckpt), "--port", "0", opt]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("liverlesion: error: " + opt.split("=")[0]) and "\n" not in err


# --------------------------------------------------------------------------- DICOM SEG in and out


@pytest.fixture(scope="module")
def seg_study(served):
    """The served DICOM CT's files in slice order, its lesions as components, and SEGs drawn on it."""
    import pydicom
    from scipy import ndimage

    d: Path = served["dir"]
    files = sorted(  # slice order (the names are shuffled): file k is array slice k for build_seg
        (d / "dicom").iterdir(),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    assert len(files) == 24
    comp, _ = ndimage.label(served["mask"].array > 0, structure=np.ones((3, 3, 3)))
    empty = np.zeros(comp.shape, bool)
    liver = np.zeros(comp.shape, bool)
    liver[2:22, 8:40, 8:44] = True  # holds both lesions: overlaps them
    segs = {
        # segments 1 and 4 (2, 3 empty): labels 1 and 4, ids case-L01 and case-L04
        "numbers": build_seg(
            files, {"Tumor_1": comp == 1, "b": empty, "c": empty, "Tumor_2": comp == 2}, d / "lesions-seg.dcm"
        ),
        "liver": build_seg(
            files, {"Liver": liver, "Tumor_1": comp == 1, "Tumor_2": comp == 2}, d / "liver-seg.dcm"
        ),
    }
    return {"files": files, "comp": comp, **segs}


def open_files(served, files: dict, fields: dict | None = None) -> tuple[int, dict]:
    body, ctype = multipart_body(fields or {}, files)
    status, resp = http_post(served["url"] + "/api/studies", body, ctype)
    return status, json.loads(resp)


def test_dicom_seg_opens_with_segment_numbers_as_labels(served, seg_study):
    d: Path = served["dir"]
    ct = ("ct.zip", (d / "ct.zip").read_bytes())
    status, info = open_files(
        served, {"image": ct, "mask": ("lesions-seg.dcm", seg_study["numbers"].read_bytes())}
    )
    assert status == 201, info
    assert info["mask_kind"] == "segments"
    assert [(m["lesion_id"], m["segment_label"]) for m in info["mask_lesions"]] == [
        ("case-L01", "Tumor_1"),
        ("case-L04", "Tumor_2"),
    ]
    assert info["segments"] == [{"number": 1, "label": "Tumor_1"}, {"number": 4, "label": "Tumor_2"}]
    study = served["server"].studies.get(info["study_id"])
    np.testing.assert_array_equal(study.labels.array, np.where(seg_study["comp"] == 2, 4, seg_study["comp"]))
    # the page may name a segment by its label: Tumor_2 is segment 4
    url = f"{served['url']}/api/studies/{info['study_id']}/classify?wait=1"
    status, res = post_json(url, {"label": "tumor_2"})
    assert status == 200, res
    assert [(r["lesion_id"], r["label"]) for r in res["lesions"]] == [("case-L04", 4)]
    for label, expected in (("Tumor_9", "its segments are 1 'Tumor_1', 4 'Tumor_2'"), ("Tumor*", "picks 2")):
        status, resp = post_json(url, {"label": label})
        assert status == 400 and expected in error_of((status, resp)), resp


def test_dicom_seg_chosen_by_label_or_pattern_and_overlaps_refused(served, seg_study):
    d: Path = served["dir"]
    ct = ("ct.zip", (d / "ct.zip").read_bytes())
    liver = ("liver-seg.dcm", seg_study["liver"].read_bytes())
    # every segment: the liver overlaps the tumours, refused with what to do on this page
    status, resp = open_files(served, {"image": ct, "mask": liver})
    msg = error_of((status, resp))
    assert status == 400 and msg.startswith("mask file 'liver-seg.dcm': segments 1 'Liver' and")
    assert (
        "overlap" in msg and "label field" in msg and "--label" not in msg and "liverlesion-serve-" not in msg
    )
    status, info = open_files(served, {"image": ct, "mask": liver}, {"label": "Tumor*"})
    assert status == 201, info
    assert [(m["label"], m["segment_label"]) for m in info["mask_lesions"]] == [
        (2, "Tumor_1"),
        (3, "Tumor_2"),
    ]
    status, info = open_files(served, {"image": ct, "mask": liver}, {"label": "3"})  # one segment by number
    assert status == 201 and [m["lesion_id"] for m in info["mask_lesions"]] == ["case-L03"]
    status, res = post_json(f"{served['url']}/api/studies/{info['study_id']}/classify?wait=1", {"all": True})
    assert status == 200 and [r["lesion_id"] for r in res["lesions"]] == ["case-L03"]
    # a label the SEG does not have, and a label with a NIfTI mask: refused before reading the CT
    status, resp = open_files(served, {"image": ct, "mask": liver}, {"label": "Spleen"})
    msg = error_of((status, resp))
    assert (
        status == 400 and "no segment label 'Spleen'" in msg and "1 'Liver', 2 'Tumor_1', 3 'Tumor_2'" in msg
    )
    nifti = {
        "image": ("ct.nii.gz", (d / "ct.nii.gz").read_bytes()),
        "mask": ("mask.nii.gz", (d / "mask.nii.gz").read_bytes()),
    }
    status, resp = open_files(served, nifti, {"label": "Tumor_1"})
    assert status == 400 and "chooses segments of a DICOM SEG" in error_of((status, resp))


def test_dicom_seg_of_another_series_or_not_a_seg_is_refused(served, seg_study, tmp_path):
    d: Path = served["dir"]
    ct = ("ct.zip", (d / "ct.zip").read_bytes())
    other = write_dicom_series(served["image"], tmp_path / "other")  # another series of the same CT
    seg2 = build_seg(other, {"Tumor": seg_study["comp"] > 0}, tmp_path / "other-seg.dcm")
    status, resp = open_files(served, {"image": ct, "mask": ("other-seg.dcm", seg2.read_bytes())})
    msg = error_of((status, resp))
    assert status == 400 and msg.startswith("mask file 'other-seg.dcm': the DICOM SEG references series")
    assert "give the CT series the SEG was drawn on" in msg
    # a CT slice in the mask slot: DICOM, but not a segmentation
    status, resp = open_files(
        served, {"image": ct, "mask": ("slice.dcm", seg_study["files"][0].read_bytes())}
    )
    assert status == 400 and "is DICOM but not a Segmentation" in error_of((status, resp))


def test_seg_download_round_trip_and_the_sr_refers_to_it(served, seg_study):
    import pydicom

    from liverlesion.dicom_seg import seg_labelmap
    from liverlesion.seg_select import read_seg_segments

    d: Path = served["dir"]
    ct = ("ct.zip", (d / "ct.zip").read_bytes())
    status, info = open_files(
        served, {"image": ct, "mask": ("lesions-seg.dcm", seg_study["numbers"].read_bytes())}
    )
    assert status == 201 and info["downloads"]["seg"] is True and info["unavailable"]["seg"] == ""
    url = f"{served['url']}/api/studies/{info['study_id']}"
    status, body, _ = get(url + "/seg.dcm")
    assert status == 409 and "click a lesion first" in error_of((status, body))
    assert post_json(url + "/classify?wait=1", {"label": 1})[0] == 200
    k, y, x = 12, 12, 36  # a click on the small lesion, off the mask: its grown mask is estimated
    status, res = post_json(
        url + "/classify?wait=1", {"slice": k, "x_px": x, "y_px": y, "diameter_mm": 6, "use_mask": False}
    )
    assert status == 200, res
    status, body, ctype = get(url + "/seg.dcm")
    assert status == 200 and ctype == "application/dicom" and body[128:132] == b"DICM"
    path = d / "downloaded-seg.dcm"
    path.write_bytes(body)
    segs = read_seg_segments(path)
    assert [(s.number, s.label) for s in segs] == [(1, "case-L01"), (2, "case-C01")]
    ds = pydicom.dcmread(path)
    assert [i.SegmentAlgorithmType for i in ds.SegmentSequence] == ["MANUAL", "SEMIAUTOMATIC"]
    ct_vol = read_volume(d / "dicom")
    labels, _ = seg_labelmap(path, ct_vol)  # references the CT's series, frames on its grid
    study = served["server"].studies.get(info["study_id"])
    rows = {r["lesion_id"]: r for r in json.loads(get(url + "/results.json")[1])["lesions"]}
    for number, lid in ((1, "case-L01"), (2, "case-C01")):
        used = np.asarray(study.results[lid].mask)  # the mask the lesion was classified on
        assert used.any()
        np.testing.assert_array_equal(labels.array == number, used)
        centre = ct_vol.index_to_physical(np.argwhere(labels.array == number).mean(axis=0))
        assert np.allclose(centre, [rows[lid][f"centroid_{a}_mm"] for a in "xyz"], atol=0.5)
    np.testing.assert_array_equal(study.results["case-L01"].mask, seg_study["comp"] == 1)
    # the SR downloaded now refers to the SEG's segments (same tracking UIDs), and has it as evidence
    status, body, _ = get(url + "/report-sr.dcm")
    assert status == 200
    sr = pydicom.dcmread(io.BytesIO(body))
    evidence = [
        i.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    ]
    assert ds.SOPInstanceUID in evidence
    tracking = {str(i.TrackingUID) for i in ds.SegmentSequence}
    assert tracking and all(t in body.decode("latin-1") for t in tracking)
    # a lesion classified again: the SEG no longer holds its current result, so the SR stops referring to it
    assert post_json(url + "/classify?wait=1", {"label": 1})[0] == 200
    body = get(url + "/report-sr.dcm")[1]
    assert ds.SOPInstanceUID not in body.decode("latin-1")


def test_seg_download_needs_a_frame_of_reference(served, tmp_path):
    import pydicom

    files = write_dicom_series(served["image"], tmp_path / "nofor")
    for f in files:  # an anonymised export without FrameOfReferenceUID (as 3D-IRCADb-01)
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in files:
            zf.write(f, f.name)
    status, info = open_files(served, {"image": ("nofor.zip", buf.getvalue())})
    assert status == 201, info
    assert info["downloads"]["sr"] is True and info["downloads"]["seg"] is False
    assert "FrameOfReferenceUID" in info["unavailable"]["seg"]
    url = f"{served['url']}/api/studies/{info['study_id']}"
    k, y, x = BIG_PX
    assert (
        post_json(url + "/classify?wait=1", {"slice": k, "x_px": x, "y_px": y, "diameter_mm": 12})[0] == 200
    )
    status, body, _ = get(url + "/seg.dcm")
    msg = error_of((status, body))
    assert status == 409 and "no FrameOfReferenceUID" in msg and "download the DICOM SR instead" in msg
    assert get(url + "/report-sr.dcm")[0] == 200


def test_one_shot_form_takes_a_dicom_seg_and_a_segment_label(served, seg_study):
    d: Path = served["dir"]
    files = {
        "image": ("ct.zip", (d / "ct.zip").read_bytes()),
        "mask": ("liver-seg.dcm", seg_study["liver"].read_bytes()),
    }
    body, ctype = multipart_body({"label": "Tumor_1"}, files)
    status, resp = http_post(served["url"] + "/api/predict", body, ctype)
    assert status == 200, resp
    (row,) = json.loads(resp)["lesions"]
    assert row["lesion_id"] == "case-L02" and row["label"] == 2  # segment 2 of Liver, Tumor_1, Tumor_2
    with torch_threads(1):
        clf = Classifier.load([served["ckpt"]])
        exp = clf.predict(
            served["image"], mask=served["image"].with_array((seg_study["comp"] == 1).astype(np.uint8))
        )
    assert row["status"] == "classified"
    assert row["prob_metastasis"] == pytest.approx(exp.iloc[0]["prob_metastasis"], abs=1e-6)
    # a pattern: each connected component of the selected segments is a lesion, as predict --label 'Tumor*'
    body, ctype = multipart_body({"label": "Tumor*"}, files)
    status, resp = http_post(served["url"] + "/api/predict", body, ctype)
    assert status == 200, resp
    rows = json.loads(resp)["lesions"]
    assert [(r["lesion_id"], r["label"]) for r in rows] == [("case-L01", 2), ("case-L02", 3)]
    body, ctype = multipart_body({"label": "Spleen"}, files)
    status, resp = http_post(served["url"] + "/api/predict", body, ctype)
    msg = error_of((status, resp))
    assert status == 400 and msg.startswith(
        "mask file 'liver-seg.dcm': the DICOM SEG has no segment label 'Spleen'"
    )
