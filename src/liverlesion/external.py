"""External validation: ``liverlesion evaluate`` on the output of ``liverlesion predict --manifest``.

``predict`` on a labelled manifest (one with ``lesion_class``) writes ``results.csv`` with a
``true_class`` column. :func:`evaluate_external` turns it into a ``predictions.csv`` of the same
contract as a ``cv`` run's (one fold, ``external``; the checkpoint's own threshold and temperature,
nothing tuned on the new data) and runs the same metrics code
(:func:`liverlesion.scoring.summarize_predictions`): ``metrics.json`` with patient-bootstrap CIs,
calibration, plots and ``report.html`` next to the results, marked as external validation and
naming the models, their checkpoint sha256 and the domain-shift check of ``predict``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import runs
from liverlesion.bootstrap import CI_LEVEL, CI_METHOD
from liverlesion.calibration import calibration_block
from liverlesion.config import Config
from liverlesion.csv_check import check_csv_complete
from liverlesion.domain import format_domain
from liverlesion.errors import UserError
from liverlesion.fileio import write_json
from liverlesion.predictions import (
    check_positive_class,
    classified_rows,
    prediction_arrays,
    validate_predictions,
    write_predictions,
)
from liverlesion.report import render_report
from liverlesion.scoring import diameter_summary, metrics_head, summarize_predictions
from liverlesion.summary import format_summary

EXTERNAL_FOLD = "external"
RESULTS = "results.csv"
_TEXT = {"patient_id": str, "lesion_id": str, "true_class": str, "pred_class": str}


def is_predict_output(path: str | Path) -> bool:
    """True for a ``predict`` output folder (holding ``results.csv``) or a CSV file given directly."""
    p = Path(path)
    if p.is_file():
        return True
    return p.is_dir() and (p / RESULTS).is_file()


def _locate(path: Path) -> tuple[Path, Path]:
    """(results CSV, folder to write into) for a predict output folder or one of its CSVs."""
    if path.is_dir():
        return path / RESULTS, path
    if path.name == runs.PREDICTIONS and (path.parent / RESULTS).is_file():
        return path.parent / RESULTS, path.parent  # the file this module wrote from results.csv
    return path, path.parent


def read_results(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read ``predict``'s ``results.csv`` (and ``results.json`` beside it) and check it can be scored."""
    check_csv_complete(path, "run `liverlesion predict --manifest` again, or copy results.csv again")
    try:
        df = pd.read_csv(path, dtype=_TEXT, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: not a readable CSV ({str(e).splitlines()[0]}); give the results.csv that "
            "`liverlesion predict --manifest` wrote"
        ) from e
    needed = ["lesion_id", "patient_id", "pred_class", "checkpoint_sha256"]
    if [c for c in needed if c not in df.columns] or not any(c.startswith("prob_") for c in df.columns):
        raise UserError(
            f"{path}: not the output of `liverlesion predict` (needs lesion_id, patient_id, pred_class, "
            "prob_<class>, checkpoint_sha256); give a cv run folder or a predict output folder"
        )
    if "true_class" not in df.columns:
        raise UserError(
            f"{path}: no true_class column, so nothing to score against; the manifest given to "
            "`liverlesion predict --manifest` needs a lesion_class column: add it and predict again"
        )
    empty = df["true_class"].isna().to_numpy()
    if empty.any():
        rows = ", ".join(str(i + 2) for i in np.flatnonzero(empty)[:5])
        raise UserError(
            f"{path}: empty true_class in row(s) {rows}; every lesion of the manifest needs a lesion_class"
        )
    if df.empty:
        raise UserError(f"{path}: no lesions; predict a manifest with at least one lesion")
    info_path = path.parent / "results.json"
    info: dict[str, Any] = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError: not UTF-8 text at all
            raise UserError(f"{info_path}: not valid JSON ({e}); run `liverlesion predict` again") from e
    return df, info


