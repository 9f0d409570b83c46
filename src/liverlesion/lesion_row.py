"""One classified lesion as a row of the results table (columns: :func:`liverlesion.results.result_columns`).

:class:`liverlesion.classifier.Classifier` computes the probabilities; this module only lays out
what is reported for a lesion: identity, decision, probabilities, uncertainty, measurements and
provenance (model version, checkpoint hashes, disclaimer).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from liverlesion import DISCLAIMER
from liverlesion.decision import CLASSIFIED, TOO_SMALL

__all__ = ["entropy_bits", "lesion_row"]


def entropy_bits(p: np.ndarray) -> float:
    """The Shannon entropy (bits) of a probability vector."""
    p = np.clip(np.asarray(p, dtype=float), 1e-12, 1.0)
    return float(-(p * np.log2(p)).sum())


def lesion_row(
    clf: Any,
    lesion: Any,
    patch: Any,
    image_ref: str,
    *,
    pred: str,
    too_small: bool,
    probs: np.ndarray,
    uncertainty: float,
    entropy: float,
    hashes: str,
) -> dict[str, Any]:
    """The results-table row of one lesion.

    Args:
        clf: The :class:`~liverlesion.classifier.Classifier` that classified it (class names,
            threshold, fusion features, model version).
        lesion: The :class:`~liverlesion.lesions.Lesion`.
        patch: Its extracted patch (``meta["centre_slice"]`` is reported).
        image_ref: The image's path or reference, as given.
        pred: The predicted class, or ``TOO_SMALL``.
        too_small: The lesion is below the minimum size (not classified).
        probs: Ensemble probabilities (NaN when not classified).
        uncertainty: Spread of the members' probability for ``pred``.
        entropy: Entropy of ``probs`` in bits.
        hashes: The checkpoints' SHA-256, ``;``-joined.
    """
    row: dict[str, Any] = {
        "lesion_id": lesion.lesion_id,
        "patient_id": lesion.patient_id,
        "image": image_ref,
        "source": lesion.source,
        "label": lesion.label,
        "pred_class": pred,
        "status": TOO_SMALL if too_small else CLASSIFIED,
        "fusion_input": "" if not clf.fusion_features else lesion.measurement,
        # "mask", or for a click "estimated from click ..." (grown, capped or sphere; click.py)
        "measurement": lesion.measurement,
    }
    for c, p in zip(clf.class_names, probs, strict=True):
        row[f"prob_{c}"] = float(p)
    cx, cy, cz = lesion.centroid_mm
    row.update(
        {
            "uncertainty": uncertainty,
            "entropy_bits": entropy,
            "threshold": clf.threshold if clf.threshold is not None else math.nan,
            "positive_class": clf.positive_class or "",
            "max_axial_diameter_mm": float(lesion.max_axial_diameter_mm),
            "min_axis_mm": float(lesion.min_axis_mm),
            "volume_ml": float(lesion.volume_ml),
            "n_voxels": int(lesion.n_voxels),
            "hu_mean": float(lesion.hu_mean),
            "hu_std": float(lesion.hu_std),
            "centroid_x_mm": float(cx),
            "centroid_y_mm": float(cy),
            "centroid_z_mm": float(cz),
            "centre_slice": int(patch.meta["centre_slice"]),
            "n_models": clf.n_models,
            "model_version": clf.model_version,
            "checkpoint_sha256": hashes,
            "disclaimer": DISCLAIMER,
        }
    )
    if lesion.lesion_class:
        row["true_class"] = lesion.lesion_class
    return row
