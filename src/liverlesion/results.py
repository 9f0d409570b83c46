"""Typed classification results and the results table.

``LesionResult`` (one lesion: its row plus the mask, patch and Grad-CAM behind it) and
``CaseResult`` (one image and its lesions) are what :meth:`Classifier.classify_case
<liverlesion.classifier.Classifier.classify_case>` returns; ``results_table`` turns their rows
into the ``Results`` frame (``results.csv``'s columns, :func:`result_columns`) that ``predict``,
the Python API and ``serve`` print and write; :func:`results_info` is ``results.json``'s record.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, __version__
from liverlesion.fileio import safe_name
from liverlesion.volume import Volume, withheld_uid

__all__ = [
    "CaseResult",
    "LesionResult",
    "Results",
    "format_results",
    "result_columns",
    "results_info",
    "results_table",
    "safe_name",
]


@dataclass
class LesionResult:
    """One lesion's row plus the arrays needed for overlays and the SR (kept out of the table).

    Attributes:
        row: The lesion's results-table row (:func:`result_columns`).
        lesion: Its measurements (:class:`liverlesion.lesions.Lesion`).
        mask: Full-size boolean mask on the image grid.
        patch: The network's input (:class:`liverlesion.patches.LesionPatch`).
        cam: Grad-CAM ``(H, W)`` in ``[0, 1]`` when computed.
        domain: The lesion's HU/spacing statistics (:mod:`liverlesion.domain`).
    """

    row: dict[str, Any]
    lesion: Any  # lesions.Lesion
    mask: np.ndarray  # full-size bool
    patch: Any  # patches.LesionPatch
    cam: np.ndarray | None = None
    domain: dict[str, float] | None = None  # liverlesion.domain statistics of this lesion

    @property
    def lesion_id(self) -> str:
        """The lesion's id (``{patient_id}-L01``, ...)."""
        return str(self.row["lesion_id"])

    @property
    def pred_class(self) -> str:
        """The predicted class, or ``TOO_SMALL``."""
        return str(self.row["pred_class"])


@dataclass
class CaseResult:
    """One image with its lesion results.

    Attributes:
        image: The CT volume the lesions were classified in.
        image_ref: How the image is referred to in the results (its path or upload name).
        results: One :class:`LesionResult` per lesion, in id order.
    """

    image: Volume
    image_ref: str
    results: list[LesionResult] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The lesions' results-table rows."""
        return [r.row for r in self.results]

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """lesion_id -> full-size mask."""
        return {r.row["lesion_id"]: r.mask for r in self.results}


def results_info(
    clf: Any, df: pd.DataFrame, min_size_mm: float, inputs: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The JSON record of a prediction run (``results.json``): tool, version, disclaimer, models, inputs, lesion rows.

    Args:
        clf: The :class:`~liverlesion.classifier.Classifier` (its ``describe()``: models, classes, decision rule).
        df: The results table.
        min_size_mm: The minimum lesion size used.
        inputs: What was classified (paths, options; never patient data from DICOM; a ``series``
            UID is recorded as given, see :func:`~liverlesion.volume.withheld_uid`).
        **extra: Further top-level fields (sources, domain check).
    """
    return {
        "tool": "liverlesion",
        "liverlesion_version": __version__,
        "disclaimer": DISCLAIMER,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **clf.describe(),
        "min_size_mm": float(min_size_mm),
        "inputs": {**inputs, "series": withheld_uid(inputs["series"])} if "series" in inputs else inputs,
        **extra,
        "lesions": df.astype(object).where(df.notna(), None).to_dict(orient="records"),
    }


def results_table(
    rows: list[dict],
    class_names: Sequence[str],
    positive_class: str | None,
    decision_rule: str,
    n_models: int,
) -> Results:
    """The results table of result rows, with the decision rule in ``attrs``.

    Args:
        rows: Lesion rows (:attr:`LesionResult.row`).
        class_names: The classifier's classes (one ``prob_<class>`` column each).
        positive_class: The binary positive class, or None.
        decision_rule: How the class was chosen (printed under the table).
        n_models: Ensemble size.
    """
    cols = result_columns(class_names)
    if any("true_class" in r for r in rows):
        cols.insert(cols.index("pred_class"), "true_class")
    df = Results(rows, columns=cols)
    df["label"] = df["label"].astype("Int64")
    df.attrs.update(
        class_names=list(class_names),
        positive_class=positive_class,
        decision_rule=decision_rule,
        n_models=n_models,
    )
    return df


class Results(pd.DataFrame):
    """The results table (one row per lesion, :func:`result_columns`); a plain DataFrame that prints short.

    ``print(clf.predict(...))`` shows the lesion id, class, probability, the ensemble's spread (several models) and size of each
    lesion, the decision rule and the disclaimer; every column is still in the frame
    (``df.to_string()`` or ``pd.DataFrame(df)`` show them all).
    """

    @property
    def _constructor(self):
        return Results

    def __repr__(self) -> str:
        a = self.attrs
        if "class_names" not in a or not {"lesion_id", "pred_class", "uncertainty"} <= set(self.columns):
            return super().__repr__()  # a selection of columns: print it as pandas does
        return format_results(self, a["class_names"], a.get("positive_class"), a.get("decision_rule"))


def format_results(
    df: pd.DataFrame,
    class_names: Sequence[str],
    positive_class: str | None = None,
    decision_rule: str | None = None,
    n_models: int | None = None,
) -> str:
    """The short results table that ``predict`` prints (and ``print(results)`` shows)."""
    cols = ["lesion_id", "pred_class"]
    if positive_class is not None:
        cols.append(f"prob_{positive_class}")
    else:
        cols += [f"prob_{c}" for c in class_names]
    n_models = n_models if n_models is not None else df.attrs.get("n_models")
    # the spread across an ensemble's models; one model has none ("0.000" would read as certain)
    cols += (["uncertainty"] if n_models != 1 else []) + ["max_axial_diameter_mm", "volume_ml"]
    show = pd.DataFrame(df)[[c for c in cols if c in df.columns]]
    show = show.rename(
        columns={"max_axial_diameter_mm": "diam_mm", "volume_ml": "vol_ml", "uncertainty": "ens_sd"}
    )
    with pd.option_context("display.max_rows", 40, "display.width", 160):
        table = show.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
    tail = f"{len(df)} lesion(s)"
    if decision_rule:
        tail += f"; decision: {decision_rule}"
    if n_models:
        tail += f"; {n_models} model(s)"
    if "measurement" in df.columns and df["measurement"].astype(str).str.startswith("estimated").any():
        tail += "; sizes of clicked lesions are estimated from the click, not measured on a mask"
    return f"{table}\n{tail}\nliverlesion: {DISCLAIMER}"


def result_columns(class_names: Sequence[str]) -> list[str]:
    """Columns of the results table, in order (``true_class`` is added in manifest mode)."""
    return [
        "lesion_id",
        "patient_id",
        "image",
        "source",
        "label",
        "pred_class",
        *[f"prob_{c}" for c in class_names],
        "uncertainty",
        "entropy_bits",
        "threshold",
        "positive_class",
        "status",
        "fusion_input",
        "measurement",
        "max_axial_diameter_mm",
        "min_axis_mm",
        "volume_ml",
        "n_voxels",
        "hu_mean",
        "hu_std",
        "centroid_x_mm",
        "centroid_y_mm",
        "centroid_z_mm",
        "centre_slice",
        "n_models",
        "model_version",
        "checkpoint_sha256",
        "disclaimer",
    ]
