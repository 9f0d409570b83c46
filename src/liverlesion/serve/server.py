"""The HTTP server: routes, limits and replies (stdlib ``ThreadingHTTPServer`` on 127.0.0.1).

The classifier is loaded once. The viewer (``/``) opens a study once (``POST /api/studies``), keeps
it loaded (:mod:`.studies`) and classifies clicks on it as queued jobs (:mod:`.jobs`); the one-shot form
(``/form``, ``POST /predict``, ``POST /api/predict``) classifies each upload and forgets it
(:mod:`.oneshot`). Uploads go to a private temporary folder that is always deleted before the reply.

Routes (JSON under ``/api``):
    GET    /                                         the viewer (static files under /static/)
    GET    /form                                     the one-shot form (no JavaScript)
    POST   /predict, /api/predict                    one-shot: CT + mask or LPS point -> results
    GET    /api/health, /api/info                    status; model, decision rule, limits
    POST   /api/studies                              upload image (+ mask) -> study id, shape, spacing
    GET    /api/studies/{id}                         the study's info
    DELETE /api/studies/{id}                         close it now
    GET    /api/studies/{id}/slice/{k}.png?wl=&ww=   windowed axial slice with outlines
    GET    /api/studies/{id}/hu?k=&x=&y=             one voxel's HU and LPS position (the mouse readout)
    POST   /api/studies/{id}/classify[?wait=1]       a click / label / all -> job (202) or result
    GET    /api/jobs/{job}                           queued / running (stage) / done (result) / error
    GET    /api/studies/{id}/lesions/{lesion}/overlay.png[?gradcam=1]
    GET    /api/studies/{id}/results.csv | results.json | report-sr.dcm | seg.dcm

Any GET route also answers HEAD. A known path asked with another method gets 405 with an ``Allow``
header; an unknown path 404; both as ``{"error": ..., "disclaimer": ...}`` under ``/api``.

There is no authentication: anyone who can reach the port can upload data, so only bind to
another host than 127.0.0.1 on a trusted network.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from liverlesion import DISCLAIMER, __version__
from liverlesion.errors import UserError
from liverlesion.serve import downloads, oneshot, viewer
from liverlesion.serve.jobs import JobGone, JobQueue
from liverlesion.serve.multipart import CHUNK, stream_multipart
from liverlesion.serve.studies import (
    DEFAULT_MAX_STUDIES,
    DEFAULT_MAX_STUDY_BYTES,
    DEFAULT_STUDY_TTL_S,
    StudyGone,
    StudyStore,
)

__all__ = ["DEFAULT_MAX_CONCURRENT", "DEFAULT_MAX_UPLOAD_BYTES", "make_server", "serve"]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024**3  # 2 GiB: a thin-slice abdominal CT zip fits
DEFAULT_MAX_CONCURRENT = 64  # requests in flight (uploading or waiting for the model); more get 503
_MAX_JSON = 64 * 1024  # a classify request is a few numbers
_STATIC = {
    "viewer.html": "text/html; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}
_SID = r"(?P<sid>[A-Za-z0-9_-]{1,64})"
_ROUTES_GET = [
    (re.compile(rf"^/api/studies/{_SID}$"), "study"),
    (re.compile(rf"^/api/studies/{_SID}/slice/(?P<k>-?\d{{1,6}})\.png$"), "slice"),
    (re.compile(rf"^/api/studies/{_SID}/hu$"), "hu"),
    (re.compile(rf"^/api/studies/{_SID}/lesions/(?P<lid>[A-Za-z0-9._-]{{1,80}})/overlay\.png$"), "overlay"),
    (
        re.compile(rf"^/api/studies/{_SID}/(?P<name>results\.csv|results\.json|report-sr\.dcm|seg\.dcm)$"),
        "download",
    ),
    (re.compile(r"^/api/jobs/(?P<jid>[A-Za-z0-9_-]{1,64})$"), "job"),
]
_CLASSIFY = re.compile(rf"^/api/studies/{_SID}/classify$")
_DELETE = re.compile(rf"^/api/studies/{_SID}$")
_PAGES = ("/", "/index.html", "/form", "/api/health", "/api/info")
_UPLOADS = ("/predict", "/api/predict", "/api/studies")


def allowed_methods(path: str) -> tuple[str, ...] | None:
    """The methods a URL path answers (its ``Allow`` header), or None when no route has that path."""
    if path in _PAGES or (path.startswith("/static/") and path[len("/static/") :] in _STATIC):
        return ("GET", "HEAD")
    if path in _UPLOADS or _CLASSIFY.match(path):
        return ("POST",)
    if _DELETE.match(path):
        return ("GET", "HEAD", "DELETE")
    if any(rx.match(path) for rx, _ in _ROUTES_GET):
        return ("GET", "HEAD")
    return None


def _content_length(headers: Any) -> int:
    """Content-Length as a number; 0 when absent or not a number (for draining a refused body)."""
    try:
        return max(int(headers.get("Content-Length") or 0), 0)
    except ValueError:
        return 0


def too_large_message(length: int, limit: int) -> str:
    """The 413 refusal of an upload; the viewer page says the same, word for word, before uploading
    (viewer.js ``tooLarge``: keep the two in step)."""
    return (
        f"upload of {length / 1e6:.1f} MB: over the server's limit of {limit / 1e6:.1f} MB; "
        "upload a smaller file (e.g. a NIfTI of the series) or restart the server with a larger "
        f"--max-upload-mb (now {limit / 1024**2:g})"
    )


def _static(name: str) -> bytes:
    return resources.files("liverlesion.serve").joinpath("static", name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = f"liverlesion/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        # Request lines only (method, path, status): never form contents.
        log.info("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ replies
    def _send(
        self, status: int, body: bytes, ctype: str, download: str | None = None, allow: str | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if download:
            self.send_header("Content-Disposition", f'attachment; filename="{download}"')
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "5")
        if allow:
            self.send_header("Allow", allow)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _send_json(self, status: int, obj: Any, allow: str | None = None) -> None:
        body = json.dumps(oneshot.json_safe(obj), indent=2, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", allow=allow)

    def _error(self, api: bool, status: int, message: str, allow: str | None = None) -> None:
        if api:
            self._send_json(status, {"error": message, "disclaimer": DISCLAIMER}, allow)
        else:
            self._send(status, oneshot.error_html(status, message), "text/html; charset=utf-8", allow=allow)

    def _no_route(self, path: str, api: bool) -> None:
        """Answer a request no route takes: 405 + Allow when the path exists for other methods, else 404."""
        allowed = allowed_methods(path)
        if allowed is None:
            where = "see GET /api/info" if api else "go to /"
            self._error(
                api, HTTPStatus.NOT_FOUND, f"{path}: no such {'endpoint' if api else 'page'}; {where}"
            )
        else:
            self._error(
                api,
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{self.command} {path}: method not allowed; this URL answers {', '.join(allowed)}",
                allow=", ".join(allowed),
            )

    def _refuse_method(self) -> None:
        """PUT, PATCH, OPTIONS, TRACE, CONNECT: no route takes them (was the stdlib's 501 HTML page)."""
        self._drain(_content_length(self.headers))
        path = unquote(urlsplit(self.path).path)
        self._no_route(path, path.startswith("/api/"))

    do_PUT = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method  # noqa: N815 (stdlib names)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (unknown method, bad request line, headers too large) in our shape."""
        path = unquote(urlsplit(getattr(self, "path", "") or "").path)
        if not path.startswith("/api/"):
            super().send_error(code, message, explain)
            return
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            self._drain(_content_length(self.headers))
            allowed = allowed_methods(path)
            hint = f"this URL answers {', '.join(allowed)}" if allowed else "see GET /api/info"
            text = f"{self.command} {path}: method not supported; {hint}"
        else:
            text = f"request: {message or HTTPStatus(code).phrase}"
        self._error(True, code, text)

    def _internal(self, e: Exception, api: bool) -> None:
        # Log where it failed, not the message: it may quote file names or values from the upload.
        log.error(
            "request failed with %s:\n%s", type(e).__name__, "".join(traceback.format_tb(e.__traceback__))
        )
        self._error(
            api,
            HTTPStatus.INTERNAL_SERVER_ERROR,
            "internal error; the server log has the details (no patient data is logged)",
        )

    @staticmethod
    def _status_of(e: UserError) -> int:
        if isinstance(e, (StudyGone, JobGone)):
            return HTTPStatus.NOT_FOUND
        if isinstance(e, downloads.NotAvailable):
            return HTTPStatus.CONFLICT
        if str(e).startswith("server busy"):
            return HTTPStatus.SERVICE_UNAVAILABLE
        return HTTPStatus.BAD_REQUEST

    # ------------------------------------------------------------------ GET
    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        api = path.startswith("/api/")
        srv = self.server
        try:
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, _static("viewer.html"), _STATIC["viewer.html"])
            elif path.startswith("/static/") and path[len("/static/") :] in _STATIC:
                name = path[len("/static/") :]
                self._send(HTTPStatus.OK, _static(name), _STATIC[name])
            elif path == "/form":
                self._send(HTTPStatus.OK, oneshot.form_html(srv.classifier), "text/html; charset=utf-8")
            elif path == "/api/health":
                self._send_json(HTTPStatus.OK, {"status": "ok", "classes": srv.classifier.class_names})
            elif path == "/api/info":
                self._send_json(HTTPStatus.OK, self._info())
            else:
                for rx, name in _ROUTES_GET:
                    m = rx.match(path)
                    if m:
                        getattr(self, f"_get_{name}")(query, **m.groupdict())
                        return
                self._no_route(path, api)
        except UserError as e:
            self._error(api, self._status_of(e), str(e))
        except Exception as e:
            self._internal(e, api)

    def _info(self) -> dict[str, Any]:
        clf = self.server.classifier
        return {
            "tool": "liverlesion",
            "liverlesion_version": __version__,
            "disclaimer": DISCLAIMER,
            **clf.describe(),
            "max_upload_bytes": self.server.max_upload_bytes,
            "study_ttl_s": self.server.studies.ttl_s,
            "presets": {k: {"level": c, "width": w} for k, (c, w) in viewer.PRESETS.items()},
        }

    def _get_study(self, query: dict, sid: str) -> None:
        self._send_json(HTTPStatus.OK, viewer.study_info(self.server.studies.get(sid)))

    def _get_slice(self, query: dict, sid: str, k: str) -> None:
        study = self.server.studies.get(sid)
        level, width = viewer.parse_window(query)
        outline = (query.get("outline") or ["1"])[0] != "0"
        self._send(HTTPStatus.OK, viewer.render_slice(study, int(k), level, width, outline), "image/png")

    def _get_hu(self, query: dict, sid: str) -> None:
        self._send_json(HTTPStatus.OK, viewer.hu_at(self.server.studies.get(sid), query))

    def _get_overlay(self, query: dict, sid: str, lid: str) -> None:
        study = self.server.studies.get(sid)
        gradcam = (query.get("gradcam") or ["0"])[0] == "1"
        with self.server.predict_lock:  # Grad-CAM runs the network
            png = viewer.overlay_png(self.server.classifier, study, lid, gradcam)
        self._send(HTTPStatus.OK, png, "image/png")

    def _get_download(self, query: dict, sid: str, name: str) -> None:
        clf, study = self.server.classifier, self.server.studies.get(sid)
        if name == "results.csv":
            self._send(HTTPStatus.OK, downloads.results_csv(clf, study), "text/csv; charset=utf-8", name)
        elif name == "results.json":
            body = json.dumps(downloads.results_json(clf, study), indent=2, allow_nan=False).encode("utf-8")
            self._send(HTTPStatus.OK, body, "application/json; charset=utf-8", name)
        elif name == "report-sr.dcm":
            self._send(HTTPStatus.OK, downloads.results_sr(clf, study), "application/dicom", name)
        else:
            self._send(HTTPStatus.OK, downloads.results_seg(clf, study), "application/dicom", name)

    def _get_job(self, query: dict, jid: str) -> None:
        job, ahead = self.server.jobs.get(jid)
        self._send_json(HTTPStatus.OK, job.describe(ahead))

    do_HEAD = do_GET  # noqa: N815 (stdlib name); _send leaves the body out

    # ------------------------------------------------------------------ DELETE
    def do_DELETE(self) -> None:  # noqa: N802 (stdlib name)
        path = unquote(urlsplit(self.path).path)
        m = _DELETE.match(path)
        if not m:
            self._refuse_method()
        elif self.server.studies.remove(m["sid"]):
            self._send_json(HTTPStatus.OK, {"closed": m["sid"]})
        else:
            self._error(True, HTTPStatus.NOT_FOUND, f"study {m['sid']!r}: no such study (already closed?)")

    # ------------------------------------------------------------------ POST
    def _length(self, api: bool, limit: int, json_body: bool = False) -> int | None:
        """The body's Content-Length, or None after answering 400/411/413.

        ``json_body``: a classify request, whose size limit is fixed (not ``--max-upload-mb``).
        """
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._error(
                api,
                HTTPStatus.LENGTH_REQUIRED,
                "request: Content-Length missing (a chunked body is not accepted); "
                + ("send the JSON with a Content-Length" if json_body else "submit the form from the page"),
            )
            return None
        try:
            length = int(raw.strip())
        except ValueError:
            length = -1
        if length < 0:
            self._error(
                api,
                HTTPStatus.BAD_REQUEST,
                f"request: Content-Length {raw[:40]!r} is not a byte count; send the body's length in bytes",
            )
            return None
        if length > limit and json_body:
            self._error(
                api,
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"classify request of {length} bytes: over the {limit // 1024} KiB a click, label or "
                'all needs; send a small JSON object such as {"slice": 40, "x_px": 120, "y_px": 96}',
            )
            return None
        if length > limit:
            self._error(api, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large_message(length, limit))
            return None
        return length

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        path = urlsplit(self.path).path
        api = path.startswith("/api/")
        m = _CLASSIFY.match(path)
        if m:
            self._classify(m["sid"], parse_qs(urlsplit(self.path).query))
            return
        if path not in _UPLOADS:
            self._refuse_method()
            return
        length = self._length(api, self.server.max_upload_bytes)
        if length is None:
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
            self._upload(path, api, length)
        finally:
            slots.release()

    def _drain(self, length: int) -> None:
        """Read a small refused body, so closing the socket does not reset the reply."""
        if 0 < length <= CHUNK:
            self.rfile.read(length)

    def _upload(self, path: str, api: bool, length: int) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="liverlesion-serve-"))  # mode 0700: private
        reply: tuple[int, Any] = (HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        try:
            # The body goes straight to files in workdir: never whole in memory.
            fields = stream_multipart(self.headers.get("Content-Type", ""), self.rfile.read, length, workdir)
            if path == "/api/studies":
                study = viewer.open_study(self.server.studies, fields, workdir)
                reply = (HTTPStatus.CREATED, viewer.study_info(study))
            else:
                # One prediction at a time: models and Grad-CAM hooks are not thread-safe.
                with self.server.predict_lock:
                    result = oneshot.run_prediction(self.server.classifier, fields, workdir)
                if api:
                    info = result["info"]
                    keys = ("tool", "liverlesion_version", "disclaimer", "class_names", "decision_rule")
                    keys += ("n_models", "min_size_mm", "lesions")
                    reply = (HTTPStatus.OK, {k: info[k] for k in keys})
                else:
                    reply = (HTTPStatus.OK, oneshot.results_html(self.server.classifier, result))
            del fields
        except UserError as e:
            reply = (self._status_of(e), str(e))
        except Exception as e:
            log.error(
                "upload failed with %s:\n%s", type(e).__name__, "".join(traceback.format_tb(e.__traceback__))
            )
            reply = (
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "internal error while classifying; the server log has the details (no patient data is logged)",
            )
        finally:
            # removed before the reply is sent: a client that has its answer finds no upload left
            shutil.rmtree(workdir, ignore_errors=True)
        status, payload = reply
        if status >= 400:
            self._error(api, status, str(payload))
        elif api:
            self._send_json(status, payload)
        else:
            self._send(status, payload, "text/html; charset=utf-8")

    def _classify(self, sid: str, query: dict) -> None:
        length = self._length(True, _MAX_JSON, json_body=True)
        if length is None:
            return
        try:
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw.decode("utf-8") or "null")
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # Recursion: [[[[...
                raise UserError(
                    f"classify request: not JSON ({e.__class__.__name__}); send a JSON object such as "
                    '{"slice": 40, "x_px": 120, "y_px": 96, "diameter_mm": 15}'
                ) from None
            srv = self.server
            study = srv.studies.get(sid)
            spec = viewer.parse_classify(study, body)  # bad input is answered now, not after the queue
            job = srv.jobs.submit(study.id, lambda job: viewer.classify(srv.classifier, study, spec, job))
            if (query.get("wait") or ["0"])[0] == "1":
                job.done.wait()
                if job.state == "done":
                    self._send_json(HTTPStatus.OK, job.result)
                else:
                    self._error(True, job.status, str(job.error))
                return
            self._send_json(
                HTTPStatus.ACCEPTED,
                {**job.describe(), "status_url": f"/api/jobs/{job.id}"},
            )
        except UserError as e:
            self._error(True, self._status_of(e), str(e))
        except Exception as e:
            self._internal(e, True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: a burst of clients is queued, not refused (default 5)

    def __init__(
        self,
        address: tuple[str, int],
        classifier,
        max_upload_bytes: int,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        studies: StudyStore | None = None,
    ):
        self.classifier = classifier
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_concurrent = int(max_concurrent)
        self.slots = threading.BoundedSemaphore(self.max_concurrent)  # uploads in flight
        self.predict_lock = threading.Lock()
        self.studies = studies if studies is not None else StudyStore()
        self.jobs = JobQueue(self.max_concurrent, self.predict_lock)
        super().__init__(address, _Handler)

    def server_close(self) -> None:
        super().server_close()
        self.jobs.shutdown()


def make_server(
    models: Sequence[str | os.PathLike] | Any,
    host: str = "127.0.0.1",
    port: int = 8765,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_studies: int = DEFAULT_MAX_STUDIES,
    study_ttl_s: float = DEFAULT_STUDY_TTL_S,
    max_study_bytes: int = DEFAULT_MAX_STUDY_BYTES,
    **load: Any,
) -> ThreadingHTTPServer:
    """Load the classifier once and bind the server (not yet serving).

    Args:
        models: Checkpoint path(s), or an already loaded :class:`~liverlesion.predict.Classifier`.
        host: Address to bind; 127.0.0.1 keeps it local (there is no authentication).
        port: TCP port; 0 picks a free one (see ``server.server_address``).
        max_upload_bytes: Bigger requests get HTTP 413 (refused from the headers, before the body is read).
        max_concurrent: Upload requests in flight at once, and classifications queued for the model
            (which classifies one at a time); more get HTTP 503 with Retry-After. Each upload holds at
            most ``max_upload_bytes`` on disk in its private temp folder, none in memory.
        max_studies: Viewer studies kept loaded at once (the least recently used is closed first).
        study_ttl_s: A study unused this long is closed.
        max_study_bytes: Memory for the arrays of all loaded studies together.
        **load: ``device``, ``backend``, ``threads``, ``batch_size`` for
            :meth:`~liverlesion.predict.Classifier.load`.

    Raises:
        UserError: Unreadable checkpoints, bad limit, or the port cannot be bound.
    """
    from liverlesion.predict import Classifier  # local: heavy (scipy)

    if not (isinstance(max_upload_bytes, int) and max_upload_bytes > 0):
        raise UserError(f"max upload size {max_upload_bytes!r}: must be a positive number of bytes")
    if not (isinstance(max_concurrent, int) and 1 <= max_concurrent <= 10_000):
        raise UserError(
            f"--max-concurrent {max_concurrent!r}: must be a whole number from 1 to 10000 "
            f"(default {DEFAULT_MAX_CONCURRENT})"
        )
    if not (0 <= int(port) <= 65535):
        raise UserError(f"--port {port}: must be between 0 and 65535 (default 8765)")
    studies = StudyStore(max_studies, max_study_bytes, study_ttl_s)
    clf = models if isinstance(models, Classifier) else Classifier.load([Path(m) for m in models], **load)
    try:
        return _Server((host, int(port)), clf, max_upload_bytes, max_concurrent, studies)
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
    **kw: Any,
) -> None:
    """``liverlesion serve``: load the checkpoints and serve the viewer until Ctrl-C.

    ``kw``: ``max_studies``, ``study_ttl_s``, ``device``, ``backend``, ``threads``, ``batch_size``
    (see :func:`make_server`).

    Raises:
        UserError: See :func:`make_server`.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"liverlesion: warning: --host {host}: the server has no authentication; anyone who can reach "
            "this address can upload CT data and see results. Use 127.0.0.1 unless the network is trusted.",
            file=sys.stderr,
        )
    server = make_server(models, host, port, max_upload_bytes, max_concurrent, **kw)
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