def prediction_frame(results: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """``predict``'s results as a ``predictions.csv`` (the contract of ``cv``), one fold ``external``."""
    cols = ["patient_id", "lesion_id", "true_class", *[f"prob_{c}" for c in classes], "pred_class"]
    out = results[cols].copy()
    if "status" in results:
        out["status"] = results["status"]
    out["threshold"] = pd.to_numeric(results.get("threshold", np.nan), errors="coerce")
    out["fold"] = EXTERNAL_FOLD
    for c in ("max_axial_diameter_mm", "volume_ml", "min_axis_mm", "hu_mean"):
        if c in results:
            out[c] = results[c]
    return out


def _calibration(df: pd.DataFrame, classes: list[str], positive: str, n_bins: int) -> dict[str, Any]:
    """Reliability of the probabilities as ``predict`` gave them (no refit on the external data)."""
    data = prediction_arrays(df, classes, positive)
    what = f"probability of {positive!r}" if data.binary else "top-class confidence vs accuracy"
    block = calibration_block(data, data.probs, n_bins)
    return {
        "available": True,
        "fitted": False,
        "target": what,
        "note": (
            "probabilities as predict gives them: each checkpoint's own temperature (fitted on its inner "
            "validation at training); nothing is refitted on the external data"
        ),
        "n_bins": n_bins,
        "before": block,
        "label_before": "as predicted",
    }


def evaluate_external(
    path: str | Path,
    positive_class: str | None = None,
    n_bootstrap: int | None = None,
) -> dict[str, Any]:
    """Score a ``predict`` output on a labelled manifest: ``metrics.json``, plots and ``report.html``.

    Args:
        path: The ``predict`` output folder, or its ``results.csv``.
        positive_class: Positive class (default: the checkpoint's).
        n_bootstrap: Patient-level bootstrap resamples (default: ``eval.n_bootstrap`` of the defaults).

    Returns:
        The content of ``metrics.json`` (``validation`` = ``"external"``).
    """
    results_path, out = _locate(Path(path))
    if not results_path.is_file():
        raise UserError(f"{results_path}: not found; run `liverlesion predict --manifest CSV -o {out}` first")
    cfg = Config()
    nb = cfg.eval.n_bootstrap if n_bootstrap is None else int(n_bootstrap)
    if nb < 0:
        raise UserError(f"--n-bootstrap {nb}: must be 0 (no CIs) or a positive number, e.g. 1000")
    results, info = read_results(results_path)
    classes = [str(c) for c in info.get("class_names") or [c[5:] for c in results if c.startswith("prob_")]]
    pos = positive_class or info.get("positive_class") or cfg.eval.positive_class
    if positive_class is None and pos not in classes:
        pos = classes[0]
    check_positive_class(pos, classes, str(results_path))
    unknown = sorted(set(results["true_class"]) - set(classes))
    if unknown:
        raise UserError(
            f"{results_path}: true_class value(s) {unknown} are not among the model's classes {classes}; "
            "external validation needs lesions of the classes the model was trained on"
        )
    preds = prediction_frame(results, classes)
    # on the file's own rows (before the too-small ones are dropped), so messages give its line numbers
    validate_predictions(preds, str(results_path), classes)
    df, coverage = classified_rows(preds)
    if df.empty:
        raise UserError(f"{results_path}: every lesion is too small to classify; nothing to score")
    n_bins, seed = int(cfg.eval.n_calibration_bins), int(cfg.cv.seed)
    network = summarize_predictions(
        df, pos, classes, None, n_bootstrap=nb, n_bins=n_bins, seed=seed, detail=True, name="network"
    )
    stored = network["threshold"]["per_fold"].get(EXTERNAL_FOLD, {}).get("source") == "checkpoint"
    network["notes"] = [n for n in network["notes"] if not (stored and n.startswith("no inner-validation"))]
    network["calibration"] = _calibration(df, classes, pos, n_bins)
    for t in network["temperature"]["per_fold"].values():
        t.update(temperature=None, fitted=False, note="each checkpoint's own temperature, applied by predict")
    write_predictions(runs.predictions_path(out), preds)

    domain = info.get("domain_check") or {"status": "not recorded", "checks": [], "warnings": []}
    models = info.get("models") or []
    hashes = sorted({h for v in results["checkpoint_sha256"].dropna().astype(str) for h in v.split(";") if h})
    notes = []
    if domain.get("status") == "shift":
        notes.append("domain shift: " + "; ".join(domain["warnings"]))
    if coverage["n_classified"] < coverage["n_lesions"]:
        notes.append(
            f"metrics cover the {coverage['n_classified']} of {coverage['n_lesions']} lesions that predict "
            "classified; the rest were too small to characterise"
        )
    diam = pd.to_numeric(df.get("max_axial_diameter_mm", pd.Series(dtype=float)), errors="coerce")
    metrics: dict[str, Any] = metrics_head(out, classes, pos, network, coverage, validation="external") | {
        "settings": {
            "n_bootstrap": nb,
            "ci_level": CI_LEVEL,
            "ci_method": CI_METHOD,
            "bootstrap_unit": "patient",
            "threshold_method": "checkpoint" if stored else "argmax",
            "threshold_fitted_on": "each checkpoint's inner validation at training (stored in the checkpoint); "
            "nothing tuned on the external data",
            "temperature_fitted_on": "each checkpoint's inner validation at training; not refitted",
            "n_calibration_bins": n_bins,
            "ece_on": network["calibration"]["target"],
            "seed": seed,
            "size_bins_mm": [b for b in ("<10 mm", "10–20 mm", ">20 mm")],
            "gradcam_max": 0,
            "gradcam_target": "predicted class",
            "pooled": "every classified lesion of the external set, with predict's decision rule",
        },
        "thresholds": {f: v["threshold"] for f, v in network["threshold"]["per_fold"].items()},
        "temperatures": {},
        "dataset": {
            "n_patients": network["n_patients"],
            "n_lesions": network["n_lesions"],
            "n_per_class": network["n_per_class"],
            "diameter_mm": diameter_summary(df, diam, classes),
        },
        "external": {
            "results": str(results_path.resolve()),
            "manifest": (info.get("inputs") or {}).get("manifest"),
            "n_models": info.get("n_models", len(models) or None),
            "decision_rule": info.get("decision_rule"),
            "checkpoint_sha256": hashes,
            "models": [
                {
                    k: m.get(k)
                    for k in ("path", "sha256", "fold", "backbone", "created", "liverlesion_version")
                }
                for m in models
            ],
            "predicted_by": info.get("liverlesion_version"),
            "domain_check": domain,
        },
        "run": {},
        "network": network,
        "baselines": {},
        "comparison": None,
        "notes": notes + network["notes"],
    }
    write_json(runs.metrics_path(out), metrics)

    html = render_report(out, metrics=metrics)
    print(format_external_summary(metrics, format_summary))
    print(f"Wrote {runs.metrics_path(out)} and {html}")
    return metrics


def format_external_summary(metrics: dict[str, Any], format_summary) -> str:
    """The terminal summary of an external validation: the cv summary's lines, the models and the domain."""
    ext = metrics["external"]
    models = f"{ext.get('n_models') or '?'} model(s), checkpoint sha256 {', '.join(ext['checkpoint_sha256'])}"
    lines = [f"External validation of {models}"]
    if ext["domain_check"].get("status") in ("shift", "in range", "no training range stored"):
        lines += [f"  {line}" for line in format_domain(ext["domain_check"])]
    body = format_summary(metrics).splitlines()
    body[1] = body[1].replace(f"{metrics['network']['n_folds']} folds", "external set")
    thr = [t for t in metrics["network"]["threshold"]["per_fold"].values() if t["threshold"] is not None]
    rule = f"Decision: {ext.get('decision_rule') or 'n/a'}" + (
        " (from the checkpoints; not tuned here)" if thr else ""
    )
    body = [rule if line.startswith("Threshold (") else line for line in body]
    if not thr:
        body.insert(2, rule)
    return "\n".join(body[:2] + lines + body[2:])
