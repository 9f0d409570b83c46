"""The manifest CSV: one row per lesion source (a mask, or a click with a diameter).

Columns (header names are matched after trimming spaces and lower-casing):

* required: ``patient_id``, ``image``, ``lesion_class`` (for ``predict`` ``lesion_class`` is optional
  and may be empty: cases without a diagnosis yet);
* either ``mask`` (optional ``label``; for a DICOM SEG mask the label selects segments by
  number or SegmentLabel, see :mod:`liverlesion.dicom_seg`) or a click ``x_mm, y_mm, z_mm, diameter_mm``
  (LPS millimetres, as a PACS viewer shows DICOM patient coordinates); each row
  has exactly one of the two;
* optional: ``series`` (SeriesInstanceUID when the image folder holds several).

``image`` and ``mask`` are relative to the manifest's folder (absolute paths are
accepted). Unknown columns are rejected, so a typo (``lable``) is never silently
ignored. Every problem is reported as one line naming the manifest, the row
("row N" is file line N + 1: "row 1" is the first data row under the header, and blank lines
count as a spreadsheet counts them) and the value.
"""

from __future__ import annotations

import csv
import io as _io
import math
import os
import zipfile
from pathlib import Path

import pandas as pd

from liverlesion.errors import UserError
from liverlesion.fileio import atomic_path
from liverlesion.seg_select import check_manifest_seg, is_seg

REQUIRED_COLUMNS = ("patient_id", "image", "lesion_class")
MASK_COLUMNS = ("mask", "label")
CLICK_COLUMNS = ("x_mm", "y_mm", "z_mm", "diameter_mm")
OPTIONAL_COLUMNS = ("series",)
#: Every column a manifest may have, in the order ``write_manifest`` writes them.
COLUMNS = ("patient_id", "image", "mask", "label", "lesion_class", *CLICK_COLUMNS, "series")
#: Columns ``read_manifest`` adds: absolute paths and the 1-based data row number.
DERIVED_COLUMNS = ("image_path", "mask_path", "row")

_FIX_HEADER = (
    "the header must be patient_id,image,lesion_class plus mask[,label] and/or x_mm,y_mm,z_mm,diameter_mm "
    "(optional: series)"
)


