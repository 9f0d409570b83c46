"""The on-disk patch cache: ``build_patches`` writes it, and this module is its only reader and writer.

``build_patches`` cuts every lesion of a manifest with :func:`liverlesion.patches.extract_patch`
and writes the cache ``<out>/<key>/`` described in docs/ARCHITECTURE.md ("Patch cache"): one npz
per lesion, ``index.csv``, ``settings.json``, ``provenance.json`` and ``contact_sheet.png``.
Training, evaluation, baselines and predict all read it through the readers here
(``resolve_patch_dir``, ``load_patch_index``, ``load_patch_settings``, ``load_patch_config``,
``load_patch``, ``patch_files``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, __version__
from liverlesion.config import PatchConfig, config_from_dict
from liverlesion.csv_check import check_csv_complete
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_dir, atomic_path, safe_name, write_csv, write_json
from liverlesion.io import check_tolerance
from liverlesion.manifest import read_manifest
from liverlesion.manifest_lesions import iter_manifest_lesions
from liverlesion.patches import check_patch_config, extract_patch
from liverlesion.progress import progress_disabled
from liverlesion.volume import Volume, withheld_uid

__all__ = [
    "build_patches",
    "draw_contact_sheet",
    "load_patch",
    "load_patch_config",
    "load_patch_index",
    "load_patch_settings",
    "patch_files",
    "patch_cache_key",
    "resolve_patch_dir",
]

# Bump when the npz/index layout or the lesion masks change, so old caches are not reused
# (2: click lesions grown from the click, `measurement` column).
CACHE_FORMAT_VERSION = 2
CONTACT_SHEET_MAX = 200  # lesions drawn on the contact sheet
# Columns read as text so that ids such as "007" keep their leading zeros.
_TEXT_COLUMNS = ("lesion_id", "patient_id", "lesion_class", "image", "mask", "source", "file")


# --------------------------------------------------------------------------- cache


def _config_dict(cfg: PatchConfig) -> dict[str, Any]:
    """PatchConfig as plain values, floats normalised so 10 and 10.0 hash alike."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = float(v) if f.type in ("float", float) else v
    return out


def _manifest_files(table: pd.DataFrame) -> tuple[list[Path], int]:
    """Image/mask paths named by the manifest (resolved) and the number of distinct images.

    Args:
        table: The manifest as :func:`liverlesion.manifest.read_manifest` returns it.
    """
    paths = {Path(v) for col in ("image_path", "mask_path") for v in table[col] if v}
    return sorted(paths), int(table["image_path"].nunique())


def _fingerprint(path: Path) -> str:
    """Size and mtime of a file, or of every file in a folder (DICOM series)."""
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if path.is_dir():
        parts = [str(path.resolve())]
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                parts.append(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}")
        return "\n".join(parts)
    return f"{path}|missing"


def patch_cache_key(
    manifest: str | Path,
    cfg: PatchConfig,
    tolerance: float = 1e-3,
    series: str | None = None,
    table: pd.DataFrame | None = None,
) -> str:
    """Short hash of the patch settings, the manifest and its files' sizes and mtimes.

    Args:
        manifest: Manifest CSV.
        cfg: Patch settings.
        tolerance: Geometry tolerance passed to the lesion reader.
        series: SeriesInstanceUID passed to the lesion reader.
        table: The manifest already read by :func:`liverlesion.manifest.read_manifest` (read here if None).
    """
    manifest = Path(manifest)
    h = hashlib.sha256()
    settings = {
        "format": CACHE_FORMAT_VERSION,
        "liverlesion": __version__,
        "patch": _config_dict(cfg),
        "tolerance": float(tolerance),
        "series": series,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(manifest.read_bytes())
    files, _ = _manifest_files(read_manifest(manifest) if table is None else table)
    for p in files:
        h.update(b"\0" + _fingerprint(p).encode())
    return h.hexdigest()[:12]


def _iter_lesions(
    manifest: pd.DataFrame, tolerance: float, series: str | None
) -> Iterator[tuple[Volume, list]]:
    """The lesion reader; every image's and mask's header is checked when it is called, before any
    voxel is read (see :func:`liverlesion.manifest_lesions.iter_manifest_lesions`)."""
    # our own bar (per image) replaces the reader's, so the user sees one (and the header check's)
    return iter_manifest_lesions(manifest, tolerance, series, progress=False, check_progress=True)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("index.csv", "settings.json"))


