"""A local browser UI (and a small JSON API) for classifying one lesion at a time.

``liverlesion serve --model CKPT`` starts a stdlib ``ThreadingHTTPServer`` on
127.0.0.1. The classifier is loaded once; each request's uploads go to a private
temporary folder that is always deleted afterwards. Results go through
:meth:`Classifier._predict_case`, the same code as ``liverlesion predict``, so the
numbers are the same as the CLI's and :meth:`Classifier.predict`'s.

Routes:
    GET  /              the form (CT + mask or click), model info, disclaimer
    POST /predict       results page: table, inline overlay PNGs, CSV/JSON downloads
    GET  /api/health    {"status": "ok", "classes": [...]}
    POST /api/predict   the same multipart fields, JSON results

There is no authentication: anyone who can reach the port can upload data, so
only bind to another host than 127.0.0.1 on a trusted network.
"""

from __future__ import annotations

import base64
import email.message
import email.parser
import email.policy
import html
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from liverlesion import DISCLAIMER, __version__
from liverlesion.errors import UserError

__all__ = [
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "make_server",
    "parse_multipart",
    "serve",
    "stream_multipart",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024**3  # 2 GiB: a thin-slice abdominal CT zip fits
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".zip", ".nrrd", ".mha", ".dcm")
_MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_CHUNK = 1024 * 1024


# --------------------------------------------------------------------------- multipart


DEFAULT_MAX_CONCURRENT = 64  # requests in flight (uploading or waiting for the model); more get 503
_MAX_TEXT_FIELD = 64 * 1024  # a form's text fields are a few bytes; anything larger is refused
_MAX_PARTS = 32
_MAX_PART_HEADERS = 16 * 1024


@dataclass
class FormField:
    """One multipart form field: ``filename`` is None for plain text fields.

    An uploaded file is streamed to ``path`` (in the request's private folder, ``size`` bytes) and
    ``data`` is empty; :func:`parse_multipart` (the in-memory form) fills ``data`` instead.
    """

    name: str
    data: bytes
    filename: str | None = None
    path: Path | None = None
    size: int = 0

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace").strip()

    def save(self, dest: Path) -> None:
        """Put the file's bytes at ``dest`` (a rename when it was streamed to disk)."""
        if self.path is not None:
            os.replace(self.path, dest)
            self.path = dest
        else:
            dest.write_bytes(self.data)


def _boundary(content_type: str) -> bytes:
    from email.message import Message

    if content_type.lower().startswith("multipart/form-data"):
        m = Message()
        m["Content-Type"] = content_type
        b = m.get_param("boundary")
        if isinstance(b, str) and 0 < len(b) <= 200:
            return b.encode("latin-1")
    raise UserError(
        f"request Content-Type {content_type or 'none'!r}: expected multipart/form-data with a boundary; "
        "submit the form from the page, or post the fields as multipart/form-data"
    )


