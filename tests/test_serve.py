"""The local browser UI: results equal Classifier.predict's, errors are one-line 400s (loopback only)."""

from __future__ import annotations

import base64
import http.client
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import http_post, make_ct_with_two_lesions, make_tiny_checkpoint, multipart_body, torch_threads
from liverlesion import DISCLAIMER
from liverlesion.errors import UserError
from liverlesion.io import read_volume, write_volume
from liverlesion.predict import Classifier
from liverlesion.serve import make_server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    ckpt = make_tiny_checkpoint(tmp / "model.pt", seed=3, size_px=32)
    image, mask = make_ct_with_two_lesions()
    write_volume(image, tmp / "ct.nii.gz")
    write_volume(mask, tmp / "mask.nii.gz")
    with torch_threads(1):
        server = make_server([ckpt], host="127.0.0.1", port=0, max_upload_bytes=5_000_000)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "ckpt": ckpt, "dir": tmp}
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


def test_health_and_form(served):
    with urllib.request.urlopen(served["url"] + "/api/health", timeout=10) as r:
        assert r.status == 200
        assert json.loads(r.read()) == {"status": "ok", "classes": ["cyst", "metastasis"]}
    with urllib.request.urlopen(served["url"] + "/form", timeout=10) as r:
        page = r.read().decode()
    assert "Research use, not for diagnosis" in page
    assert 'enctype="multipart/form-data"' in page and 'name="image"' in page and 'name="point"' in page
    assert "http://" not in page and "https://" not in page  # self-contained
    sha = Classifier.load([served["ckpt"]]).checkpoint_hashes[0]
    assert sha in page
    # the viewer (/) and its static files: the banner, nothing fetched from elsewhere (works offline)
    for path in ("/", "/static/viewer.js", "/static/viewer.css"):
        with urllib.request.urlopen(served["url"] + path, timeout=10) as r:
            text = r.read().decode()
        assert "http://" not in text and "https://" not in text, path
    with urllib.request.urlopen(served["url"] + "/", timeout=10) as r:
        assert "Research use, not for diagnosis" in r.read().decode()
    with urllib.request.urlopen(served["url"] + "/api/info", timeout=10) as r:
        info = json.loads(r.read())
    assert info["models"][0]["sha256"] == sha and info["disclaimer"] == DISCLAIMER


def test_predict_page_matches_classifier(served):
    d: Path = served["dir"]
    files = {
        "image": ("ct.nii.gz", (d / "ct.nii.gz").read_bytes()),
        "mask": ("mask.nii.gz", (d / "mask.nii.gz").read_bytes()),
    }
    body, ctype = multipart_body({"label": "", "point": "", "diameter": "", "min_size_mm": "5"}, files)
    status, page_b = http_post(served["url"] + "/predict", body, ctype)
    page = page_b.decode()
    assert status == 200, page
    assert "Research use, not for diagnosis" in page
    assert re.search(r"src='data:image/png;base64,iVBOR", page)  # inline PNG (its signature in base64)
    assert "too small to characterise" in page  # the 4 mm lesion

    with torch_threads(1):
        clf = Classifier.load([served["ckpt"]])
        expected = clf.predict(
            read_volume(d / "ct.nii.gz"), mask=read_volume(d / "mask.nii.gz", kind="mask"), gradcam=True
        )
    # The JSON download carries the full rows; compare them with the API's numbers.
    m = re.search(r"href='data:application/json;base64,([A-Za-z0-9+/=]+)'", page)
    assert m
    info = json.loads(base64.b64decode(m.group(1)))
    assert info["disclaimer"] == DISCLAIMER
    got = {r["lesion_id"]: r for r in info["lesions"]}
    assert set(got) == set(expected["lesion_id"])
    for _, row in expected.iterrows():
        g = got[row["lesion_id"]]
        assert g["pred_class"] == row["pred_class"]
        for c in clf.class_names:
            e = row[f"prob_{c}"]
            if np.isnan(e):
                assert g[f"prob_{c}"] is None
            else:
                assert abs(g[f"prob_{c}"] - e) < 1e-6
        assert g["volume_ml"] == pytest.approx(row["volume_ml"], abs=1e-9)

    # The JSON API gives the same rows.
    status, api_b = http_post(served["url"] + "/api/predict", body, ctype)
    assert status == 200
    api = json.loads(api_b)
    assert api["disclaimer"] == DISCLAIMER
    assert [r["lesion_id"] for r in api["lesions"]] == list(expected["lesion_id"])
    for r, (_, row) in zip(api["lesions"], expected.iterrows(), strict=True):
        p = row["prob_metastasis"]
        assert (r["prob_metastasis"] is None) if np.isnan(p) else abs(r["prob_metastasis"] - p) < 1e-6