def _file_name(lesion_id: str, used: set[str]) -> str:
    """A safe, unique npz name for a lesion id (ids come from user-chosen patient ids)."""
    stem = safe_name(lesion_id)
    name, n = f"{stem}.npz", 1
    while name.lower() in used:
        n += 1
        name = f"{stem}_{n}.npz"
    used.add(name.lower())
    return name


def build_patches(
    manifest: str | Path,
    out: str | Path,
    cfg: PatchConfig,
    tolerance: float = 1e-3,
    series: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Cut every lesion of a manifest into the patch cache ``out/<key>/`` (reused when up to date).

    Writes one npz per lesion, ``index.csv`` (lesion table + ``file``), ``settings.json``
    (the PatchConfig), ``provenance.json`` and ``contact_sheet.png``, all at once:
    on error nothing is left behind.

    Args:
        manifest: Manifest CSV.
        out: Parent folder of the cache.
        cfg: Patch settings.
        tolerance: Geometry tolerance (mm) between image and mask.
        series: SeriesInstanceUID when an image folder holds several series.
        overwrite: Recompute even when an up-to-date cache exists.

    Returns:
        The cache folder ``out/<key>``.
    """

    check_patch_config(cfg)
    check_tolerance(tolerance)
    manifest = Path(manifest)
    if not manifest.is_file():
        raise UserError(f"manifest {manifest}: file not found; give the path of a manifest CSV")
    table = read_manifest(manifest)  # the only parse: the cache key and the lesion reader use it
    key = patch_cache_key(manifest, cfg, tolerance, series, table=table)
    dest = Path(out) / key
    if not overwrite and _is_complete(dest):
        print(f"using cached patches at {dest}", file=sys.stderr)
        return dest

    _, n_images = _manifest_files(table)
    existed = Path(out).exists()
    try:
        rows = _cut_patches(manifest, table, dest, key, cfg, tolerance, series, n_images)
    except BaseException:
        if not existed and Path(out).is_dir() and not any(Path(out).iterdir()):
            Path(out).rmdir()  # a refused run leaves no new output folder (atomic_dir made it for dest)
        raise
    print(f"wrote {len(rows)} lesion patches to {dest}", file=sys.stderr)
    return dest


def _cut_patches(
    manifest: Path,
    table: pd.DataFrame,
    dest: Path,
    key: str,
    cfg: PatchConfig,
    tolerance: float,
    series: str | None,
    n_images: int,
) -> list[dict[str, Any]]:
    """Cut every lesion into the new cache folder ``dest``, written all at once (see :func:`build_patches`)."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    lesions = _iter_lesions(table, tolerance, series)  # checks every header: before any folder is made
    with atomic_dir(dest, overwrite=True) as tmp:
        bar = tqdm(
            lesions,
            total=n_images or None,
            desc="patches",
            unit="image",
            file=sys.stderr,
            disable=progress_disabled(),
        )
        for volume, lesions in bar:
            for lesion, lesion_mask in lesions:
                row = dict(lesion.to_row())
                try:
                    patch = extract_patch(volume, lesion_mask, cfg)
                except UserError as e:
                    raise UserError(f"lesion {row.get('lesion_id')} ({row.get('image')}): {e}") from e
                name = _file_name(row["lesion_id"], used)
                # uncompressed: zlib shrinks float CT patches by only about a quarter, and took a
                # third of this loop's time
                np.savez(tmp / name, **patch.arrays())
                row["file"] = name
                row["patch_centre_slice"] = patch.meta["centre_slice"]
                row["patch_field_mm"] = round(patch.meta["field_mm"], 4)
                row["patch_pixel_mm"] = round(patch.meta["pixel_mm"], 6)
                # native spacing, for the checkpoint's training range (liverlesion.domain)
                for axis, v in zip("zyx", volume.spacing, strict=True):
                    row[f"spacing_{axis}_mm"] = round(float(v), 6)
                rows.append(row)
        bar.close()
        if not rows:
            raise UserError(f"manifest {manifest}: no lesions found; check the mask files and label values")
        index = pd.DataFrame(rows)
        write_csv(tmp / "index.csv", index)
        write_json(tmp / "settings.json", asdict(cfg))
        write_json(
            tmp / "provenance.json",
            {
                "key": key,
                "format_version": CACHE_FORMAT_VERSION,
                "liverlesion_version": __version__,
                "manifest": str(manifest.resolve()),
                "tolerance": tolerance,
                "series": withheld_uid(series),  # the cache key holds it (hashed)
                "n_lesions": len(rows),
                "note": DISCLAIMER,
            },
        )
        draw_contact_sheet(tmp, index, tmp / "contact_sheet.png")
    return rows


# --------------------------------------------------------------------------- readers


def resolve_patch_dir(patch_dir: str | Path) -> Path:
    """The cache folder holding ``index.csv``: ``patch_dir`` itself or its single ``<key>`` child."""
    patch_dir = Path(patch_dir)
    if (patch_dir / "index.csv").is_file():
        return patch_dir
    children = sorted(p for p in patch_dir.glob("*/index.csv")) if patch_dir.is_dir() else []
    if len(children) == 1:
        return children[0].parent
    if len(children) > 1:
        names = ", ".join(p.parent.name for p in children)
        raise UserError(f"patch folder {patch_dir}: holds several patch caches ({names}); pass one of them")
    raise UserError(
        f"patch folder {patch_dir}: no index.csv found; run `liverlesion patches MANIFEST -o OUT` first "
        "and pass the folder it prints"
    )


def load_patch_index(patch_dir: str | Path) -> pd.DataFrame:
    """Read a cache's ``index.csv`` (ids kept as text).

    Args:
        patch_dir: The cache folder (``out/<key>``), or ``out`` when it holds one cache.

    Raises:
        UserError: No (single) cache in ``patch_dir``, or an index without ``lesion_id`` / ``file``.
    """
    folder = resolve_patch_dir(patch_dir)
    check_csv_complete(
        folder / "index.csv", f"delete the patch cache folder {folder} and run again to rebuild it"
    )
    text = {c: str for c in _TEXT_COLUMNS}
    index = pd.read_csv(folder / "index.csv", dtype=text, keep_default_na=False, na_values=[""])
    missing = [c for c in ("lesion_id", "file") if c not in index.columns]
    if missing:
        raise UserError(
            f"{folder / 'index.csv'}: missing column(s) {', '.join(missing)}; rebuild the patch cache"
        )
    return index


def load_patch_config(patch_dir: str | Path) -> PatchConfig:
    """The PatchConfig a cache was built with (``settings.json``; a setting it predates keeps its old value)."""
    data = json.loads((resolve_patch_dir(patch_dir) / "settings.json").read_text())
    known = {f.name for f in dataclasses.fields(PatchConfig)}
    return config_from_dict({"patch": {k: v for k, v in data.items() if k in known}}).patch


def load_patch_settings(patch_dir: str | Path) -> dict[str, Any]:
    """A cache's ``settings.json`` as written (``{}`` for a cache without one)."""
    path = resolve_patch_dir(patch_dir) / "settings.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_patch(
    patch_dir: str | Path,
    row: Mapping[str, Any] | str | Path,
    arrays: tuple[str, ...] = ("image", "mask", "hu"),
) -> dict[str, Any]:
    """Load one lesion's arrays.

    Args:
        patch_dir: The cache folder.
        row: A row of :func:`load_patch_index`, its ``file`` value, or a path from :func:`patch_files`.
        arrays: Which arrays to read (each one read costs its decompression).

    Returns:
        ``image`` (S, C, H, W) float32, ``mask`` (S, H, W) uint8, ``hu`` (S, H, W) float32 (those asked
        for), ``meta`` dict.
    """
    if isinstance(row, Path):
        path = row
    else:
        path = resolve_patch_dir(patch_dir) / (row if isinstance(row, str) else str(row["file"]))
    if not path.is_file():
        raise UserError(f"patch file {path}: not found; the cache is incomplete, rebuild it with --overwrite")
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, Any] = {k: z[k] for k in arrays}
        out["meta"] = json.loads(str(z["meta"])) if "meta" in z.files else {}
    return out


