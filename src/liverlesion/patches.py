"""Lesion-centred 2-D / 2.5-D patches: resampling, HU windowing and the on-disk cache.

One lesion gives one patch, cut around its largest axial cross-section:

* The centre slice is the axial slice where the lesion's area in mm² is largest.
  The ``neighbours`` slices on each side are taken at native spacing, or every
  ``slice_step_mm`` along z with interpolation. They are clamped at the ends of
  the volume, so the edge slice is repeated.
* The in-plane field is a square centred on the lesion's centroid on the centre
  slice. Its side is the lesion's extent plus a margin, and at least
  ``min_field_mm``. It is resampled in millimetres to ``size_px`` pixels, so
  anisotropic pixels come out square. Anything outside the volume is air
  (-1024 HU).
* Orientation is the canonical LPS array's: row 0 anterior, column 0 patient
  right, as in a radiology viewer. Nothing is flipped.

``build_patches`` writes the cache ``<out>/<key>/`` described in
docs/ARCHITECTURE.md ("Patch cache"). Training, evaluation, baselines and
predict all read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, __version__
from liverlesion.config import PatchConfig
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_dir, atomic_path, write_csv, write_json
from liverlesion.io import check_tolerance
from liverlesion.lesions import LesionMask, foreground_box
from liverlesion.manifest import read_manifest
from liverlesion.manifest_lesions import iter_manifest_lesions
from liverlesion.progress import progress_disabled
from liverlesion.volume import Volume

__all__ = [
    "AIR_FILL_HU",
    "LesionPatch",
    "build_patches",
    "check_patch_config",
    "draw_contact_sheet",
    "extract_patch",
    "load_patch",
    "load_patch_config",
    "load_patch_index",
    "load_patch_settings",
    "patch_files",
    "patch_cache_key",
    "resolve_patch_dir",
    "window",
]

AIR_FILL_HU = -1024.0  # fill value outside the scanned volume (air)
# Bump when the npz/index layout or the lesion masks change, so old caches are not reused
# (2: click lesions grown from the click, `measurement` column).
CACHE_FORMAT_VERSION = 2
CONTACT_SHEET_MAX = 200  # lesions drawn on the contact sheet
_MODES = ("2.5d", "2d")
_ORDERS = {"nearest": 0, "linear": 1, "bspline": 3}
# Columns read as text so that ids such as "007" keep their leading zeros.
_TEXT_COLUMNS = ("lesion_id", "patient_id", "lesion_class", "image", "mask", "source", "file")


@dataclass
class LesionPatch:
    """One lesion's patch, in the layout of the patch cache.

    Attributes:
        image: float32 ``(S, C, H, W)`` windowed to ``[0, 1]`` (2.5d: S=1, C=2k+1; 2d: S=2k+1, C=1).
        mask: uint8 ``(S, H, W)`` lesion mask on the centre slice of each sample.
        hu: float32 ``(S, H, W)`` HU on the centre slice of each sample.
        meta: Geometry of the cut: ``centre_slice``, ``slice_indices``, ``slice_positions_mm``,
            ``field_mm``, ``pixel_mm``, ``centre_lps_mm``, ``centre_index_zyx``, ``max_area_mm2``, ...
    """

    image: np.ndarray
    mask: np.ndarray
    hu: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored in the npz (``meta`` as a JSON string)."""
        return {
            "image": self.image,
            "mask": self.mask,
            "hu": self.hu,
            "meta": np.array(json.dumps(self.meta)),
        }


