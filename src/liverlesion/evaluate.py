"""Evaluation of a run folder: out-of-fold predictions -> ``metrics.json`` (+ Grad-CAM gallery).

Reads the run folder's files (``predictions.csv``, ``val_predictions.csv``, ``config.yaml``,
``run.json``, ``baselines/*/predictions.csv``; layout in :mod:`liverlesion.runs`), scores the
network and each baseline (:func:`liverlesion.scoring.summarize_predictions`), compares them
(:mod:`liverlesion.bootstrap`), writes ``metrics.json``, draws the Grad-CAM gallery (the only
step that needs the fold models), then has :mod:`liverlesion.report` draw the rest from the files.

Nothing is tuned on test data: each fold's decision threshold and softmax temperature
are fitted on that fold's inner-validation predictions only and then applied to the
fold's test predictions. Confidence intervals come from resampling *patients* (all
their lesions come along), because lesions of one patient are not independent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd

from liverlesion import runs
from liverlesion.bootstrap import CI_LEVEL, CI_METHOD, compare_with_best_baseline
from liverlesion.config import Config, load_run_config
from liverlesion.decision import parse_threshold_method
from liverlesion.errors import UserError
from liverlesion.external import evaluate_external, is_predict_output
from liverlesion.fileio import write_json
from liverlesion.gradcam import gradcam_gallery
from liverlesion.predictions import check_positive_class, classified_rows, read_predictions
from liverlesion.report import render_report
from liverlesion.scoring import SIZE_BINS, diameter_summary, metrics_head, summarize_predictions
from liverlesion.summary import format_summary
from liverlesion.thresholds import apply_thresholds


def _run_config(run_dir: Path) -> tuple[Config, str | None]:
    path = runs.config_path(run_dir)
    return (
        (load_run_config(path), None)
        if path.is_file()
        else (Config(), "no config.yaml in the run folder: defaults used")
    )


def evaluate_run(
    run_dir: str | Path,
    positive_class: str | None = None,
    n_bootstrap: int | None = None,
    gradcam: bool = True,
) -> dict[str, Any]:
    """Evaluate a run folder: ``metrics.json``, ``plots/*.png`` and ``report.html``.

    Args:
        run_dir: Folder written by ``liverlesion cv`` (holding ``predictions.csv``), or the output
            of ``liverlesion predict --manifest`` on a labelled manifest (folder or its ``results.csv``):
            external validation, see :mod:`liverlesion.external`.
        positive_class: Positive class (default: ``eval.positive_class`` of the run's config).
        n_bootstrap: Patient-level bootstrap resamples (default: ``eval.n_bootstrap``).
        gradcam: Draw the Grad-CAM gallery (needs the fold models and the patch cache).

    Returns:
        The content of ``metrics.json``.
    """
    run_dir = Path(run_dir)
    if is_predict_output(run_dir):  # external validation: the output of predict on a labelled manifest
        return evaluate_external(run_dir, positive_class=positive_class, n_bootstrap=n_bootstrap)
    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir}: run folder not found; give the folder written by `liverlesion cv`, or the "
            "output folder of `liverlesion predict --manifest` for external validation"
        )
    runs.check_run_slots(run_dir)
    pred_path = runs.predictions_path(run_dir)
    if not pred_path.is_file():
        raise UserError(
            f"{pred_path}: not found; run `liverlesion cv MANIFEST {run_dir}` first to write out-of-fold predictions"
        )
    cfg, cfg_note = _run_config(run_dir)
    run_info = runs.read_run_info(run_dir)
    pos = positive_class if positive_class is not None else cfg.eval.positive_class
    nb = cfg.eval.n_bootstrap if n_bootstrap is None else int(n_bootstrap)
    if nb < 0:
        raise UserError(f"--n-bootstrap {nb}: must be 0 (no CIs) or a positive number, e.g. 1000")
    method = parse_threshold_method(cfg.eval.threshold)
    n_bins = int(cfg.eval.n_calibration_bins)
    if n_bins < 2:
        raise UserError(f"eval.n_calibration_bins={n_bins}: use at least 2 bins, e.g. 10")
    seed = int(cfg.cv.seed)

    df, classes = read_predictions(pred_path, run_info.get("class_names"))
    check_positive_class(pos, classes, str(pred_path))
    df, coverage = classified_rows(df)
    val_path = runs.val_predictions_path(run_dir)
    val_df = classified_rows(read_predictions(val_path, classes)[0])[0] if val_path.is_file() else None
    if val_df is not None:
        check_validation_apart(val_df, df, val_path, pred_path)
    notes = [n for n in [cfg_note] if n]
    if val_df is None:
        notes.append(f"{val_path.name} not found: threshold 0.5 and no temperature scaling")

    # Validate, then work: every baseline is read and matched to the network's lesions first.
    baseline_inputs: dict[str, tuple[pd.DataFrame, pd.DataFrame | None]] = {}
    for bpath in runs.baseline_predictions(run_dir):
        bdf, _ = read_predictions(bpath, classes)
        bdf = same_lesions(bdf, df, bpath, pred_path, run_dir)
        bval_path = runs.val_predictions_path(bpath.parent)
        bval = read_predictions(bval_path, classes)[0] if bval_path.is_file() else None
        baseline_inputs[bpath.parent.name] = (bdf, bval)

    common = {"n_bootstrap": nb, "threshold": method, "n_bins": n_bins, "seed": seed}
    network = summarize_predictions(df, pos, classes, val_df, detail=True, name="network", **common)

    baselines: dict[str, dict[str, Any]] = {}
    baseline_dfs: dict[str, pd.DataFrame] = {}
    for bname, (bdf, bval) in baseline_inputs.items():
        # Without its own inner-validation predictions a baseline is scored at 0.5.
        b_common = dict(common, threshold=method if bval is not None else 0.5)
        baselines[bname] = summarize_predictions(
            bdf, pos, classes, bval, detail=False, name=bname, **b_common
        )
        baseline_dfs[bname] = bdf
    comparison = (
        compare_with_best_baseline(df, baseline_dfs, baselines, classes, pos, nb, seed) if baselines else None
    )

    diam = pd.to_numeric(df.get("max_axial_diameter_mm", pd.Series(dtype=float)), errors="coerce")
    metrics: dict[str, Any] = metrics_head(run_dir, classes, pos, network, coverage) | {
        "settings": {
            "n_bootstrap": nb,
            "ci_level": CI_LEVEL,
            "ci_method": CI_METHOD,
            "bootstrap_unit": "patient",
            "threshold_method": method,
            "threshold_fitted_on": threshold_source(network["threshold"]["per_fold"]),
            "temperature_fitted_on": temperature_source(network["temperature"]["per_fold"]),
            "n_calibration_bins": n_bins,
            "ece_on": network["calibration"].get("target", "positive-class probability"),
            "seed": seed,
            "size_bins_mm": [b[0] for b in SIZE_BINS],
            "gradcam_max": int(cfg.eval.gradcam_max),
            "gradcam_target": "predicted class",
            "pooled": "out-of-fold predictions of all folds, each thresholded with its own fold's threshold",
        },
        "thresholds": {f: v["threshold"] for f, v in network["threshold"]["per_fold"].items()},
        "temperatures": {f: v["temperature"] for f, v in network["temperature"]["per_fold"].items()},
        "dataset": {
            "n_patients": network["n_patients"],
            "n_lesions": network["n_lesions"],
            "n_per_class": network["n_per_class"],
            "diameter_mm": diameter_summary(df, diam, classes),
        },
        "run": {
            k: run_info.get(k) for k in ("kind", "manifest", "patch_dir", "backbone", "init") if k in run_info
        },
        "network": network,
        "baselines": baselines,
        "comparison": comparison,
        "notes": notes + network["notes"],
    }
    if coverage["n_classified"] < coverage["n_lesions"]:
        n_small = coverage["n_lesions"] - coverage["n_classified"]
        metrics["notes"].append(
            f"metrics cover the {coverage['n_classified']} of {coverage['n_lesions']} lesions that predict "
            f"classifies; {n_small} {'is' if n_small == 1 else 'are'} too small to characterise "
            f"(smallest axis < eval.min_size_mm = {cfg.eval.min_size_mm:g} mm), for every method alike"
        )
    write_json(runs.metrics_path(run_dir), metrics)

    gallery = draw_gradcam_gallery(run_dir, metrics) if gradcam else None
    # Drawn from the files just written, exactly as a later `liverlesion report` redraw would.
    html = render_report(run_dir, metrics=metrics, gradcam=gallery)
    print(format_summary(metrics))
    print(f"Wrote {runs.metrics_path(run_dir)} and {html}")
    return metrics


_THRESHOLD_SOURCES = {
    "checkpoint": "each fold's inner-validation predictions at training (recorded in its checkpoint)",
    "inner-validation": "each fold's inner-validation predictions (val_predictions.csv)",
    "config": "not fitted: fixed in the config (eval.threshold)",
    "default": "not fitted: 0.5 (no usable inner-validation predictions)",
    "argmax": "none: more than two classes, the class with the highest probability",
}


def _by_fold(phrases: dict[str, str]) -> str:
    """One phrase when every fold shares it, else ``folds 0, 1: ...; fold 2: ...``."""
    groups: dict[str, list[str]] = {}
    for f, phrase in phrases.items():
        groups.setdefault(phrase, []).append(f)
    if len(groups) <= 1:
        return next(iter(groups), "no folds")
    return "; ".join(f"fold{'s' if len(fs) > 1 else ''} {', '.join(fs)}: {ph}" for ph, fs in groups.items())


def threshold_source(per_fold: dict[str, Any]) -> str:
    """Where the folds' thresholds came from, for ``settings.threshold_fitted_on`` (was a fixed claim of
    val_predictions.csv, also for a fixed threshold, a missing file or three classes)."""
    return _by_fold(
        {f: _THRESHOLD_SOURCES.get(v.get("source"), str(v.get("note"))) for f, v in per_fold.items()}
    )


def temperature_source(per_fold: dict[str, Any]) -> str:
    """Where the folds' temperatures came from, for ``settings.temperature_fitted_on``."""
    phrases = {}
    for f, v in per_fold.items():
        if v.get("source") == "checkpoint":
            phrases[f] = "each fold's checkpoint (fitted at training on its inner-validation logits, or 1)"
        elif v.get("fitted"):
            phrases[f] = "each fold's inner-validation logits (val_predictions.csv)"
        else:
            phrases[f] = f"not fitted: T = 1 ({v.get('note', '')})"
    return _by_fold(phrases)


def check_validation_apart(val: pd.DataFrame, test: pd.DataFrame, val_path: Path, pred_path: Path) -> None:
    """Refuse inner-validation predictions of a fold's own test patients (e.g. another run's file).

    Each fold's threshold is chosen on its validation rows; rows of its test patients would tune it
    on the very lesions it is then scored on.
    """
    if "fold" not in val.columns or "fold" not in test.columns:
        return
    shared = sorted(
        set(zip(val["fold"].astype(str), val["patient_id"].astype(str), strict=True))
        & set(zip(test["fold"].astype(str), test["patient_id"].astype(str), strict=True))
    )
    if shared:
        fold, patient = shared[0]
        raise UserError(
            f"{val_path}: fold {fold}'s validation rows include patient {patient!r}, a test patient of that fold in "
            f"{pred_path.name} ({len(shared)} such fold/patient pairs), so thresholds would be tuned on test lesions: "
            f"it is not this run's file; re-run `liverlesion cv`, or delete it (threshold 0.5 then)"
        )


def same_lesions(
    bdf: pd.DataFrame, net: pd.DataFrame, bpath: Path, pred_path: Path, run_dir: Path
) -> pd.DataFrame:
    """A baseline's rows for the lesions the network's metrics cover, refusing a baseline of other lesions.

    Scoring a baseline on whatever part of its lesions the run shares would compare two methods on
    different patients (or on none: an empty table).

    Args:
        bdf: The baseline's predictions.
        net: The network's classified predictions (the lesions the metrics cover).
        bpath: The baseline's predictions.csv, for messages.
        pred_path: The network's predictions.csv, for messages.
        run_dir: The run folder, for the suggested command.

    Raises:
        UserError: Lesions of the network missing from the baseline, or a lesion with another
            patient or true class there.
    """
    ids = bdf["lesion_id"].astype(str)
    want = net["lesion_id"].astype(str)
    fix = (
        f"re-run `liverlesion baselines MANIFEST -o {run_dir}` with the manifest of this run, "
        f"or delete {bpath.parent}"
    )
    missing = want[~want.isin(set(ids))]
    if len(missing) == len(want):
        raise UserError(
            f"{bpath}: none of its {len(bdf)} lesions is in {pred_path.name} (its ids e.g. {ids.iloc[0]!r}, "
            f"{pred_path.name}'s e.g. {want.iloc[0]!r}): these baselines were run on another cohort; {fix}"
        )
    if len(missing):
        raise UserError(
            f"{bpath}: lacks {len(missing)} of the {len(want)} lesions of {pred_path.name} "
            f"(e.g. {', '.join(repr(x) for x in missing.iloc[:3])}): it was run on other lesions; {fix}"
        )
    bdf = bdf[ids.isin(set(want))].reset_index(drop=True)
    merged = (
        net[["lesion_id", "patient_id", "true_class"]]
        .astype(str)
        .merge(
            bdf[["lesion_id", "patient_id", "true_class"]].astype(str), on="lesion_id", suffixes=("", "_b")
        )
    )
    for col in ("patient_id", "true_class"):
        wrong = merged[merged[col] != merged[f"{col}_b"]]
        if len(wrong):
            r = wrong.iloc[0]
            raise UserError(
                f"{bpath}: lesion {r['lesion_id']!r} has {col} {r[col + '_b']!r} there but {r[col]!r} in "
                f"{pred_path.name} ({len(wrong)} lesion(s) differ): it was run on another cohort; {fix}"
            )
    return bdf


def draw_gradcam_gallery(run_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Draw ``plots/gradcam_gallery.png`` with the fold models (the report only shows the file).

    The gallery is an illustration: when it cannot be drawn (no fold models, no patch cache,
    no torch), a warning goes to stderr and the reason is returned for the report's notes;
    ``metrics.json`` and the rest of the report stay valid.

    Args:
        run_dir: Evaluated run folder.
        metrics: Its ``metrics.json`` content.

    Returns:
        ``{"path": Path | None, "notes": [str]}``.
    """
    run_dir = Path(run_dir)
    net, classes = metrics["network"], metrics["class_names"]
    try:
        patch_dir = runs.run_patch_dir(run_dir, metrics)
        if patch_dir is None:
            raise UserError(f"{runs.run_info_path(run_dir)}: no patch_dir recorded; cannot find the patches")
        df, _ = read_predictions(runs.predictions_path(run_dir), classes)
        shown = apply_thresholds(
            classified_rows(df)[0], classes, metrics["positive_class"], net["threshold"]["per_fold"]
        )
        path = gradcam_gallery(
            run_dir,
            shown,
            patch_dir,
            int(metrics["settings"]["gradcam_max"]),
            runs.gradcam_gallery_path(run_dir),
        )
        return {"path": path, "notes": []}
    except (UserError, ImportError, OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"liverlesion evaluate: warning: Grad-CAM gallery not drawn: {e}", file=sys.stderr)
        return {"path": None, "notes": [f"Grad-CAM gallery not drawn: {e}"]}