def patch_files(patch_dir: str | Path) -> dict[str, Path]:
    """lesion_id -> its npz file, for every lesion of a cache's index."""
    folder = resolve_patch_dir(patch_dir)
    return {str(r["lesion_id"]): folder / str(r["file"]) for _, r in load_patch_index(folder).iterrows()}


# --------------------------------------------------------------------------- contact sheet


def draw_contact_sheet(
    patch_dir: str | Path, index: pd.DataFrame, path: str | Path, max_lesions: int = CONTACT_SHEET_MAX
) -> Path:
    """Draw the centre slice of every lesion (outline of its mask), grouped by class, to a PNG.

    Drawn from the npz files, so it can be redrawn from a finished cache.

    Args:
        patch_dir: Folder holding the npz files.
        index: The cache's index (lesion table + ``file``).
        path: Output PNG.
        max_lesions: At most this many lesions, taken in manifest order.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas by default

    patch_dir = Path(patch_dir)
    shown = index.iloc[:max_lesions]
    if shown.empty:
        raise UserError(f"patch folder {patch_dir}: no lesions to draw")
    classes = sorted(shown["lesion_class"].astype(str).unique())
    colours = {c: f"C{i % 10}" for i, c in enumerate(classes)}
    ncols = max(1, min(10, len(shown)))
    # Each class starts on a new row of the grid; lesions sorted by id within a class.
    cells = []  # (grid row, grid column, class, index row)
    grid_row = 0
    for c in classes:
        sub = shown[shown["lesion_class"].astype(str) == c].sort_values("lesion_id", kind="stable")
        for i, (_, r) in enumerate(sub.iterrows()):
            cells.append((grid_row + i // ncols, i % ncols, c, r))
        grid_row += math.ceil(len(sub) / ncols)
    nrows = grid_row

    # One mosaic image on one axes: 200 separate axes take about a minute to draw.
    first = load_patch(patch_dir, str(cells[0][3]["file"]))["image"]
    h, w = first.shape[-2:]
    gap, top = max(2, w // 16), max(4, int(round(h * 0.3)))  # white space between cells, title band
    cell_h, cell_w = h + top, w + gap
    mosaic = np.full((nrows * cell_h, ncols * cell_w), np.nan, dtype=np.float32)
    outlines = []
    labels = []
    for gr, gc, c, r in cells:
        arrays = load_patch(patch_dir, str(r["file"]))
        img, msk = arrays["image"], arrays["mask"]
        s = img.shape[0] // 2
        y0, x0 = gr * cell_h + top, gc * cell_w + gap // 2
        mosaic[y0 : y0 + h, x0 : x0 + w] = img[s, img.shape[1] // 2]
        if msk[s].any():
            outlines.append((x0, y0, msk[s], colours[c]))
        diam = pd.to_numeric(pd.Series([r.get("max_axial_diameter_mm")]), errors="coerce").iloc[0]
        size = f"{diam:.0f} mm" if np.isfinite(diam) else "? mm"
        labels.append((x0 + w / 2, y0 - 1, f"{r['lesion_id']}\n{c}, {size}", colours[c]))

    counts = ", ".join(f"{c}: {int((shown['lesion_class'].astype(str) == c).sum())}" for c in classes)
    note = f"showing the first {len(shown)} of {len(index)} lesions; " if len(shown) < len(index) else ""
    width_in = max(1.6 * ncols, 6.4)
    header = textwrap.wrap(
        f"liverlesion patches ({counts}); {note}centre slice, row 0 anterior, column 0 patient right; "
        f"{DISCLAIMER}",
        width=int(width_in * 13),
    )
    header_in = 0.15 + 0.17 * len(header)
    body_in = width_in * mosaic.shape[0] / mosaic.shape[1]
    height_in = body_in + header_in
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    fig.suptitle("\n".join(header), fontsize=8, y=1 - 0.05 / height_in, va="top")
    ax = fig.add_axes((0, 0, 1, body_in / height_in))
    cmap = colormaps["gray"].with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    for x0, y0, m, colour in outlines:
        ax.contour(x0 + np.arange(w), y0 + np.arange(h), m, levels=[0.5], colors=[colour], linewidths=0.8)
    for x, y, text, colour in labels:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=6, color=colour)
    ax.set_xlim(-0.5, mosaic.shape[1] - 0.5)
    ax.set_ylim(mosaic.shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
