"""Lesion overlay PNGs: the lesion's slice with its outline, the network's patch and its Grad-CAM.

``draw_lesion_overlay`` draws what ``predict`` writes to ``overlays/<lesion_id>.png`` and what
``serve`` shows, from one :class:`~liverlesion.results.LesionResult`; every picture carries the
caption "Research use, not for diagnosis".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from liverlesion.decision import TOO_SMALL
from liverlesion.fileio import atomic_path
from liverlesion.gradcam import CAM_KEY, OUTLINE_COLOR, draw_overlay
from liverlesion.patches import window
from liverlesion.results import LesionResult
from liverlesion.volume import Volume

__all__ = ["OVERLAY_CAPTION", "draw_lesion_overlay"]

OVERLAY_CAPTION = "Research use, not for diagnosis"


def overlay_key(cam: bool) -> str:
    """What the overlay's colours are, written on it: a PNG shared alone has no caption beside it."""
    return f"{OUTLINE_COLOR} outline: lesion mask; yellow box: the field of the network's patch" + (
        f"; {CAM_KEY}" if cam else ""
    )


def draw_lesion_overlay(result: LesionResult, image: Volume, path: Path, class_names: Sequence[str]) -> Path:
    """Write a lesion's overlay PNG (atomically).

    Left: the lesion's centre slice (largest cross-section) in the liver window, as
    in a viewer (anterior up, patient right on the left), with the lesion outline.
    Right: the network's patch with the outline and, when computed, the Grad-CAM
    heat-map. Title: class and probabilities; caption: research use, not for diagnosis.
    """
    from matplotlib.figure import Figure

    row, patch = result.row, result.patch
    z = int(row["centre_slice"])
    s = patch.image.shape[0] // 2  # 2-D mode: the centre sample; 2.5-D: the centre stack
    centre = patch.image[s, patch.image.shape[1] // 2]
    patch_mask = patch.mask[min(s, patch.mask.shape[0] - 1)]

    fig = Figure(figsize=(8.0, 4.6), dpi=100)
    ax = fig.add_subplot(1, 2, 1)
    # Liver window (W 250 / L 60, as the patches) for display.
    ax.imshow(
        window(image.array[z], 60.0, 250.0),
        cmap="gray",
        vmin=0,
        vmax=1,
        aspect=image.spacing[1] / image.spacing[2],
        interpolation="nearest",
    )
    if result.mask[z].any():
        ax.contour(result.mask[z].astype(float), levels=[0.5], colors=OUTLINE_COLOR, linewidths=0.8)
    field_mm = float(patch.meta.get("field_mm", math.nan))
    _, cy, cx = patch.meta.get("centre_index_zyx", (z, math.nan, math.nan))
    if math.isfinite(field_mm) and math.isfinite(cy) and math.isfinite(cx):
        from matplotlib.patches import Rectangle

        # The field the network saw, as a box on the slice.
        hy, hx = field_mm / 2 / image.spacing[1], field_mm / 2 / image.spacing[2]
        ax.add_patch(
            Rectangle((cx - hx, cy - hy), 2 * hx, 2 * hy, fill=False, edgecolor="yellow", linewidth=0.8)
        )
        ax.set_xlim(-0.5, image.shape[2] - 0.5)
        ax.set_ylim(image.shape[1] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    # numbered from 1 as a PACS viewer (and the browser viewer) numbers slices; centre_slice counts from 0
    ax.set_title(
        f"axial slice {z + 1} of {image.shape[0]} (anterior up, patient right on the left)", fontsize=8
    )
    ax = fig.add_subplot(1, 2, 2)
    draw_overlay(
        ax,
        centre,
        result.cam,
        patch_mask,
        title=f"patch, {field_mm:.0f} mm field" + (" + Grad-CAM" if result.cam is not None else ""),
    )
    if row["pred_class"] == TOO_SMALL:
        verdict = f"{TOO_SMALL} (smallest axis {row['min_axis_mm']:.1f} mm): not classified"
    else:
        probs = ", ".join(f"P({c}) {row[f'prob_{c}']:.2f}" for c in class_names)
        spread = (  # one model has no spread: "uncertainty 0.00" would read as certain
            "one model (no ensemble spread)"
            if int(row.get("n_models") or 1) == 1
            else f"ensemble SD {row['uncertainty']:.2f}"
        )
        verdict = f"predicted {row['pred_class']}: {probs}, {spread}"
    fig.suptitle(
        f"{row['lesion_id']}  {verdict}\n"
        f"diameter {row['max_axial_diameter_mm']:.1f} mm, volume {row['volume_ml']:.2f} mL",
        fontsize=9,
    )
    fig.text(0.5, 0.085, overlay_key(result.cam is not None), ha="center", fontsize=8, color="dimgray")
    fig.text(0.5, 0.025, OVERLAY_CAPTION, ha="center", fontsize=11, color="darkred", weight="bold")
    fig.tight_layout(rect=(0, 0.11, 1, 0.9))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
