"""Domain-shift check: the intensity and geometry a checkpoint was trained on, and new data against it.

At training, :func:`training_range` summarises the *training fold's* lesions (never the test
fold's) into per-statistic ranges, stored in the checkpoint as ``training_domain``. At
prediction, :func:`check_domain` compares the new lesions with that range and says, one line per
statistic, where they fall outside: a model trained on synthetic CT and applied to real CT
should say so.

Statistics per lesion (one definition, used at training and at prediction alike):

* ``lesion_hu_mean``, ``lesion_hu_std``: mean and SD of HU inside the lesion mask (the lesion
  table's ``hu_mean`` / ``hu_std``; the SD is a noise and texture proxy);
* ``parenchyma_hu``, ``parenchyma_noise_hu``: median and robust SD (1.4826 x MAD) of the soft
  tissue in a ring 2-8 mm around the lesion on the patch's centre slice (the surrounding liver);
* ``slice_mm``, ``pixel_mm``: the image's slice spacing and in-plane pixel spacing.

Research use, not for diagnosis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion.errors import UserError

DOMAIN_FORMAT_VERSION = 1
STATS: dict[str, str] = {
    "lesion_hu_mean": "lesion mean HU",
    "lesion_hu_std": "lesion HU SD (noise/texture)",
    "parenchyma_hu": "surrounding-tissue HU (ring 2-8 mm around the lesion)",
    "parenchyma_noise_hu": "surrounding-tissue noise (robust SD, HU)",
    "slice_mm": "slice spacing (mm)",
    "pixel_mm": "in-plane pixel spacing (mm)",
}
QUANTILES = (1.0, 99.0)  # the training range: 1st to 99th percentile of the training lesions ...
MARGIN = 0.10  # ... widened by this fraction of its width on each side
MIN_OUTSIDE_FRACTION = 0.2  # a statistic is flagged when more of the new lesions than this fall outside
RING_MM = (2.0, 8.0)  # the surrounding-tissue ring, mm from the lesion edge
SOFT_TISSUE_HU = (-100.0, 300.0)  # ring pixels outside this (fat, air, bone) are left out
MIN_RING_PX = 20
NO_RANGE = "no training range stored"


def ring_stats(hu: np.ndarray, mask: np.ndarray, pixel_mm: float) -> tuple[float, float]:
    """Median and robust SD of soft tissue in a ring around the lesion on the patch's centre sample.

    Args:
        hu: ``(S, H, W)`` or ``(H, W)`` HU of the patch (centre slice of each sample).
        mask: The lesion mask, same shape.
        pixel_mm: Patch pixel size in mm.

    Returns:
        ``(median HU, 1.4826 * MAD)``; NaNs when the ring holds fewer than 20 soft-tissue pixels.
    """
    from scipy import ndimage

    hu, mask = np.asarray(hu, dtype=np.float32), np.asarray(mask) > 0
    if hu.ndim == 3:
        s = hu.shape[0] // 2
        hu, mask = hu[s], mask[s]
    if not mask.any() or not (pixel_mm > 0):
        return math.nan, math.nan
    dist = ndimage.distance_transform_edt(~mask, sampling=float(pixel_mm))
    lo, hi = SOFT_TISSUE_HU
    values = hu[(dist > RING_MM[0]) & (dist <= RING_MM[1])]
    values = values[(values >= lo) & (values <= hi)]
    if len(values) < MIN_RING_PX:
        return math.nan, math.nan
    med = float(np.median(values))
    return med, float(1.4826 * np.median(np.abs(values - med)))


def lesion_stats(
    hu_mean: float,
    hu_std: float,
    patch_hu: np.ndarray,
    patch_mask: np.ndarray,
    pixel_mm: float,
    spacing_zyx: Sequence[float] | None,
) -> dict[str, float]:
    """The domain statistics of one lesion (see the module docstring)."""
    par, noise = ring_stats(patch_hu, patch_mask, pixel_mm)
    sz, sy, sx = (math.nan,) * 3 if spacing_zyx is None else (float(v) for v in spacing_zyx)
    return {
        "lesion_hu_mean": float(hu_mean),
        "lesion_hu_std": float(hu_std),
        "parenchyma_hu": par,
        "parenchyma_noise_hu": noise,
        "slice_mm": sz,
        "pixel_mm": float(np.sqrt(sy * sx)) if np.isfinite(sy) and np.isfinite(sx) else math.nan,
    }


def stats_table(index: pd.DataFrame, patch_dir: str | Path) -> pd.DataFrame:
    """Domain statistics of every lesion of a patch cache (``lesion_id`` + :data:`STATS` columns).

    Spacing comes from the index's ``spacing_z_mm`` / ``spacing_y_mm`` / ``spacing_x_mm`` columns
    (caches cut before they existed give NaN there, and the range then has no spacing).
    """
    from liverlesion.patch_cache import load_patch, resolve_patch_dir  # local: heavy (scipy)

    try:
        folder: Path | None = resolve_patch_dir(patch_dir)
    except UserError:  # no patch cache (arrays given in memory): lesion-table statistics only
        folder = None
    rows = []
    has_spacing = {"spacing_z_mm", "spacing_y_mm", "spacing_x_mm"} <= set(index.columns)
    for _, r in index.iterrows():
        spacing = (r["spacing_z_mm"], r["spacing_y_mm"], r["spacing_x_mm"]) if has_spacing else None
        hu_mean, hu_std = r.get("hu_mean", math.nan), r.get("hu_std", math.nan)
        if folder is not None and "file" in r and (folder / str(r["file"])).is_file():
            p = load_patch(folder, r)
            pixel = float(p["meta"].get("pixel_mm", r.get("patch_pixel_mm", math.nan)))
            stats = lesion_stats(hu_mean, hu_std, p["hu"], p["mask"], pixel, spacing)
        else:
            stats = lesion_stats(hu_mean, hu_std, np.zeros((1, 1)), np.zeros((1, 1)), math.nan, spacing)
        rows.append({"lesion_id": str(r["lesion_id"]), **stats})
    return pd.DataFrame(rows, columns=["lesion_id", *STATS])


def training_range(table: pd.DataFrame, lesion_ids: Iterable[str] | None = None) -> dict[str, Any]:
    """The training range to store in a checkpoint, from the training lesions' statistics.

    Args:
        table: :func:`stats_table` output (or any frame with :data:`STATS` columns).
        lesion_ids: The training fold's lesions (default: every row).

    Returns:
        ``{"format_version", "n_lesions", "quantiles", "margin", "stats": {name: {low, high, q_low,
        q_high, median, n}}}``; statistics without finite values are left out.
    """
    if lesion_ids is not None:
        table = table[table["lesion_id"].astype(str).isin({str(i) for i in lesion_ids})]
    stats: dict[str, Any] = {}
    for name in STATS:
        if name not in table:
            continue
        v = pd.to_numeric(table[name], errors="coerce").to_numpy(float)
        v = v[np.isfinite(v)]
        if not len(v):
            continue
        q_lo, q_hi = np.percentile(v, QUANTILES)
        pad = MARGIN * max(q_hi - q_lo, 1e-6 * max(abs(q_hi), 1.0))
        stats[name] = {
            "low": round(float(q_lo - pad), 4),
            "high": round(float(q_hi + pad), 4),
            "q_low": round(float(q_lo), 4),
            "q_high": round(float(q_hi), 4),
            "median": round(float(np.median(v)), 4),
            "n": int(len(v)),
        }
    return {
        "format_version": DOMAIN_FORMAT_VERSION,
        "n_lesions": int(len(table)),
        "quantiles": list(QUANTILES),
        "margin": MARGIN,
        "stats": stats,
    }


def merge_ranges(ranges: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """One range for an ensemble: the union of its members' ranges (None if any member has none)."""
    if not ranges or any(not r or not r.get("stats") for r in ranges):
        return None
    out = {k: v for k, v in ranges[0].items() if k != "stats"}
    names = set.intersection(*(set(r["stats"]) for r in ranges))
    out["stats"] = {
        n: {
            "low": min(r["stats"][n]["low"] for r in ranges),
            "high": max(r["stats"][n]["high"] for r in ranges),
            "median": float(np.median([r["stats"][n]["median"] for r in ranges])),
        }
        for n in STATS
        if n in names
    }
    out["n_members"] = len(ranges)
    return out


