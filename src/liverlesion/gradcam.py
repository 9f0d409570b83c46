"""Grad-CAM heat maps (pytorch-grad-cam) and their overlays on CT patches.

``compute_cam`` and ``overlay_png`` are shared with ``predict``; ``gradcam_gallery`` draws
the report's gallery from a run folder (fold models + patch cache) in the evaluation stage
(``evaluate`` calls it; ``report`` only shows the PNG). Images are shown as
stored in the patch cache: row 0 anterior, column 0 patient right (radiology viewer
orientation), so nothing is flipped or transposed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, runs
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_path
from liverlesion.model_input import checkpoint_pool, model_input
from liverlesion.patch_cache import load_patch, patch_files
from liverlesion.progress import progress_bar

GRADCAM_TARGET = "predicted class"  # the gallery explains the decision that is shown


MIN_CAM_SIDE = 5  # a map coarser than this says nothing about where in the lesion the evidence is


class CamUnavailable(ValueError):
    """No layer of the network has a map fine enough for Grad-CAM at this input size."""


#: Grad-CAM's colour map: perceptually uniform and readable with colour-vision deficiency (jet is neither),
#: dark for low, bright yellow for high; and the lesion outline's colour, visible over it and over grey.
CAM_CMAP = "inferno"
OUTLINE_COLOR = "cyan"
CAM_KEY = "heat: Grad-CAM for the predicted class, dark low to bright yellow high"


def _target_layers(model: Any, size: tuple[int, int] | None = None) -> list:
    import torch

    if hasattr(model, "cam_target_layers"):
        import inspect

        takes_size = bool(inspect.signature(model.cam_target_layers).parameters)
        layers = list(model.cam_target_layers(size) if takes_size else model.cam_target_layers())
        if layers:
            return layers
        raise CamUnavailable(
            f"Grad-CAM not available at this input size ({size[0] if size else '?'} px): no layer's map is "
            f"at least {MIN_CAM_SIDE}x{MIN_CAM_SIDE}; use a larger patch.size_px"
        )
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError("model has no cam_target_layers() and no Conv2d layer for Grad-CAM")
    return [convs[-1]]  # the last convolution: the usual Grad-CAM choice


def compute_cam(
    model: Any,
    image_chw: np.ndarray,
    target_class: int,
    target_layers: Sequence[Any] | None = None,
) -> np.ndarray:
    """Grad-CAM of one patch for one class.

    Args:
        model: Classifier returning logits ``(1, K)``; its ``cam_target_layers()`` (or else the
            last Conv2d) gives the layers to explain.
        image_chw: Patch ``(C, H, W)`` as the model takes it (windowed to [0, 1]).
        target_class: Class index whose logit is explained.
        target_layers: Override the layers.

    Returns:
        ``(H, W)`` float32 map in [0, 1], same orientation as the input.
    """
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    image = np.asarray(image_chw, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"compute_cam expects a (C, H, W) image, got shape {image.shape}")
    layers = list(target_layers) if target_layers is not None else _target_layers(model, image.shape[1:])
    was_training = model.training
    if getattr(model, "fusion_features", None):
        # the image evidence: the network's logits (the fusion branch adds no pixels)
        model = _NetworkPart(model).train(was_training)
    device = next(model.parameters()).device
    x = torch.from_numpy(image[None]).to(device)
    # Gradients must flow even if the weights are frozen (requires_grad=False).
    x.requires_grad_(True)
    cam = GradCAM(model=model, target_layers=layers)
    try:
        with torch.enable_grad():
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(target_class))])
    finally:
        cam.activations_and_grads.release()  # remove hooks; don't use its __exit__, it swallows IndexError
        model.train(was_training)
    result = np.nan_to_num(out[0].astype(np.float32))
    return np.clip(result, 0.0, 1.0)


def _network_part_class():
    import torch

    class NetworkPart(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.network_logits(x)

    return NetworkPart


def _NetworkPart(net):  # noqa: N802 (a class built lazily, so importing gradcam needs no torch)
    return _network_part_class()(net)


def draw_overlay(
    ax: Any,
    image_hw: np.ndarray,
    cam_hw: np.ndarray | None,
    mask_hw: np.ndarray | None = None,
    title: str = "",
    alpha: float = 0.4,
    title_color: str = "black",
) -> None:
    """Draw a greyscale patch, the CAM (:data:`CAM_CMAP`, semi-transparent) and the mask outline on a
    matplotlib axis."""
    ax.imshow(image_hw, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    if cam_hw is not None:
        ax.imshow(cam_hw, cmap=CAM_CMAP, vmin=0.0, vmax=1.0, alpha=alpha, interpolation="bilinear")
    if mask_hw is not None and np.any(mask_hw) and not np.all(mask_hw):
        ax.contour(np.asarray(mask_hw, dtype=float), levels=[0.5], colors=OUTLINE_COLOR, linewidths=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7, color=title_color)


def _save(fig: Any, out: str | Path, dpi: int = 110) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return out


def overlay_png(
    image_hw: np.ndarray,
    cam_hw: np.ndarray | None,
    out: str | Path,
    mask_hw: np.ndarray | None = None,
    title: str = "",
    alpha: float = 0.4,
) -> Path:
    """Write one overlay (patch + Grad-CAM + mask outline) as a PNG, atomically.

    Args:
        image_hw: Greyscale patch in [0, 1] (row 0 anterior, column 0 patient right).
        cam_hw: Grad-CAM map in [0, 1] (same shape) or None for the patch alone.
        out: PNG path.
        mask_hw: Lesion mask, drawn as an outline.
        title: Title; the disclaimer is added below it.
        alpha: CAM opacity.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    draw_overlay(
        ax, image_hw, cam_hw, mask_hw, title=f"{title}\n{DISCLAIMER}" if title else DISCLAIMER, alpha=alpha
    )
    return _save(fig, out)