def stream_multipart(content_type: str, read: Any, length: int, workdir: Path) -> dict[str, FormField]:
    """Parse a ``multipart/form-data`` body as it arrives, writing file parts straight to disk.

    Only a chunk of the body (plus one boundary) is in memory at a time; text fields are capped at
    64 KiB each. Exactly ``length`` bytes are read from ``read`` (e.g. ``rfile.read``).

    Args:
        content_type: The request's Content-Type header (with its boundary).
        read: ``read(n) -> bytes`` of the request body.
        length: The body's length (Content-Length).
        workdir: Private folder for the uploaded files (``upload-N``).

    Returns:
        Field name -> :class:`FormField` (the first of repeated names wins).

    Raises:
        UserError: Not multipart, malformed, truncated, or a text field too large.
    """
    dash = b"--" + _boundary(content_type)
    delim = b"\r\n" + dash
    left = int(length)
    buf = b""

    def more() -> bool:
        nonlocal buf, left
        if left <= 0:
            return False
        chunk = read(min(_CHUNK, left))
        if not chunk:
            raise UserError("request: upload ended early; try again")
        left -= len(chunk)
        buf += chunk
        return True

    def malformed(what: str) -> UserError:
        return UserError(f"request body: {what}; submit the form from the page")

    while (i := buf.find(dash)) < 0:  # preamble
        buf = buf[-len(dash) :]
        if not more():
            raise malformed("not a multipart/form-data body (no boundary)")
    buf = buf[i + len(dash) :]
    fields: dict[str, FormField] = {}
    parser = email.parser.BytesHeaderParser(policy=email.policy.HTTP)
    for n in range(_MAX_PARTS + 1):
        while len(buf) < 2 and more():
            pass
        if buf[:2] == b"--":
            break  # closing boundary
        if buf[:2] != b"\r\n" or n == _MAX_PARTS:
            raise malformed(
                "malformed multipart boundary" if n < _MAX_PARTS else f"more than {_MAX_PARTS} parts"
            )
        buf = buf[2:]
        while (h := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_PART_HEADERS or not more():
                raise malformed("malformed part headers")
        headers = parser.parsebytes(buf[:h])
        buf = buf[h + 4 :]
        name = headers.get_param("name", header="content-disposition")
        filename = headers.get_filename()
        keep = str(name) not in fields and bool(name)
        path = workdir / f"upload-{n}" if keep and filename is not None else None
        sink = open(path, "wb") if path is not None else None  # noqa: SIM115 (closed below)
        text = bytearray()
        size = 0
        try:
            while True:
                i = buf.find(delim)
                part, done = (buf[:i], True) if i >= 0 else (buf[: max(len(buf) - len(delim) + 1, 0)], False)
                buf = buf[i + len(delim) :] if done else buf[len(part) :]
                size += len(part)
                if sink is not None:
                    sink.write(part)
                elif keep:
                    text += part
                    if len(text) > _MAX_TEXT_FIELD:
                        raise UserError(
                            f"form field {name!r}: over {_MAX_TEXT_FIELD // 1024} KiB; text fields hold a "
                            "point, a diameter or a label"
                        )
                if done:
                    break
                if not more():
                    raise malformed("ended inside a part (no closing boundary)")
        finally:
            if sink is not None:
                sink.close()
        if keep:
            fields[str(name)] = FormField(
                str(name), bytes(text), str(filename) if filename is not None else None, path, size
            )
    if not fields:
        raise UserError("request body: no form fields found; submit the form from the page")
    while left > 0:  # the epilogue, if any
        more()
        buf = b""
    return fields


def parse_multipart(content_type: str, body_file: Any) -> dict[str, FormField]:
    """Parse a whole ``multipart/form-data`` body from a file object into memory.

    Args:
        content_type: The request's Content-Type header (with its boundary).
        body_file: A binary file object holding the request body.

    Returns:
        Field name -> :class:`FormField` with ``data`` filled (the first of repeated names wins).

    Raises:
        UserError: Not multipart/form-data, or no parts found.
    """
    _boundary(content_type)
    body_file.seek(0, os.SEEK_END)
    length = body_file.tell()
    body_file.seek(0)
    with tempfile.TemporaryDirectory(prefix="liverlesion-serve-") as tmp:
        fields = stream_multipart(content_type, body_file.read, length, Path(tmp))
        for f in fields.values():
            if f.path is not None:
                f.data, f.path = f.path.read_bytes(), None
    return fields


# --------------------------------------------------------------------------- prediction


def _suffix(filename: str, allowed: Sequence[str]) -> str:
    low = filename.lower()
    for suf in allowed:
        if low.endswith(suf):
            return suf
    return ""


def _file(fields: dict[str, FormField], name: str) -> FormField | None:
    f = fields.get(name)
    return f if f is not None and f.filename and (f.data or f.size) else None


def _text(fields: dict[str, FormField], name: str) -> str:
    f = fields.get(name)
    return f.text if f is not None and f.filename is None else ""


def _number(fields: dict[str, FormField], name: str, what: str) -> float | None:
    raw = _text(fields, name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError as exc:
        raise UserError(f"{what} {raw!r}: not a number; enter a number of mm such as 12.5") from exc
    if not math.isfinite(value):
        raise UserError(f"{what} {raw!r}: must be a finite number")
    return value


def _run_prediction(clf, fields: dict[str, FormField], workdir: Path) -> dict[str, Any]:
    """Validate the form, read the uploads, classify, draw overlays.

    Returns:
        ``{"df": results table, "overlays": [(lesion_id, png bytes)], "info": JSON-ready dict}``.
    """
    from liverlesion.io import read_volume
    from liverlesion.predict import _sanitize, draw_lesion_overlay, parse_point, results_info

    image_f = _file(fields, "image")
    if image_f is None:
        raise UserError("CT file: none uploaded; choose a NIfTI (.nii/.nii.gz) or a .zip of one DICOM series")
    mask_f = _file(fields, "mask")
    point_txt = _text(fields, "point")
    diameter = _number(fields, "diameter", "diameter (mm)")
    label_txt = _text(fields, "label")
    min_size = _number(fields, "min_size_mm", "min size (mm)")
    min_size = 5.0 if min_size is None else min_size
    if (mask_f is None) == (not point_txt):
        got = "both a mask and a point" if mask_f is not None else "neither a mask nor a point"
        raise UserError(
            f"lesion: got {got}; give either a mask file (NIfTI) or a point x,y,z (LPS mm) with a diameter"
        )
    label = None
    if label_txt:
        if mask_f is None:
            raise UserError(
                f"label {label_txt!r}: selects a lesion in the mask; upload a mask or clear the label"
            )
        try:
            label = int(label_txt)
        except ValueError as exc:
            raise UserError(
                f"label {label_txt!r}: not a whole number; enter the lesion's value in the mask"
            ) from exc
    xyz = None
    if point_txt:
        xyz = parse_point(point_txt, "point")
        if diameter is None:
            raise UserError(f"point {point_txt!r}: also give the lesion diameter in mm")
        from liverlesion.lesions import check_diameter

        check_diameter(diameter, "diameter (mm)")
    elif diameter is not None:
        raise UserError(
            f"diameter (mm) {diameter:g}: only used with a point; enter a point or clear the diameter"
        )

    image_name = f"CT file {image_f.filename!r}"
    image_suf = _suffix(image_f.filename or "", _IMAGE_SUFFIXES)
    image_path = workdir / f"image{image_suf}"
    image_f.save(image_path)
    replace = {str(image_path): repr(image_f.filename)}
    mask_path = None
    if mask_f is not None:
        mask_suf = _suffix(mask_f.filename or "", _MASK_SUFFIXES)
        if not mask_suf:
            raise UserError(f"mask file {mask_f.filename!r}: expected a NIfTI file (.nii or .nii.gz)")
        mask_path = workdir / f"mask{mask_suf}"
        mask_f.save(mask_path)
        replace[str(mask_path)] = repr(mask_f.filename)
    try:
        volume = read_volume(image_path, kind="image", name=image_name)
        mask_vol = (
            read_volume(mask_path, kind="mask", name=f"mask file {mask_f.filename!r}")
            if mask_path is not None and mask_f is not None
            else None
        )
        case = clf._predict_case(
            volume,
            mask=mask_vol,
            label=label,
            point=xyz,
            diameter_mm=diameter,
            min_size_mm=min_size,
            patient_id="case",
            gradcam=True,
            tolerance=1e-3,
            image_name=image_name,
            mask_name=f"mask file {mask_f.filename!r}" if mask_f is not None else "mask",
            point_name="point",
            image_ref=str(image_f.filename),
        )
    except UserError as e:
        # Messages name our private temp files; show the user's own file names instead.
        msg = str(e)
        for path, name in replace.items():
            msg = msg.replace(path, name)
        msg = msg.replace(str(workdir), "(upload)")
        raise UserError(msg) from None
    overlays = []
    for r in case.results:
        png = draw_lesion_overlay(
            r, case.image, workdir / "overlays" / f"{_sanitize(r.row['lesion_id'])}.png", clf.class_names
        )
        overlays.append((str(r.row["lesion_id"]), png.read_bytes()))
    df = clf._frame([r.row for r in case.results])
    info = results_info(
        clf,
        df,
        min_size,
        {
            "image": image_f.filename,
            "mask": mask_f.filename if mask_f is not None else None,
            "label": label,
            "point_xyz_mm": list(xyz) if xyz is not None else None,
            "diameter_mm": diameter,
        },
    )
    return {"df": df, "overlays": overlays, "info": info}


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, so the JSON is strict."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is not None and not isinstance(obj, str | int | float | bool):
        try:
            import pandas as pd

            if pd.isna(obj):
                return None
        except (TypeError, ValueError):
            pass
        return str(obj)
    return obj


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:1em auto;padding:0 1em;color:#222}
.banner{background:#b00020;color:#fff;font-weight:bold;padding:.6em 1em;border-radius:4px;text-align:center}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
fieldset{margin:.8em 0}label{display:block;margin:.3em 0}.err{background:#fde;border:1px solid #b00020;padding:.6em}
img{max-width:100%;border:1px solid #ccc}small{color:#555}
"""


def _page(title: str, body: str) -> bytes:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<div class='banner'>Research use, not for diagnosis</div>{body}"
        f"<p><small>liverlesion {html.escape(__version__)}: {html.escape(DISCLAIMER)}</small></p>"
        "</body></html>"
    ).encode()


def _model_info_html(clf) -> str:
    d = clf.describe()
    rows = [
        ("classes", ", ".join(clf.class_names)),
        ("decision", clf.decision_rule),
        ("models", str(clf.n_models)),
    ]
    for i, m in enumerate(d["models"]):
        rows.append((f"model {i + 1}", f"{m.get('backbone') or '?'}, sha256 {m.get('sha256') or '?'}"))
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<h2>Model</h2><table>{cells}</table>"


def _form_html(clf) -> bytes:
    body = f"""
<h1>liverlesion: classify a liver lesion</h1>
{_model_info_html(clf)}
<form method="post" action="/predict" enctype="multipart/form-data">
<fieldset><legend>CT</legend>
<label>CT file (NIfTI .nii/.nii.gz, or a .zip of one DICOM series)
<input type="file" name="image" required></label></fieldset>
<fieldset><legend>Lesion: a mask, or a point</legend>
<label>Mask file (NIfTI, aligned with the CT) <input type="file" name="mask"></label>
<label>Label in the mask (empty: every lesion) <input type="number" name="label" step="1"></label>
<p>or</p>
<label>Point x,y,z (LPS mm, as DICOM viewers show) <input type="text" name="point" placeholder="-42.5,10.0,-120"></label>
<label>Diameter (mm) <input type="text" name="diameter" placeholder="18"></label>
</fieldset>
<label>Min size (mm): smaller lesions are not classified <input type="text" name="min_size_mm" value="5"></label>
<p><button type="submit">Classify</button></p>
</form>"""
    return _page("liverlesion", body)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.3f}"
    return "-" if v is None else str(v)


def _results_html(clf, result: dict[str, Any]) -> bytes:
    df = result["df"]
    cols = ["lesion_id", "pred_class", *[f"prob_{c}" for c in clf.class_names], "uncertainty"]
    cols += ["max_axial_diameter_mm", "min_axis_mm", "volume_ml", "status"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(rec.get(c)))}</td>" for c in cols) + "</tr>"
        for rec in df.astype(object).to_dict(orient="records")
    )
    csv_b64 = base64.b64encode(df.to_csv(index=False).encode("utf-8")).decode("ascii")
    json_b64 = base64.b64encode(
        json.dumps(_json_safe(result["info"]), indent=2, allow_nan=False).encode("utf-8")
    ).decode("ascii")
    imgs = "".join(
        f"<h3>{html.escape(lid)}</h3><img alt='overlay {html.escape(lid)}' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"
        for lid, png in result["overlays"]
    )
    body = (
        f"<h1>Results</h1><p>{len(df)} lesion(s); decision: {html.escape(clf.decision_rule)}; "
        f"{clf.n_models} model(s).</p><table><tr>{head}</tr>{rows}</table>"
        f"<p>Download: <a download='results.csv' href='data:text/csv;base64,{csv_b64}'>results.csv</a> · "
        f"<a download='results.json' href='data:application/json;base64,{json_b64}'>results.json</a> · "
        "<a href='/'>classify another</a></p>"
        f"{imgs}"
    )
    return _page("liverlesion results", body)


def _error_html(status: int, message: str) -> bytes:
    body = f"<h1>Error {status}</h1><p class='err'>{html.escape(message)}</p><p><a href='/'>back to the form</a></p>"
    return _page(f"liverlesion error {status}", body)


# --------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = f"liverlesion/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        # Request lines only (method, path, status): never form contents.
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "5")
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(_json_safe(obj), indent=2, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def _error(self, api: bool, status: int, message: str) -> None:
        if api:
            self._send_json(status, {"error": message, "disclaimer": DISCLAIMER})
        else:
            self._send(status, _error_html(status, message), "text/html; charset=utf-8")

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        path = self.path.split("?", 1)[0]
        clf = self.server.classifier
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, _form_html(clf), "text/html; charset=utf-8")
        elif path == "/api/health":
            self._send_json(HTTPStatus.OK, {"status": "ok", "classes": clf.class_names})
        else:
            self._error(path.startswith("/api/"), HTTPStatus.NOT_FOUND, f"{path}: no such page; go to /")

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        path = self.path.split("?", 1)[0]
        api = path == "/api/predict"
        if path not in ("/predict", "/api/predict"):
            self._error(
                path.startswith("/api/"), HTTPStatus.NOT_FOUND, f"{path}: no such endpoint; POST to /predict"
            )
            return
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if length < 0:
            self._error(
                api,
                HTTPStatus.LENGTH_REQUIRED,
                "request: Content-Length missing; submit the form from the page",
            )
            return
        limit = self.server.max_upload_bytes
        if length > limit:
            self._error(
                api,
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"upload of {length / 1e6:.1f} MB: over the server's limit of {limit / 1e6:.1f} MB; "
                "upload a smaller file (e.g. a NIfTI of the series) or restart the server with a larger "
                f"--max-upload-mb (now {limit / 1024**2:g})",
            )
            return
        slots = self.server.slots
        if not slots.acquire(blocking=False):
            self._drain(length)
            n = self.server.max_concurrent
            self._error(
                api,
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"server busy: {n} requests already in progress (--max-concurrent {n}); retry in a few seconds",
            )
            return
        try:
            self._predict(api, length)
        finally:
            slots.release()

    def _drain(self, length: int) -> None:
        """Read a small refused body, so closing the socket does not reset the reply."""
        if 0 < length <= _CHUNK:
            self.rfile.read(length)

    def _predict(self, api: bool, length: int) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="liverlesion-serve-"))  # mode 0700: private
        reply: tuple[int, Any] = (HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        try:
            # The body goes straight to files in workdir: never whole in memory.
            fields = stream_multipart(self.headers.get("Content-Type", ""), self.rfile.read, length, workdir)
            # One prediction at a time: models and Grad-CAM hooks are not thread-safe.
            with self.server.predict_lock:
                result = _run_prediction(self.server.classifier, fields, workdir)
            del fields
            if api:
                info = result["info"]
                reply = (
                    HTTPStatus.OK,
                    {
                        k: info[k]
                        for k in (
                            "tool",
                            "liverlesion_version",
                            "disclaimer",
                            "class_names",
                            "decision_rule",
                            "n_models",
                            "min_size_mm",
                            "lesions",
                        )
                    },
                )
            else:
                reply = (HTTPStatus.OK, _results_html(self.server.classifier, result))
        except UserError as e:
            reply = (HTTPStatus.BAD_REQUEST, str(e))
        except Exception as e:
            # Log where it failed, not the message: it may quote file names or values from the upload.
            log.error(
                "prediction failed with %s:\n%s",
                type(e).__name__,
                "".join(traceback.format_tb(e.__traceback__)),
            )
            reply = (
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "internal error while classifying; the server log has the details (no patient data is logged)",
            )
        finally:
            # removed before the reply is sent: a client that has its answer finds no upload left
            shutil.rmtree(workdir, ignore_errors=True)
        status, payload = reply
        if status != HTTPStatus.OK:
            self._error(api, status, str(payload))
        elif api:
            self._send_json(status, payload)
        else:
            self._send(status, payload, "text/html; charset=utf-8")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: a burst of clients is queued, not refused (default 5)

    def __init__(
        self,
        address: tuple[str, int],
        classifier,
        max_upload_bytes: int,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    ):
        self.classifier = classifier
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_concurrent = int(max_concurrent)
        self.slots = threading.BoundedSemaphore(self.max_concurrent)  # POSTs in flight
        self.predict_lock = threading.Lock()
        super().__init__(address, _Handler)


def make_server(
    models: Sequence[str | os.PathLike] | Any,
    host: str = "127.0.0.1",
    port: int = 8765,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    **load: Any,
) -> ThreadingHTTPServer:
    """Load the classifier once and bind the server (not yet serving).

    Args:
        models: Checkpoint path(s), or an already loaded :class:`~liverlesion.predict.Classifier`.
        host: Address to bind; 127.0.0.1 keeps it local (there is no authentication).
        port: TCP port; 0 picks a free one (see ``server.server_address``).
        max_upload_bytes: Bigger requests get HTTP 413.
        **load: ``device``, ``backend``, ``threads``, ``batch_size`` for
            :meth:`~liverlesion.predict.Classifier.load`.
        max_upload_bytes: Bigger requests get HTTP 413 (refused from the headers, before the body is read).
        max_concurrent: Prediction requests in flight at once (uploading, or queued for the model, which
            classifies one at a time); more get HTTP 503 with Retry-After. Each holds at most
            ``max_upload_bytes`` on disk in its private temp folder, none in memory.

    Raises:
        UserError: Unreadable checkpoints, bad limit, or the port cannot be bound.
    """
    from liverlesion.predict import Classifier

    if not (isinstance(max_upload_bytes, int) and max_upload_bytes > 0):
        raise UserError(f"max upload size {max_upload_bytes!r}: must be a positive number of bytes")
    if not (isinstance(max_concurrent, int) and 1 <= max_concurrent <= 10_000):
        raise UserError(
            f"--max-concurrent {max_concurrent!r}: must be a whole number from 1 to 10000 "
            f"(default {DEFAULT_MAX_CONCURRENT})"
        )
    if not (0 <= int(port) <= 65535):
        raise UserError(f"--port {port}: must be between 0 and 65535 (default 8765)")
    clf = models if isinstance(models, Classifier) else Classifier.load([Path(m) for m in models], **load)
    try:
        return _Server((host, int(port)), clf, max_upload_bytes, max_concurrent)
    except OSError as e:
        raise UserError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another --port"
        ) from None


def serve(
    models: Sequence[str | os.PathLike],
    host: str = "127.0.0.1",
    port: int = 8765,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    **load: Any,
) -> None:
    """``liverlesion serve``: load the checkpoints and serve the UI until Ctrl-C.

    ``load``: ``device``, ``backend``, ``threads``, ``batch_size`` (see :func:`make_server`).

    Raises:
        UserError: See :func:`make_server`.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"liverlesion: warning: --host {host}: the server has no authentication; anyone who can reach "
            "this address can upload CT data and see results. Use 127.0.0.1 unless the network is trusted.",
            file=sys.stderr,
        )
    server = make_server(models, host, port, max_upload_bytes, max_concurrent, **load)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
        )
    h, p = server.server_address[:2]
    shown = f"[{h}]" if ":" in str(h) else h
    print(f"liverlesion: serving on http://{shown}:{p}/ ({DISCLAIMER}); Ctrl-C to stop", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("liverlesion: stopped", file=sys.stderr)
    finally:
        server.server_close()
