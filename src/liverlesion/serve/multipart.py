"""Streamed ``multipart/form-data`` parsing: uploaded files go straight to disk, never whole in memory."""

from __future__ import annotations

import email.parser
import email.policy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liverlesion.errors import UserError

__all__ = ["CHUNK", "FormField", "parse_multipart", "stream_multipart"]

CHUNK = 1024 * 1024
_CHUNK = CHUNK

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