def check_domain(training: Mapping[str, Any] | None, table: pd.DataFrame) -> dict[str, Any]:
    """Compare new lesions' statistics with the checkpoint's training range.

    Args:
        training: The checkpoint's ``training_domain`` (None for checkpoints written before it existed).
        table: One row per new lesion with :data:`STATS` columns.

    Returns:
        ``{"status": "in range" | "shift" | "no training range stored", "checks": [...], "warnings":
        [one line per flagged statistic], "n_lesions"}``.
    """
    n = int(len(table))
    if not training or not training.get("stats"):
        return {
            "status": NO_RANGE,
            "checks": [],
            "warnings": [],
            "n_lesions": n,
            "note": "the checkpoint predates the stored training range; no domain-shift check",
        }
    checks, warnings = [], []
    for name, rng in training["stats"].items():
        if name not in table:
            continue
        v = pd.to_numeric(table[name], errors="coerce").to_numpy(float)
        v = v[np.isfinite(v)]
        if not len(v):
            continue
        lo, hi = float(rng["low"]), float(rng["high"])
        below, above = int(np.sum(v < lo)), int(np.sum(v > hi))
        frac = (below + above) / len(v)
        flagged = frac > MIN_OUTSIDE_FRACTION
        med = float(np.median(v))
        checks.append(
            {
                "statistic": name,
                "label": STATS.get(name, name),
                "train_low": lo,
                "train_high": hi,
                "median": round(med, 4),
                "n": int(len(v)),
                "n_below": below,
                "n_above": above,
                "fraction_outside": round(frac, 4),
                "flagged": flagged,
            }
        )
        if flagged:
            side = "below" if below >= above else "above"
            warnings.append(
                f"{STATS.get(name, name)}: {below + above} of {len(v)} lesions outside the training range "
                f"{lo:.4g} to {hi:.4g} (median {med:.4g}, mostly {side})"
            )
    return {
        "status": "shift" if warnings else "in range",
        "checks": checks,
        "warnings": warnings,
        "n_lesions": n,
        "rule": (
            f"training range = {QUANTILES[0]:g}th-{QUANTILES[1]:g}th percentile of the training fold's lesions "
            f"widened by {MARGIN:.0%} of its width; flagged when more than {MIN_OUTSIDE_FRACTION:.0%} of the "
            "new lesions fall outside"
        ),
    }


def format_domain(report: Mapping[str, Any]) -> list[str]:
    """The lines ``predict`` prints (and the report shows) for a domain check."""
    if report.get("status") == NO_RANGE:
        return [f"domain check: {NO_RANGE} in the checkpoint (trained before liverlesion recorded it)"]
    if report.get("status") != "shift":
        n = len(report.get("checks", []))
        return [
            f"domain check: the {report.get('n_lesions', 0)} lesion(s) lie within the training range ({n} statistics)"
        ]
    lines = [
        f"warning: domain shift: {len(report['warnings'])} of {len(report['checks'])} statistics fall outside "
        "the range the checkpoint was trained on; predictions may be unreliable (e.g. a model trained on "
        "synthetic CT applied to real CT)"
    ]
    return lines + [f"  - {w}" for w in report["warnings"]]