def _decode(path: Path, data: bytes) -> str:
    """Decode manifest bytes as UTF-8 (a BOM is allowed), with a helpful error otherwise."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(
            f"manifest {path}: the file is UTF-16 text (Excel 'Unicode text'); save it as 'CSV UTF-8 (comma delimited)'"
        )
    if data.startswith(b"PK\x03\x04"):
        if _is_torch_zip(data):
            raise UserError(
                f"manifest {path}: a PyTorch file (e.g. a model.pt checkpoint), not a CSV file; give the manifest "
                "CSV here, and a checkpoint with --model"
            )
        raise UserError(
            f"manifest {path}: this is a zip/Excel workbook, not a CSV file; "
            "save it as 'CSV UTF-8 (comma delimited)'"
        )
    if b"\x00" in data[:65536]:
        raise UserError(f"manifest {path}: binary file, not a CSV text file; give the manifest CSV")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"manifest {path}: not UTF-8 text (byte 0x{data[e.start]:02x} on file line {line}); "
            "re-save it as 'CSV UTF-8' (e.g. Excel: Save As > CSV UTF-8)"
        ) from e


def _is_torch_zip(data: bytes) -> bool:
    from liverlesion.io.archive import is_torch_archive

    try:
        with zipfile.ZipFile(_io.BytesIO(data)) as zf:
            return is_torch_archive(zf)
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _where(path: Path, row: int) -> str:
    return f"manifest {path} row {row} (file line {row + 1})"


def _parse_float(path: Path, row: int, col: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise UserError(
            f"{_where(path, row)}: {col}={text!r} is not a number; give millimetres, e.g. 12.5"
        ) from e
    if not math.isfinite(value):
        raise UserError(
            f"{_where(path, row)}: {col}={text!r} is not a finite number; give millimetres, e.g. 12.5"
        )
    return value


def _parse_label(path: Path, row: int, text: str, mask_path: Path | None = None) -> int | str:
    try:
        value = float(text)
        ok = math.isfinite(value) and value.is_integer()
    except ValueError:
        ok = False
    if not ok and mask_path is not None:
        if is_seg(mask_path):  # a text label selects DICOM SEG segments by SegmentLabel
            return text
    if not ok:
        raise UserError(
            f"{_where(path, row)}: label={text!r} is not an integer; give the mask label value "
            "(e.g. 1), or leave it empty / 0 to use every connected component (a text label selects "
            "segments of a DICOM SEG mask only)"
        )
    if value < 0:
        raise UserError(
            f"{_where(path, row)}: label={text!r} is negative; give the mask label value (e.g. 1), "
            "or leave it empty / 0 to use every connected component"
        )
    return int(value)


def _resolve(base: Path, text: str) -> Path:
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else (base / p)


def _not_found(where: str, col: str, text: str, looked: Path) -> str:
    """The message for an image or mask path that does not exist."""
    if "\\" in text and os.sep == "/":  # a manifest written on Windows: here a backslash is part of a name
        return (
            f"{where}: {col} {text!r} not found: it is a Windows path (backslashes), which this system reads "
            f"as one file name; write it with forward slashes ({text.replace(chr(92), '/')!r}), relative to "
            "the manifest's folder, or give an absolute path on this system"
        )
    return (
        f"{where}: {col} {text!r} not found (looked for {looked}); "
        "paths are relative to the manifest's folder, or give an absolute path"
    )


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header (normalised) and data rows ``(row_number, fields)`` of a CSV file."""
    if not path.exists():
        raise UserError(f"manifest {path}: file not found; give the path of the manifest CSV")
    if path.is_dir():
        raise UserError(f"manifest {path}: is a folder; give the path of the manifest CSV file inside it")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(
            f"manifest {path}: cannot be read ({e.strerror}); check the path and permissions"
        ) from e
    text = _decode(path, data)
    reader = csv.reader(_io.StringIO(text, newline=""), strict=True)
    try:
        records = [(reader.line_num, rec) for rec in reader]
    except csv.Error as e:
        raise UserError(
            f"manifest {path}: not a valid CSV file (file line {reader.line_num}: {e}); "
            "check the quoting, or re-export it as CSV"
        ) from e
    # Each record's first file line (the reader counts to its last: a quoted field may span lines), so that
    # "row N" is always file line N + 1, blank lines counted as a spreadsheet counts them; blank lines skipped.
    starts = [1, *(end + 1 for end, _ in records[:-1])][: len(records)]
    records = [
        (start, rec) for start, (_, rec) in zip(starts, records, strict=True) if any(f.strip() for f in rec)
    ]
    if not records:
        raise UserError(f"manifest {path}: the file is empty; {_FIX_HEADER}, then one row per lesion source")
    header = [h.strip().lower() for h in records[0][1]]
    if header[0].startswith("sep="):
        raise UserError(
            f"manifest {path}: the first line {','.join(records[0][1])!r} is Excel's separator hint, not the "
            "header; delete that line so the header (patient_id,image,...) comes first"
        )
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        sep = "semicolons" if ";" in header[0] else "tabs"
        raise UserError(
            f"manifest {path}: the columns are separated by {sep}, not commas; save it as comma-separated CSV"
        )
    rows: list[tuple[int, list[str]]] = []
    for k, (line, rec) in enumerate(records[1:], start=1):
        i = line - 1  # the row number: file line - 1 (row 1 is file line 2, under the header)
        if k == len(records) - 1 and len(rec) < len(header) and not text.endswith(("\n", "\r")):
            raise UserError(
                f"{_where(path, i)}: {len(rec)} fields but the header has {len(header)}, and the file does not "
                "end with a newline: it looks cut short (an interrupted copy or save); copy or save it again"
            )
        if len(rec) != len(header):
            raise UserError(
                f"{_where(path, i)}: {len(rec)} fields but the header has {len(header)}; "
                "check for a missing or extra comma (quote values that contain commas)"
            )
        rows.append((i, [f.strip() for f in rec]))
    return header, rows