def test_text_file_as_image_is_400_one_line(served):
    body, ctype = multipart_body(
        {"point": "0,0,120", "diameter": "12"}, {"image": ("notes.txt", b"this is not a CT\n" * 10)}
    )
    status, page_b = http_post(served["url"] + "/predict", body, ctype)
    page = page_b.decode()
    assert status == 400
    msg = re.search(r"<p class='err'>(.*?)</p>", page, re.S).group(1)
    assert "\n" not in msg and "notes.txt" in msg
    assert "liverlesion-serve-" not in msg  # the private temp path is not shown

    status, api_b = http_post(served["url"] + "/api/predict", body, ctype)
    assert status == 400
    err = json.loads(api_b)["error"]
    assert "\n" not in err and "notes.txt" in err


def test_missing_lesion_source_and_too_large(served):
    d: Path = served["dir"]
    body, ctype = multipart_body({}, {"image": ("ct.nii.gz", (d / "ct.nii.gz").read_bytes())})
    status, page_b = http_post(served["url"] + "/api/predict", body, ctype)
    assert status == 400
    assert "neither a mask nor a point" in json.loads(page_b)["error"]

    body, ctype = multipart_body(
        {"point": "1,2", "diameter": "10"}, {"image": ("ct.nii.gz", (d / "ct.nii.gz").read_bytes())}
    )
    status, page_b = http_post(served["url"] + "/predict", body, ctype)
    assert status == 400 and "point" in page_b.decode() and "x,y,z" in page_b.decode()

    # Too large: refused from the headers alone, before the body is read (a client that
    # streams the body first gets the 413 after the server closes the connection).
    port = int(served["url"].rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", "/api/predict")
        conn.putheader("Content-Type", ctype)
        conn.putheader("Content-Length", str(5_000_001))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert "limit" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_bad_checkpoint_is_user_error(tmp_path):
    with pytest.raises(UserError, match="--model"):
        make_server([tmp_path / "missing.pt"], port=0)


def test_cli_serve_bad_model_is_one_line(tmp_path, capsys):
    from liverlesion.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("liverlesion: error: --model") and "\n" not in err


def test_random_bytes_nifti_upload_is_a_clean_400(served):
    rng = np.random.default_rng(0)
    for name in ("ct.nii.gz", "ct.nii"):
        body, ctype = multipart_body(
            {"point": "0,0,120", "diameter": "12"}, {"image": (name, rng.bytes(20000))}
        )
        status, api_b = http_post(served["url"] + "/api/predict", body, ctype)
        assert status == 400
        err = json.loads(api_b)["error"]
        assert "\n" not in err and name in err and "not a NIfTI" in err
        assert "itk" not in err.lower() and "liverlesion-serve-" not in err


def test_413_names_the_option(served):
    port = int(served["url"].rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", "/api/predict")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(5_000_001))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert "--max-upload-mb" in json.loads(resp.read())["error"]
    finally:
        conn.close()


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_cli_serve_bad_max_upload_is_one_line(tmp_path, capsys, value):
    from liverlesion.cli import main

    assert main(["serve", "--model", str(tmp_path / "m.pt"), f"--max-upload-mb={value}"]) == 2
    err = capsys.readouterr().err
    assert "--max-upload-mb" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_parse_multipart_binary_fields():
    import io

    from liverlesion.serve import parse_multipart

    payload = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n\r\n" + b"\x00\r\n"
    b = "XyZ123"

    def part(name: str, data: bytes, filename: str | None = None) -> bytes:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return f"--{b}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"

    body = (
        part("point", b"1,2,3")
        + part("image", payload, "ct.nii")
        + part("image", b"ignored", "second.nii")  # a repeated name: the first wins
        + f"--{b}--\r\n".encode()
    )
    fields = parse_multipart(f'multipart/form-data; boundary="{b}"', io.BytesIO(body))
    assert fields["image"].data == payload and fields["image"].filename == "ct.nii"
    assert fields["point"].text == "1,2,3" and fields["point"].filename is None
    assert set(fields) == {"point", "image"}
    with pytest.raises(UserError, match="no form fields|no boundary"):
        parse_multipart(f"multipart/form-data; boundary={b}", io.BytesIO(b"just some bytes"))


# --------------------------------------------------------------------------- uploads and load


def test_streamed_multipart_writes_files_to_disk_across_chunk_edges(tmp_path):
    """File parts go to files, text parts stay small; a boundary split over reads is still found."""
    import io

    from liverlesion.serve import stream_multipart

    payload = np.random.default_rng(1).bytes(50_000) + b"\r\n--"  # looks like a boundary start
    body, ctype = multipart_body({"point": "1,2,3", "diameter": "12"}, {"image": ("ct.nii.gz", payload)})
    for step in (1, 7, 4096, len(body)):
        src = io.BytesIO(body)
        work = tmp_path / f"w{step}"
        work.mkdir()
        fields = stream_multipart(ctype, lambda n, s=src, k=step: s.read(min(n, k)), len(body), work)
        f = fields["image"]
        assert f.data == b"" and f.path is not None and f.path.read_bytes() == payload
        assert f.size == len(payload) and f.filename == "ct.nii.gz"
        assert fields["point"].text == "1,2,3" and fields["diameter"].text == "12"
    with pytest.raises(UserError, match="ended early"):
        stream_multipart(ctype, io.BytesIO(body[:-100]).read, len(body), tmp_path)
    big, ctype = multipart_body({"point": "9" * 100_000}, {})
    with pytest.raises(UserError, match="form field 'point': over 64 KiB"):
        stream_multipart(ctype, io.BytesIO(big).read, len(big), tmp_path)


def test_concurrent_requests_all_answered_and_temp_folders_removed(served, tmp_path):
    """12 clients at once (the benchmark runs 50): every one gets its 200, no temp folder is left."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    d: Path = served["dir"]
    files = {
        "image": ("ct.nii.gz", (d / "ct.nii.gz").read_bytes()),
        "mask": ("mask.nii.gz", (d / "mask.nii.gz").read_bytes()),
    }
    body, ctype = multipart_body({"min_size_mm": "5"}, files)
    old, tempfile.tempdir = tempfile.tempdir, str(tmp_path)
    try:
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda _: http_post(served["url"] + "/api/predict", body, ctype), range(12)))
    finally:
        tempfile.tempdir = old
    assert [s for s, _ in got] == [200] * 12
    assert len({b for _, b in got}) == 1  # the same answer for each
    assert list(tmp_path.iterdir()) == []


def test_saturated_server_answers_503_in_one_line(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "model.pt", seed=3, size_px=32)
    with torch_threads(1):
        server = make_server([ckpt], host="127.0.0.1", port=0, max_concurrent=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    slow = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        # the first request holds the only slot while its body is (slowly) arriving
        slow.putrequest("POST", "/api/predict")
        slow.putheader("Content-Type", "multipart/form-data; boundary=x")
        slow.putheader("Content-Length", "1000")
        slow.endheaders()
        slow.send(b"--x\r\n")
        for _ in range(100):  # until the server has taken the slot
            if server.slots._value == 0:
                break
            threading.Event().wait(0.05)
        body, ctype = multipart_body({"point": "1,2,3", "diameter": "5"}, {})
        status, resp = http_post(f"http://127.0.0.1:{port}/api/predict", body, ctype)
        assert status == 503
        err = json.loads(resp)["error"]
        assert "\n" not in err and "busy" in err and "--max-concurrent 1" in err
    finally:
        slow.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    with pytest.raises(UserError, match="--max-concurrent 0"):
        make_server([ckpt], port=0, max_concurrent=0)


def _raw(url: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""):
    """(status, headers, body) of one request sent as is (any method, any header)."""
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {"Content-Length": str(len(body))}).items():
            conn.putheader(k, v)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("PUT", "/api/studies", 405, "POST"),
        ("PATCH", "/api/health", 405, "GET, HEAD"),
        ("DELETE", "/api/predict", 405, "POST"),
        ("OPTIONS", "/api/info", 405, "GET, HEAD"),
        ("PUT", "/api/studies/abcdefghijklmnopqrst", 405, "GET, HEAD, DELETE"),
        ("POST", "/api/health", 405, "GET, HEAD"),
        ("GET", "/api/predict", 405, "POST"),
        ("PUT", "/api/nothing-here", 404, None),
        ("DELETE", "/api/nothing-here", 404, None),
        ("BREW", "/api/health", 501, None),  # a method no one knows
    ],
)
def test_unsupported_methods_get_a_json_error_with_allow(served, method, path, status, allow):
    """Was the stdlib's 501 HTML page for PUT/PATCH/OPTIONS, and 404 "no such study URL" for DELETE."""
    got, headers, body = _raw(served["url"], method, path, body=b'{"x": 1}')
    assert got == status
    assert headers["Content-Type"].startswith("application/json")
    err = json.loads(body)
    assert set(err) == {"error", "disclaimer"} and "\n" not in err["error"] and path in err["error"]
    assert headers.get("Allow") == allow
    if allow:
        assert f"answers {allow}" in err["error"]


def test_head_answers_like_get_without_a_body(served):
    status, headers, body = _raw(served["url"], "HEAD", "/api/health")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    status, headers, body = _raw(served["url"], "PUT", "/form")  # a page, not the API: an HTML 405
    assert status == 405 and headers["Allow"] == "GET, HEAD" and b"method not allowed" in body


@pytest.mark.parametrize("length", ["abc", "-5"])
def test_unreadable_content_length_is_400_saying_so(served, length):
    """Was 411 "Content-Length missing" for a header that is there."""
    status, _, body = _raw(served["url"], "POST", "/api/predict", {"Content-Length": length})
    assert status == 400
    assert f"Content-Length {length!r} is not a byte count" in json.loads(body)["error"]


def test_empty_upload_is_named_not_taken_for_no_file(served):
    """A chosen 0-byte file was read as "none uploaded" (or, as the mask, as "neither a mask nor a point")."""
    d: Path = served["dir"]
    ct = (d / "ct.nii.gz").read_bytes()
    for files, expected in (
        ({"image": ("ct.nii.gz", b"")}, "CT file 'ct.nii.gz': empty (0 bytes)"),
        ({"image": ("ct.nii.gz", ct), "mask": ("m.nii.gz", b"")}, "mask file 'm.nii.gz': empty (0 bytes)"),
    ):
        body, ctype = multipart_body({"point": "", "diameter": ""}, files)
        for path in ("/api/predict", "/api/studies"):
            status, resp = http_post(served["url"] + path, body, ctype)
            assert status == 400
            assert expected in json.loads(resp)["error"], (path, resp)
    # a file input left empty (no file name) is still "none uploaded"
    body, ctype = multipart_body({"point": "1,2,3", "diameter": "10"}, {"image": ("", b"")})
    status, resp = http_post(served["url"] + "/api/predict", body, ctype)
    assert status == 400 and "none uploaded" in json.loads(resp)["error"]