def centre_sample(npz: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """From a patch-cache npz: the centre sample ``(C, H, W)``, its centre channel ``(H, W)`` and its mask."""
    image = np.asarray(npz["image"], dtype=np.float32)
    if image.ndim != 4:
        raise ValueError(f"patch image must be (S, C, H, W), got shape {image.shape}")
    s = image.shape[0] // 2
    chw = image[s]
    mask = np.asarray(npz["mask"])[s] if "mask" in npz else None
    return chw, chw[chw.shape[0] // 2], mask


def _load_model(path: Path) -> tuple[Any, dict[str, Any]]:
    from liverlesion.model import load_checkpoint  # local: heavy (torch)

    model, ckpt = load_checkpoint(path)
    model.eval()
    return model, ckpt


def _order(df: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    probs = df[[f"prob_{c}" for c in classes]].to_numpy(float)
    col = {c: i for i, c in enumerate(classes)}
    pred_idx = df["pred_class"].map(col).fillna(0).astype(int).to_numpy()
    out = df.copy()
    out["conf__"] = probs[np.arange(len(df)), pred_idx]
    out["wrong__"] = (df["true_class"].astype(str) != df["pred_class"].astype(str)).astype(int)
    # Misclassified first (most confident mistakes on top), then correct ones by confidence.
    return out.sort_values(["wrong__", "conf__"], ascending=[False, False], kind="stable")


def gradcam_gallery(
    run_dir: str | Path,
    predictions_df: pd.DataFrame,
    patch_dir: str | Path,
    max_items: int,
    out_png: str | Path,
) -> Path:
    """Grid of Grad-CAM overlays, misclassified lesions first, for the report.

    Each lesion is explained by its own fold's model (``fold_K/model.pt``) for the class it
    was predicted as (``pred_class``), on the centre sample of its cached patch.

    Args:
        run_dir: Run folder with ``fold_K/model.pt``.
        predictions_df: Out-of-fold predictions (``pred_class`` after the per-fold threshold).
        patch_dir: Patch cache folder (``index.csv`` + npz files).
        max_items: Most lesions to show.
        out_png: PNG to write.

    Returns:
        ``out_png``.
    """
    from matplotlib.figure import Figure

    run_dir, patch_dir = Path(run_dir), Path(patch_dir)
    if not patch_dir.is_dir():
        raise UserError(f"{patch_dir}: patch cache not found; re-run `liverlesion cv` to rebuild it")
    classes = [c[5:] for c in predictions_df.columns if c.startswith("prob_")]
    if "status" in predictions_df.columns:  # lesions too small to characterise have no decision to explain
        predictions_df = predictions_df[predictions_df["status"].astype(str) == "classified"]
    files = patch_files(patch_dir)
    ordered = _order(predictions_df, classes)
    models: dict[str, tuple[Any, dict[str, Any]] | None] = {}
    cells: list[dict[str, Any]] = []
    skipped: list[str] = []
    for row in progress_bar(list(ordered.itertuples(index=False)), "Grad-CAM", unit="lesion", log=False):
        if len(cells) >= max_items:
            break
        fold = str(row.fold)
        if fold not in models:
            path = runs.model_path(run_dir, fold)
            models[fold] = _load_model(path) if path.is_file() else None
        lid = str(row.lesion_id)
        if models[fold] is None or lid not in files or not files[lid].is_file():
            skipped.append(lid)
            continue
        model, ckpt = models[fold]
        chw, centre, mask = centre_sample(load_patch(patch_dir, files[lid], arrays=("image", "mask")))
        in_chans = int(ckpt.get("in_chans", chw.shape[0]))
        chw = model_input(chw, mask, checkpoint_pool(ckpt), in_chans)[0]
        names = list(ckpt.get("class_names", classes))
        pred = str(row.pred_class)
        target = names.index(pred) if pred in names else classes.index(pred)
        try:
            cam = compute_cam(model, chw, target)
        except CamUnavailable as e:
            raise UserError(str(e)) from e
        cells.append(
            {
                "image": centre,
                "cam": cam,
                "mask": mask,
                "wrong": bool(row.wrong__),
                # one short line each: "true haemangioma / pred haemangioma" overran the neighbouring cells
                "title": f"{lid}\ntrue {row.true_class}\npred {pred}, p = {row.conf__:.2f}",
            }
        )
    if not cells:
        missing = "fold models" if all(v is None for v in models.values()) else "patches"
        raise UserError(
            f"{run_dir}: no lesion could be drawn for the Grad-CAM gallery (missing {missing}); "
            "re-run `liverlesion cv`, or pass --no-gradcam"
        )
    ncols = min(6, len(cells))
    nrows = int(np.ceil(len(cells) / ncols))
    fig = Figure(figsize=(2.1 * ncols, 2.4 * nrows + 0.6))
    for i, c in enumerate(cells):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        draw_overlay(
            ax, c["image"], c["cam"], c["mask"], c["title"], title_color="crimson" if c["wrong"] else "black"
        )
    fig.suptitle(
        f"Grad-CAM for the {GRADCAM_TARGET} (misclassified first, red titles); {OUTLINE_COLOR}: lesion mask;\n"
        f"{CAM_KEY.removeprefix('heat: Grad-CAM for the predicted class, ')} — {DISCLAIMER}",
        fontsize=9,
    )
    return _save(fig, out_png)