def check_patch_config(cfg: PatchConfig) -> None:
    """Raise :class:`UserError` naming the setting when a PatchConfig value is unusable."""
    if cfg.mode not in _MODES:
        raise UserError(f"config patch.mode={cfg.mode!r}: unknown mode; use one of {', '.join(_MODES)}")
    if cfg.interpolation not in _ORDERS:
        raise UserError(
            f"config patch.interpolation={cfg.interpolation!r}: unknown interpolation; "
            f"use one of {', '.join(_ORDERS)}"
        )
    checks = [
        ("neighbours", cfg.neighbours >= 0, "must be 0 or more"),
        ("slice_step_mm", cfg.slice_step_mm >= 0, "must be 0 (native spacing) or a positive step in mm"),
        ("size_px", cfg.size_px >= 8, "must be at least 8 pixels"),
        ("margin_mm", cfg.margin_mm >= 0, "must be 0 or more"),
        ("min_field_mm", cfg.min_field_mm > 0, "must be a positive field of view in mm"),
        ("window_width", cfg.window_width > 0, "must be a positive width in HU"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise UserError(f"config patch.{name}={getattr(cfg, name)!r}: {what}")
    for name in ("slice_step_mm", "margin_mm", "min_field_mm", "window_center", "window_width"):
        if not math.isfinite(float(getattr(cfg, name))):
            raise UserError(f"config patch.{name}={getattr(cfg, name)!r}: must be a finite number")


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU through a display window to ``[0, 1]``.

    ``center - width/2`` maps to 0 and ``center + width/2`` to 1; values outside are clipped.

    Args:
        hu: Values in HU.
        center: Window centre (level) in HU.
        width: Window width in HU (> 0).
    """
    if not width > 0:
        raise UserError(f"window width={width!r}: must be a positive width in HU, e.g. 250")
    lo = float(center) - float(width) / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _sample(
    array: np.ndarray,
    zs: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    order: int,
    cval: float,
    offset: tuple[int, int, int] = (0, 0, 0),
    shape: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Sample ``array`` on the grid ``zs x rows x cols`` (fractional indices) -> ``(len(zs), H, W)``.

    Only the small block around the grid is copied (a B-spline prefilter over a whole
    CT would cost hundreds of MB). Along z the block repeats the edge slice; in-plane,
    points outside the volume take ``cval``.

    ``array`` may be a crop at ``offset`` (z, y, x) of a volume of ``shape`` that holds
    ``cval`` everywhere outside the crop (a lesion mask cut to its bounding box): the
    result is the same as sampling the full volume, without building it.
    """
    from scipy.ndimage import map_coordinates

    nz, ny, nx = shape if shape is not None else array.shape
    oz, oy, ox = offset
    cz, cy, cx = array.shape
    pad = order + 2  # spline support plus one voxel of slack
    z0, z1 = math.floor(zs.min()) - pad, math.ceil(zs.max()) + pad + 1
    y0, y1 = math.floor(rows.min()) - pad, math.ceil(rows.max()) + pad + 1
    x0, x1 = math.floor(cols.min()) - pad, math.ceil(cols.max()) + pad + 1
    zi = np.clip(np.arange(z0, z1), 0, nz - 1) - oz  # volume slice of each block slice, in crop indices
    inside = (zi >= 0) & (zi < cz)
    block = np.full((len(zi), y1 - y0, x1 - x0), cval, dtype=np.float32)
    ys, ye = max(y0, oy, 0), min(y1, oy + cy, ny)
    xs, xe = max(x0, ox, 0), min(x1, ox + cx, nx)
    if ye > ys and xe > xs and inside.any():
        block[inside, ys - y0 : ye - y0, xs - x0 : xe - x0] = array[
            zi[inside], ys - oy : ye - oy, xs - ox : xe - ox
        ]
    zz, rr, cc = np.meshgrid(zs - z0, rows - y0, cols - x0, indexing="ij")
    out = map_coordinates(block, [zz, rr, cc], order=order, mode="nearest", prefilter=order > 1)
    return out.astype(np.float32, copy=False)


def extract_patch(volume: Volume, lesion_mask: Any, cfg: PatchConfig) -> LesionPatch:
    """Cut one lesion's patch from a CT volume.

    Args:
        volume: CT in HU, canonical LPS (see volume.py).
        lesion_mask: This one lesion: a ``lesions.LesionMask`` crop, or a boolean ``[z, y, x]`` array
            the shape of ``volume``.
        cfg: Patch settings.

    Returns:
        The patch arrays and the geometry used (``meta``).
    """
    check_patch_config(cfg)
    if isinstance(lesion_mask, LesionMask):  # a crop already: no full-size array is made
        mask, base = lesion_mask.crop, lesion_mask.offset
        shape = tuple(lesion_mask.shape)
    else:
        mask, base = np.asarray(lesion_mask), (0, 0, 0)
        shape = tuple(mask.shape)
    if shape != tuple(volume.shape):
        raise UserError(
            f"lesion mask shape {shape} differs from the image shape {volume.shape}; "
            "resample the mask onto the image grid"
        )
    mask = mask.astype(bool, copy=False)
    box = foreground_box(mask)
    if box is None:
        raise UserError("lesion mask is empty (no non-zero voxels); check the mask file and the label value")
    # Work on the lesion's bounding box: the full-size mask is mostly empty.
    crop = mask[box]
    offset = tuple(int(s.start) + b for s, b in zip(box, base, strict=True))
    zz, yy, xx = np.nonzero(crop)
    zz, yy, xx = zz + offset[0], yy + offset[1], xx + offset[2]
    nz = volume.shape[0]
    sz, sy, sx = volume.spacing

    # Largest cross-section in mm²; ties go to the slice nearest the lesion's z-centroid.
    areas = np.bincount(zz, minlength=nz) * (sy * sx)
    candidates = np.flatnonzero(areas == areas.max())
    zc = int(candidates[np.argmin(np.abs(candidates - zz.mean()))])
    on = zz == zc
    cy, cx = float(yy[on].mean()), float(xx[on].mean())

    # Half extent (mm) of the whole lesion around the in-plane centre, to voxel edges,
    # so an irregular lesion still fits inside the field with its margin.
    half_extent = max((np.abs(yy - cy).max() + 0.5) * sy, (np.abs(xx - cx).max() + 0.5) * sx)
    if cfg.scale_with_lesion:
        field_mm = max(2.0 * half_extent + 2.0 * cfg.margin_mm, float(cfg.min_field_mm))
    else:
        field_mm = float(cfg.min_field_mm)
    size = int(cfg.size_px)
    pixel_mm = field_mm / size
    offsets = (np.arange(size) - (size - 1) / 2.0) * pixel_mm  # pixel centres, mm from the patch centre
    rows = cy + offsets / sy
    cols = cx + offsets / sx

    k = int(cfg.neighbours)
    steps = np.arange(-k, k + 1, dtype=float)
    z_wanted = zc + (steps if cfg.slice_step_mm == 0 else steps * (cfg.slice_step_mm / sz))
    zs = np.clip(z_wanted, 0, nz - 1)

    order = _ORDERS[cfg.interpolation]
    hu = _sample(volume.array, zs, rows, cols, order=order, cval=AIR_FILL_HU)
    # Linear then > 0.5 keeps the mask's area in mm when pixel sizes differ.
    mask_order = 0 if order == 0 else 1
    lesion = (
        _sample(
            crop.astype(np.float32),
            zs,
            rows,
            cols,
            order=mask_order,
            cval=0.0,
            offset=offset,
            shape=volume.shape,
        )
        > 0.5
    )
    img = window(hu, cfg.window_center, cfg.window_width)

    if cfg.mode == "2.5d":
        image = img[None]  # (1, 2k+1, H, W): channels run inferior -> superior
        mask_out = lesion[k][None]
        hu_out = hu[k][None]
    else:
        image = img[:, None]  # (2k+1, 1, H, W)
        mask_out = lesion
        hu_out = hu

    meta = {
        "mode": cfg.mode,
        "centre_slice": zc,
        "slice_indices": [round(float(z), 4) for z in zs],
        "slice_positions_mm": [round(float(volume.index_to_physical([z, cy, cx])[2]), 3) for z in zs],
        "clamped": bool(np.any(zs != z_wanted)),
        "field_mm": float(field_mm),
        "pixel_mm": float(pixel_mm),
        "size_px": size,
        "centre_index_zyx": [zc, cy, cx],
        "centre_lps_mm": [float(v) for v in volume.index_to_physical([zc, cy, cx])],
        "max_area_mm2": float(areas[zc]),
    }
    return LesionPatch(
        image=np.ascontiguousarray(image, dtype=np.float32),
        mask=np.ascontiguousarray(mask_out, dtype=np.uint8),
        hu=np.ascontiguousarray(hu_out, dtype=np.float32),
        meta=meta,
    )


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
    """The lesion reader."""
    # our own bar (per image) replaces the reader's, so the user sees one
    yield from iter_manifest_lesions(manifest, tolerance, series, progress=False)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("index.csv", "settings.json"))


def _file_name(lesion_id: str, used: set[str]) -> str:
    """A safe, unique npz name for a lesion id (ids come from user-chosen patient ids)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(lesion_id)).strip("._") or "lesion"
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
    from tqdm import tqdm

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
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    with atomic_dir(dest, overwrite=True) as tmp:
        bar = tqdm(
            _iter_lesions(table, tolerance, series),
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
                np.savez_compressed(tmp / name, **patch.arrays())
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
                "series": series,
                "n_lesions": len(rows),
                "note": DISCLAIMER,
            },
        )
        draw_contact_sheet(tmp, index, tmp / "contact_sheet.png")
    print(f"wrote {len(rows)} lesion patches to {dest}", file=sys.stderr)
    return dest


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
    text = {c: str for c in _TEXT_COLUMNS}
    index = pd.read_csv(folder / "index.csv", dtype=text, keep_default_na=False, na_values=[""])
    missing = [c for c in ("lesion_id", "file") if c not in index.columns]
    if missing:
        raise UserError(
            f"{folder / 'index.csv'}: missing column(s) {', '.join(missing)}; rebuild the patch cache"
        )
    return index


def load_patch_config(patch_dir: str | Path) -> PatchConfig:
    """The PatchConfig a cache was built with (``settings.json``)."""
    data = json.loads((resolve_patch_dir(patch_dir) / "settings.json").read_text())
    known = {f.name for f in dataclasses.fields(PatchConfig)}
    return PatchConfig(**{k: v for k, v in data.items() if k in known})


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
