"""A CSV table this tool wrote (``predictions.csv``, ``results.csv``), checked for a cut or ragged row
before pandas reads it: pandas pads a short row with empty cells, which then surface as misleading
errors (an "empty true_class") far from the cause (a copy or a write cut short).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from liverlesion.errors import UserError


def check_csv_complete(path: str | Path, fix: str) -> None:
    """Refuse a CSV whose rows do not all have the header's number of fields.

    A short last row (most often with no newline at its end) is a file cut short; any other row
    with a different count is a damaged or hand-edited file. Unreadable or undecodable files are
    left to the caller's reader, which says so in its own words.

    Args:
        path: The CSV file.
        fix: What to do about it, e.g. ``"re-run `liverlesion predict` or copy the file again"``.

    Raises:
        UserError: One line naming the file, the file line and the field counts.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError:
        return
    if b"\x00" in data[:65536]:  # no CSV holds NUL bytes: another kind of file (or a damaged one)
        raise UserError(
            f"{path}: binary data, not a CSV table (another kind of file given in its place, e.g. a checkpoint "
            f"or an image, or a damaged copy); check the path, or {fix}"
        )
    text = data.decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        records = [(reader.line_num, rec) for rec in reader]
    except csv.Error:
        return  # e.g. an unclosed quote: pandas says so
    records = [(ln, rec) for ln, rec in records if rec]  # blank lines
    if len(records) < 2:
        return
    n = len(records[0][1])
    last_line = records[-1][0]
    for line, rec in records[1:]:
        if len(rec) == n:
            continue
        if line == last_line and len(rec) < n:
            ending = "" if text.endswith(("\n", "\r")) else ", and the file does not end with a newline"
            raise UserError(
                f"{path}: looks truncated: its last row (file line {line}) has {len(rec)} of the header's {n} "
                f"fields{ending}; the file was cut short (an interrupted copy or write): {fix}"
            )
        raise UserError(
            f"{path}: file line {line} has {len(rec)} fields but the header has {n}; the file is damaged or "
            f"was edited by hand: {fix}"
        )