def _check_header(path: Path, header: list[str], need_class: bool = True) -> None:
    allowed = set(COLUMNS)
    empty = [i + 1 for i, h in enumerate(header) if not h]
    if empty:
        raise UserError(f"manifest {path}: header column {empty[0]} has no name; {_FIX_HEADER}")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise UserError(f"manifest {path}: duplicate column(s) {', '.join(dupes)}; keep one of each")
    unknown = [h for h in header if h not in allowed]
    if unknown:
        raise UserError(
            f"manifest {path}: unknown column(s) {', '.join(unknown)}; allowed columns are {', '.join(COLUMNS)}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in header and (need_class or c != "lesion_class")]
    if missing:
        raise UserError(f"manifest {path}: missing required column(s) {', '.join(missing)}; {_FIX_HEADER}")
    click = [c for c in CLICK_COLUMNS if c in header]
    if click and len(click) < len(CLICK_COLUMNS):
        lacking = [c for c in CLICK_COLUMNS if c not in header]
        raise UserError(
            f"manifest {path}: click columns {', '.join(click)} without {', '.join(lacking)}; "
            "a click needs all of x_mm,y_mm,z_mm,diameter_mm"
        )
    if "mask" not in header and not click:
        raise UserError(
            f"manifest {path}: no lesion source columns (mask, or x_mm,y_mm,z_mm,diameter_mm); {_FIX_HEADER}"
        )
    if "label" in header and "mask" not in header:
        raise UserError(f"manifest {path}: column label without column mask; add the mask column")


def read_manifest(path: str | os.PathLike, need_class: bool = True) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Args:
        path: The manifest file.
        need_class: Every row must have a ``lesion_class`` (training and evaluation); False for
            ``predict``, where the column may be absent or a cell empty (a case not diagnosed yet).

    Returns:
        One row per manifest row, with every column of :data:`COLUMNS` (absent ones
        empty): strings for ``patient_id``, ``image``, ``mask``, ``lesion_class`` and
        ``series`` ("" when empty; the original text, trimmed), ``label`` as nullable
        ``Int64`` (<NA> when empty), click columns as float (NaN when empty), plus
        ``image_path`` / ``mask_path`` (absolute path strings; ``mask_path`` is None
        for a click) and ``row`` (1-based data row number, for messages).

    Raises:
        UserError: For any problem with the file, its header or a row.
    """
    path = Path(path)
    header, rows = _read_rows(path)
    _check_header(path, header, need_class)
    if not rows:
        raise UserError(f"manifest {path}: no data rows under the header; add one row per lesion source")
    base = path.resolve().parent
    records = []
    seen: dict[tuple, list[tuple[int | str | None, int]]] = {}  # lesion source -> (label, row)
    image_patient: dict[str, tuple[str, int]] = {}
    class_spelling: dict[str, tuple[str, int]] = {}  # casefolded lesion_class -> (first spelling, row)
    for row, fields in rows:
        v = dict(zip(header, fields, strict=True))
        where = _where(path, row)
        rec: dict = {c: v.get(c, "") for c in ("patient_id", "image", "mask", "lesion_class", "series")}
        for col in ("patient_id", "image", "lesion_class") if need_class else ("patient_id", "image"):
            if not rec[col]:
                raise UserError(f"{where}: {col} is empty; fill it in or delete the row")
        click_text = {c: v.get(c, "") for c in CLICK_COLUMNS}
        has_click = any(click_text.values())
        has_mask = bool(rec["mask"])
        if has_mask and has_click:
            raise UserError(
                f"{where}: has both mask={rec['mask']!r} and a click (x_mm,y_mm,z_mm,diameter_mm); "
                "give one lesion source per row (split it into two rows if you need both)"
            )
        if not has_mask and not has_click:
            raise UserError(
                f"{where}: no lesion source; give a mask path or a click (x_mm,y_mm,z_mm,diameter_mm)"
            )
        label_text = v.get("label", "")
        rec["label"] = pd.NA
        if label_text:
            if not has_mask:
                raise UserError(
                    f"{where}: label={label_text!r} without a mask; give the mask or clear the label"
                )
            rec["label"] = _parse_label(path, row, label_text, _resolve(base, rec["mask"]))
        for c in CLICK_COLUMNS:
            rec[c] = math.nan
        if has_click:
            blank = [c for c, t in click_text.items() if not t]
            if blank:
                raise UserError(
                    f"{where}: incomplete click, {', '.join(blank)} empty; a click needs x_mm,y_mm,z_mm,diameter_mm"
                )
            for c, t in click_text.items():
                rec[c] = _parse_float(path, row, c, t)
            if rec["diameter_mm"] <= 0:
                raise UserError(
                    f"{where}: diameter_mm={click_text['diameter_mm']!r} must be > 0; give the lesion diameter in mm"
                )
            from liverlesion.click import MAX_DIAMETER_MM  # local: heavy (scipy)

            if rec["diameter_mm"] > MAX_DIAMETER_MM:
                raise UserError(
                    f"{where}: diameter_mm={click_text['diameter_mm']!r} is larger than any plausible liver lesion "
                    f"(at most {MAX_DIAMETER_MM:g} mm); give the lesion diameter in mm"
                )
        image_path = _resolve(base, rec["image"])
        if not image_path.exists():
            raise UserError(_not_found(where, "image", rec["image"], image_path))
        rec["image_path"] = str(image_path.resolve())
        rec["mask_path"] = None
        if has_mask:
            mask_path = _resolve(base, rec["mask"])
            if not mask_path.exists():
                raise UserError(_not_found(where, "mask", rec["mask"], mask_path))
            rec["mask_path"] = str(mask_path.resolve())
            check_manifest_seg(mask_path, rec["label"], f"{where}: mask {rec['mask']!r}")
            if rec["mask_path"] == rec["image_path"]:
                raise UserError(
                    f"{where}: mask {rec['mask']!r} is the image itself; give the lesion mask file in the mask column"
                )
        rec["row"] = row
        # "Metastasis" and "metastasis" would silently be two classes in training and evaluation.
        spelled = class_spelling.setdefault(rec["lesion_class"].casefold(), (rec["lesion_class"], row))
        if rec["lesion_class"] and spelled[0] != rec["lesion_class"]:
            raise UserError(
                f"{where}: lesion_class {rec['lesion_class']!r} differs only in upper/lower case from "
                f"{spelled[0]!r} in row {spelled[1]}, which would make them two classes; spell each class "
                "the same way in every row"
            )
        # The same image under two patient IDs would put one scan in two CV folds.
        owner = image_patient.setdefault(rec["image_path"], (rec["patient_id"], row))
        if owner[0] != rec["patient_id"]:
            raise UserError(
                f"{where}: image {rec['image']!r} belongs to patient_id={owner[0]!r} in row {owner[1]} but "
                f"to {rec['patient_id']!r} here; one image must belong to one patient"
            )
        source = (
            rec["image_path"],
            rec["series"],
            rec["mask_path"],
            *(rec[c] for c in CLICK_COLUMNS if has_click),
        )
        # An empty or 0 label takes every lesion of the mask, so it overlaps any other row on that mask.
        label = None if rec["label"] is pd.NA or rec["label"] == 0 else rec["label"]
        for other_label, other_row in seen.get(source, []):
            if label == other_label:
                raise UserError(
                    f"{where}: duplicates row {other_row} (same image, series and lesion source); "
                    "delete one so lesions are not counted twice"
                )
            if label is None or other_label is None:
                overlap = (
                    f"label {label} is already taken by row {other_row}, whose empty or 0 label takes every "
                    f"lesion of mask {rec['mask']!r}"
                    if other_label is None
                    else f"the empty or 0 label takes every lesion of mask {rec['mask']!r}, label "
                    f"{other_label} of row {other_row} included"
                )
                raise UserError(
                    f"{where}: {overlap}, so that lesion would be counted twice; give every row its own label, "
                    "or keep only the row with the empty label"
                )
        seen.setdefault(source, []).append((label, row))
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=[*COLUMNS, *DERIVED_COLUMNS])
    df["label"] = _label_column(df["label"])
    for c in CLICK_COLUMNS:
        df[c] = df[c].astype(float)
    df["row"] = df["row"].astype(int)
    return df


def _label_column(labels: pd.Series) -> pd.Series:
    """Labels as nullable Int64, or as objects when a DICOM SEG row selects segments by label text."""
    if any(isinstance(v, str) and not v.strip().lstrip("-").isdigit() for v in labels):
        return labels.astype(object).where(labels.notna(), pd.NA)
    return labels.astype("Int64")


def _relative(path_text: str, folder: Path) -> str:
    p = Path(path_text)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return Path(os.path.relpath(p, folder)).as_posix()
    except ValueError:  # another drive on Windows: keep it absolute
        return str(p)


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a manifest CSV atomically, with ``image``/``mask`` relative to its folder.

    Args:
        df: Manifest rows. ``image_path``/``mask_path`` (absolute) take precedence over
            ``image``/``mask`` when present (as returned by :func:`read_manifest`);
            relative ``image``/``mask`` strings are written as they are, so they must
            already be relative to the destination folder.
        path: Destination CSV.

    Returns:
        The path written.
    """
    path = Path(path)
    extra = [c for c in df.columns if c not in COLUMNS and c not in DERIVED_COLUMNS]
    if extra:
        raise ValueError(f"write_manifest: unknown column(s) {extra}; allowed: {', '.join(COLUMNS)}")
    folder = path.resolve().parent
    out = pd.DataFrame(index=df.index)
    for col in COLUMNS:
        if col in ("image", "mask"):
            src = df[f"{col}_path"] if f"{col}_path" in df.columns else df.get(col)
            if src is None:
                continue
            out[col] = [
                ""
                if v is None or (isinstance(v, float) and math.isnan(v)) or v == ""
                else _relative(str(v), folder)
                for v in src
            ]
        elif col in df.columns:
            out[col] = df[col]
    # Drop optional columns that are entirely empty, so mask-only manifests stay simple.
    for col in ("mask", "label", *CLICK_COLUMNS, "series"):
        if col in out.columns and (out[col].isna() | (out[col].astype(str).str.strip() == "")).all():
            out = out.drop(columns=col)
    if "label" in out.columns:
        out["label"] = _label_column(out["label"])
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False, lineterminator="\n")
    return path
