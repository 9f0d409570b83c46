"""``liverlesion inspect``: print a manifest's lesion table with a summary, optionally write it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

from liverlesion import DISCLAIMER
from liverlesion.errors import UserError
from liverlesion.fileio import write_csv
from liverlesion.manifest import read_manifest
from liverlesion.manifest_lesions import lesion_table


def summarize_lesions(table: pd.DataFrame) -> dict:
    """Summary numbers of a lesion table (patients, classes, sizes)."""
    d = table["max_axial_diameter_mm"].astype(float)
    per_patient = table.groupby("patient_id").size()
    return {
        "n_lesions": int(len(table)),
        "n_patients": int(table["patient_id"].nunique()),
        "lesions_per_class": {
            str(k): int(v) for k, v in table["lesion_class"].value_counts().sort_index().items()
        },
        "patients_per_class": {
            str(k): int(v)
            for k, v in table.groupby("lesion_class")["patient_id"].nunique().sort_index().items()
        },
        "lesions_per_patient": {
            "min": int(per_patient.min()),
            "median": float(per_patient.median()),
            "max": int(per_patient.max()),
        },
        "diameter_mm": {
            "median": float(d.median()),
            "q1": float(d.quantile(0.25)),
            "q3": float(d.quantile(0.75)),
            "lt10": int((d < 10).sum()),
            "10to20": int(((d >= 10) & (d <= 20)).sum()),
            "gt20": int((d > 20).sum()),
        },
        "volume_ml": {"min": float(table["volume_ml"].min()), "max": float(table["volume_ml"].max())},
    }


_SHOWN = (
    ("lesion_id", "lesion", "{}"),
    ("patient_id", "patient", "{}"),
    ("lesion_class", "class", "{}"),
    ("source", "source", "{}"),
    ("n_voxels", "voxels", "{}"),
    ("volume_ml", "mL", "{:.2f}"),
    ("max_axial_diameter_mm", "diam mm", "{:.1f}"),
    ("min_axis_mm", "min axis mm", "{:.1f}"),
    ("hu_mean", "HU mean", "{:.0f}"),
    ("hu_std", "HU sd", "{:.0f}"),
)


def _display_rows(table: pd.DataFrame, max_rows: int) -> list[list[str] | None]:
    """Formatted rows; None marks the gap when only the first/last rows are shown."""
    cols = [c for c, _, _ in _SHOWN]
    fmt = [
        [f.format(v) for (_, _, f), v in zip(_SHOWN, r, strict=True)]
        for r in table[cols].itertuples(index=False)
    ]
    if len(fmt) <= max_rows:
        return list(fmt)
    head = max_rows // 2
    return [*fmt[:head], None, *fmt[len(fmt) - (max_rows - head) :]]


def _summary_lines(s: dict) -> list[str]:
    dm = s["diameter_mm"]
    lpp = s["lesions_per_patient"]
    classes = ", ".join(
        f"{k} {v} (in {s['patients_per_class'][k]} patient{'s' if s['patients_per_class'][k] != 1 else ''})"
        for k, v in s["lesions_per_class"].items()
    )
    return [
        f"patients: {s['n_patients']}   lesions: {s['n_lesions']}",
        f"lesions per class: {classes}",
        f"lesions per patient: min {lpp['min']}, median {lpp['median']:g}, max {lpp['max']}",
        f"max axial diameter: median {dm['median']:.1f} mm (IQR {dm['q1']:.1f}-{dm['q3']:.1f}); "
        f"<10 mm: {dm['lt10']}, 10-20 mm: {dm['10to20']}, >20 mm: {dm['gt20']}",
        f"volume: {s['volume_ml']['min']:.3g}-{s['volume_ml']['max']:.3g} mL",
    ]


def print_lesion_table(table: pd.DataFrame, max_rows: int = 20, file=None) -> None:
    """Print a compact lesion table (first/last rows when long) and its summary."""
    file = file or sys.stdout
    rows = _display_rows(table, max_rows)
    hidden = len(table) - sum(r is not None for r in rows)
    lines = _summary_lines(summarize_lesions(table)) if len(table) else ["no lesions"]
    if "measurement" in table and (
        n_est := int(table["measurement"].astype(str).str.startswith("estimated").sum())
    ):
        lines.append(
            f"{n_est} lesion(s) from clicks: sizes and HU estimated from the click, not measured on a mask"
        )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: plain text
        widths = [max([len(h)] + [len(r[i]) for r in rows if r]) for i, (_, h, _) in enumerate(_SHOWN)]
        print("  ".join(h.rjust(w) for (_, h, _), w in zip(_SHOWN, widths, strict=True)), file=file)
        for r in rows:
            text = (
                f"... {hidden} more lesions ..."
                if r is None
                else "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True))
            )
            print(text, file=file)
        print("\n".join(lines), file=file)
        print(f"({DISCLAIMER})", file=file)
        return
    console = Console(file=file, width=max(120, Console(file=file).width), highlight=False)
    t = Table(title=f"Lesions ({len(table)})", title_justify="left", show_edge=False, pad_edge=False)
    for i, (_, header, _) in enumerate(_SHOWN):
        t.add_column(header, justify="left" if i < 4 else "right", no_wrap=True)
    for r in rows:
        if r is None:
            t.add_row(f"... {hidden} more", *[""] * (len(_SHOWN) - 1))
        else:
            t.add_row(*r)
    console.print(t)
    for line in lines:
        console.print(line, markup=False)
    console.print(f"({DISCLAIMER})", markup=False)


def inspect_manifest(
    manifest: str | os.PathLike,
    out: str | os.PathLike | None = None,
    tolerance: float = 1e-3,
    series: str | None = None,
) -> pd.DataFrame:
    """Compute the lesion table of a manifest, print it with a summary, optionally write it.

    Args:
        manifest: Manifest CSV.
        out: Write the lesion table here as CSV (atomically).
        tolerance: Geometry tolerance in mm between image and mask.
        series: SeriesInstanceUID for rows whose ``series`` is empty.

    Returns:
        The lesion table.
    """
    rows = read_manifest(manifest)
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise UserError(f"--out {out}: is a folder; give a CSV file path, e.g. {out / 'lesions.csv'}")
        # writing the table over an input would destroy it: the manifest, or a row's image or mask
        inputs = {str(Path(manifest).resolve()): "the manifest itself"}
        for rec in rows.itertuples():
            for col in ("mask_path", "image_path"):
                if isinstance(getattr(rec, col), str):
                    inputs.setdefault(getattr(rec, col), f"the {col[:-5]} of manifest row {rec.row}")
        if str(out.resolve()) in inputs:
            raise UserError(
                f"--out {out}: is {inputs[str(out.resolve())]}; give another file name, e.g. lesions.csv"
            )
    table = lesion_table(rows, tolerance=tolerance, series=series)
    if out is not None:
        write_csv(out, table)
    print_lesion_table(table)
    if out is not None:
        print(f"wrote {out}")
    return table
