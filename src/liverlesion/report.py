"""``report.html``: a self-contained report drawn from the run folder's files.

Everything here reads ``metrics.json``, the predictions CSVs and the PNGs that
:mod:`liverlesion.plots` (and ``evaluate``, for the Grad-CAM gallery) drew, never a model,
so ``liverlesion report RUN`` redraws the report without recomputing anything. The HTML
embeds its PNGs as base64 data URIs and its CSS inline: it opens offline, with no scripts
but the table sorter and no network access.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from liverlesion import DISCLAIMER, runs
from liverlesion import report_tables as H
from liverlesion.domain import format_domain
from liverlesion.errors import UserError
from liverlesion.fileio import write_text
from liverlesion.metrics import SUMMARY_METRICS, metric_label
from liverlesion.plots import make_plots
from liverlesion.summary import (
    fmt_ci,
    format_comparison,
    network_half_line,
    side_by_side_rows,
    undefined_note,
)

PAPER_CONTEXT = (
    "Romero et al. 2019 (InceptionV3 + FC512 / Dropout 0.4 / FC512 head) reported accuracy 0.96 and F1 0.92 "
    "for colorectal liver metastasis vs benign cyst on a private set of 230 lesions (63 patients). "
    "Shown as context only: different data, protocol and split; not comparable with the numbers above."
)
KNOWN_LIMITS = (
    "Trained and evaluated on synthetic or single-centre data; performance on other centres is unknown.",
    "No external validation: all numbers are cross-validated on one cohort.",
    "Small lesions (< 10 mm) are few and hard to characterise on CT; see the size breakdown.",
    "CT protocol matters: contrast phase, slice thickness, reconstruction kernel and scanner differ between "
    "sites and change lesion appearance.",
    "Lesions are given (mask or click); the model does not detect them, and it can only answer with the "
    "classes it was trained on (other lesion types such as {others} are forced into them).",
    "Probabilities are calibrated on inner-validation data of the same cohort only.",
)
#: Common focal liver lesions, named as examples of what a model not trained on them forces into its classes.
OTHER_LESION_TYPES = ("HCC", "haemangioma", "FNH", "abscess", "metastasis", "cyst")


def known_limits(class_names: list[str], external: bool) -> str:
    """The model card's known limits; the example lesion types are those the model was not trained on."""
    trained = {c.lower() for c in class_names}
    others = [t for t in OTHER_LESION_TYPES if t.lower() not in trained][:3]
    text = ", ".join(others[:-1]) + f" or {others[-1]}" if len(others) > 1 else "".join(others)
    return " ".join(
        k.format(others=text) for k in KNOWN_LIMITS if not (external and k.startswith("No external"))
    )


def build_html(run_dir: Path, metrics: dict[str, Any], plots: dict[str, Path], notes: list[str]) -> str:
    """The report as one HTML string (PNG data URIs, inline CSS, all text escaped)."""
    net = metrics["network"]
    run_info = runs.read_run_info(run_dir)
    cfg_path = runs.config_path(run_dir)
    cfg_text = (
        cfg_path.read_text(encoding="utf-8") if cfg_path.is_file() else "(no config.yaml in the run folder)"
    )
    s = metrics["settings"]
    external = metrics.get("validation") == "external"
    kind = "external validation" if external else "evaluation"
    out: list[str] = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>liverlesion report: {H.esc(run_dir.name)}</title><style>{H.CSS}</style></head><body>",
        f"<div class=banner>{H.esc(DISCLAIMER[:1].upper() + DISCLAIMER[1:])}</div>",
        f"<h1>liverlesion {kind}: {H.esc(run_dir.name)}</h1>",
        f"<p class=note>Created {H.esc(metrics.get('created', ''))} by liverlesion {H.esc(metrics.get('liverlesion_version'))}."
        f" {H.esc(metrics['n_lesions'])} lesions from {H.esc(metrics['n_patients'])} patients; classes "
        f"{H.esc(', '.join(metrics['class_names']))}; positive class <b>{H.esc(metrics['positive_class'])}</b>. "
        f"95% confidence intervals from {H.esc(s['n_bootstrap'])} patient-level bootstrap resamples "
        f"(all lesions of a drawn patient come along); intervals: {H.esc(s.get('ci_method', 'percentile'))}.</p>",
    ]
    # Summary
    out.append(
        "<h2>Summary (network on the external set)</h2>"
        if external
        else "<h2>Summary (network, pooled out-of-fold)</h2>"
    )
    keys = [k for k in SUMMARY_METRICS if k in net["metrics"]]
    out.append(
        H.table(["metric", "value [95% CI]"], [[metric_label(k), fmt_ci(net["metrics"][k])] for k in keys])
    )
    for n in metrics.get("notes", []) + notes:
        out.append(f"<p class=note>Note: {H.esc(n)}</p>")
    if external:
        out += external_html(metrics, H.esc)
    # Side by side
    out.append("<h2>Network and baselines, side by side</h2>")
    header, rows = side_by_side_rows(metrics)
    out.append(H.table(header, rows))
    if metrics.get("baselines"):
        cmp = metrics.get("comparison")
        out.append(f"<p>{H.esc(format_comparison(cmp))}</p>")
        if cmp and cmp.get("difference") is not None:
            out.append(
                f"<p class=note>Best baseline = {H.esc(cmp.get('selection', ''))}; same resampled patients for "
                f"both methods in every resample; {H.esc(cmp['n_undefined'])} resamples without both classes "
                f"skipped. {H.esc(cmp.get('note', ''))}</p>"
            )
        for name, b in metrics["baselines"].items():
            for n in b.get("notes", []):
                out.append(f"<p class=note>{H.esc(name)}: {H.esc(n)}</p>")
    else:
        out.append("<p class=note>No baselines/*/predictions.csv in the run folder.</p>")
    if net["task"] == "multiclass":
        out.append("<h2>Per class (one vs rest)</h2>")
        pc_keys = ("sensitivity", "specificity", "ppv", "f1", "roc_auc")
        out.append(
            H.table(
                ["class", "lesions", *map(metric_label, pc_keys)],
                [
                    [c, net["n_per_class"][c], *(fmt_ci(net["metrics"].get(f"{k}_{c}")) for k in pc_keys)]
                    for c in net["class_names"]
                ],
            )
        )
    # Per fold
    out.append("<h2>Per fold</h2>")
    out.append(H.table(*H.per_fold_rows(net)))
    if any("network_weight" in v for v in net["per_fold"].values()):
        out.append(
            "<p>Network weight: the fused model's weight on the network in its logits, set by "
            "<code>model.fusion_weight</code> or, with <code>auto</code>, chosen on each fold's training "
            "patients (0: the radiomics-style half alone, exactly the radiomics baselines: the mean of "
            "the LR's and the RF's probabilities with <code>model.fusion: radiomics_vote</code>, the LR's "
            "with <code>radiomics</code>; "
            "1: the network alone; README \u201cChoices where the paper is silent\u201d).</p>"
        )
    half = network_half_line(metrics)
    if half:
        out.append(
            f"<p>{H.esc(half)}: the network's own out-of-fold probabilities on the same lesions, "
            "whatever weight the fusion gave it, so the run shows what training the network added over "
            "the frozen ImageNet features.</p>"
        )
    out.append("<h2>Thresholds and temperatures</h2>")
    out.append(
        f"<p>Threshold method: <b>{H.esc(s['threshold_method'])}</b>; thresholds from "
        f"{H.esc(s['threshold_fitted_on'])}; never chosen on test data. Temperatures from "
        f"{H.esc(s['temperature_fitted_on'])}.</p>"
    )
    trows = []
    for f, t in net["threshold"]["per_fold"].items():
        temp = net["temperature"]["per_fold"].get(f, {})
        trows.append(
            [
                f,
                H.num(t["threshold"]),
                t["note"],
                H.num(temp.get("temperature"), 3),
                f"{H.num(temp.get('val_nll_before'))} → {H.num(temp.get('val_nll_after'))}",
                temp.get("note", ""),
            ]
        )
    out.append(
        H.table(
            ["fold", "threshold", "threshold note", "T", "val NLL before → after", "T note"],
            trows,
            text_cols=(2, 5),
        )
    )
    # Size
    out.append("<h2>By lesion size</h2>")
    size_header, size_body = H.size_rows(net)
    out.append(H.table(size_header, size_body, text_cols=(len(size_header) - 1,)))  # the note wraps
    undefined = undefined_note(net, s["n_bootstrap"])
    if undefined:
        out.append(f"<p class=note>{H.esc(undefined)}</p>")
    out.append(H.img(plots.get("size"), "Metrics per diameter bin with 95% CIs"))
    # Calibration
    out.append("<h2>Calibration</h2>")
    cal = net["calibration"]
    if cal.get("available"):
        out.append(
            f"<p class=note>{H.esc(cal['note'])}. ECE with {H.esc(cal['n_bins'])} equal-width bins on the "
            f"{H.esc(cal['target'])}.</p>"
        )
        out.append(
            H.table(
                ["", "Brier", "ECE", "NLL"],
                [
                    [
                        cal.get(f"label_{k}", k),
                        H.num(cal[k]["brier"]),
                        H.num(cal[k]["ece"]),
                        H.num(cal[k]["nll"]),
                    ]
                    for k in ("before", "after")
                    if k in cal
                ],
            )
        )
        out.append(H.img(plots.get("reliability"), "Reliability diagram before / after temperature scaling"))
        out.append(
            "<p class=note>With few lesions per bin the ECE is noisy and biased upwards, and more so in "
            "bootstrap resamples"
            + (
                ", so its interval is shifted down by the bootstrap's bias estimate to bracket the estimate; "
                "that does not correct the estimate itself, which stays biased upwards (a perfectly calibrated "
                "model reads about 0.07 on ~220 lesions in 10 bins, with an interval above 0): a small ECE whose "
                "interval excludes 0 is not evidence of miscalibration"
                if "ECE" in s.get("ci_method", "")
                else " (this run's interval is not corrected for it: it can lie above the estimate)"
            )
            + "; temperatures fitted on small inner-validation sets are unstable and may not improve "
            "calibration on the test folds.</p>"
        )
    else:
        out.append(f"<p class=note>{H.esc(cal.get('note', 'not available'))}</p>")
    # Plots
    out.append("<h2>Curves and confusion matrix</h2><div class=grid>")
    out.append(H.img(plots.get("roc"), "ROC curves; shaded: 95% patient-bootstrap band"))
    out.append(H.img(plots.get("pr"), "Precision-recall curves; shaded: 95% patient-bootstrap band"))
    out.append(H.img(plots.get("confusion"), "Confusion matrix (counts and row %)"))
    out.append("</div>")
    out.append("<h2>Grad-CAM gallery</h2>")
    if plots.get("gradcam"):
        out.append(
            f"<p class=note>Grad-CAM (pytorch-grad-cam) of each lesion's own fold model for the "
            f"{H.esc(s.get('gradcam_target', 'predicted class'))}, on the centre slice; misclassified lesions "
            "first. Heat maps show where the network looked, not why; they are not a segmentation.</p>"
        )
        out.append(H.img(plots.get("gradcam"), "Grad-CAM gallery"))
    else:
        out.append("<p class=note>Not drawn (see notes above).</p>")
    # Dataset
    out.append("<h2>Dataset</h2>")
    ds = metrics["dataset"]
    drows = []
    for c in metrics["class_names"]:
        d = ds.get("diameter_mm", {}).get(c)
        size = f"{d['median']:.1f} ({d['q1']:.1f}–{d['q3']:.1f})" if d else "n/a"
        drows.append([c, ds["n_per_class"].get(c, 0), size])
    out.append(f"<p>{H.esc(ds['n_patients'])} patients, {H.esc(ds['n_lesions'])} lesions.</p>")
    out.append(H.table(["class", "lesions", "max axial diameter, mm: median (IQR)"], drows))
    out.append(H.img(plots.get("dataset"), "Lesions per class and size histogram"))
    # Model card
    out.append("<h2>Model card</h2>")
    card = [
        [
            "Intended use",
            "Research on focal liver lesion classification on CT. Not for diagnosis, triage or any "
            "clinical decision.",
        ],
        *H.model_rows(
            cfg_path, str(run_info.get("backbone", metrics.get("run", {}).get("backbone", "unknown"))), net
        ),
        ["Initialisation", str(run_info.get("init", "unknown"))],
        [
            "External data" if external else "Training data",
            f"{ds['n_lesions']} lesions from {ds['n_patients']} patients ("
            + ", ".join(f"{c}: {n}" for c, n in ds["n_per_class"].items())
            + f"); manifest {run_info.get('manifest', 'unknown')}",
        ],
        [
            "Evaluation",
            "external validation: the checkpoints applied unchanged to a new labelled set"
            if external
            else f"{net['n_folds']}-fold patient-level cross-validation; thresholds and temperatures from "
            "each fold's inner-validation patients",
        ],
        ["Known limits", known_limits(list(metrics["class_names"]), external)],
        ["Published context", PAPER_CONTEXT],
    ]
    out.append(H.table(["", ""], card, num_from=99))
    # Config and versions
    out.append("<h2>Resolved configuration (config.yaml)</h2>")
    out.append(f"<pre>{H.esc(cfg_text)}</pre>")
    out.append("<h2>Library versions</h2>")
    out.append(
        H.table(
            ["package", "now (evaluate)", "at training (run.json)"], H.versions_rows(run_info), num_from=99
        )
    )
    # Lesions and patients, the run itself
    header, rows = H.patient_rows(run_dir)
    if rows:
        out.append("<h2>Per patient</h2>")
        out.append("<p class=note>Out-of-fold results; click a column header to sort.</p>")
        out.append(H.sortable(header, rows))
    header, rows = H.lesion_rows(run_dir, metrics["class_names"], metrics.get("positive_class"))
    if rows:
        out.append("<h2>Per lesion</h2>")
        out.append("<p class=note>Every lesion of predictions.csv; click a column header to sort.</p>")
        out.append(H.sortable(header, rows))
    out.append("<h2>Worst errors</h2>")
    if "worst_errors" in plots:
        out.append(
            "<p class=note>The misclassified lesions the model was most sure of, with their probabilities: "
            "start reading errors here.</p>"
        )
        out.append(H.img(plots["worst_errors"], "most confident out-of-fold errors"))
    else:
        out.append("<p class=note>No gallery: no misclassified lesion, or no patch cache to draw from.</p>")
    if "losses" in plots:
        out.append("<h2>Loss curves</h2>")
        out.append(H.img(plots["losses"], "training and inner-validation loss per epoch, per fold and stage"))
    out.append("<h2>Run time and hardware</h2>")
    hw = run_info.get("hardware") or {}
    run_rows = [
        [
            "training time (all folds)",
            f"{run_info['train_seconds']:.0f} s" if "train_seconds" in run_info else "n/a",
        ],
        ["CPU", str(hw.get("cpu", "n/a"))],
        ["CPU cores", str(hw.get("cores", "n/a"))],
        ["CPU threads (torch)", str(hw.get("threads", "n/a"))],
        ["GPU", str(hw.get("gpu") or "none")],
    ]
    out.append(H.table(["", ""], run_rows, num_from=99))
    out.append(f"<p class=note>{H.esc(DISCLAIMER)}</p>{H.SORT_JS}</body></html>")
    return "\n".join(x for x in H.add_toc(out) if x)


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run_dir/metrics.json`` (written by ``evaluate``)."""
    path = runs.metrics_path(run_dir)
    if not path.is_file():
        raise UserError(f"{path}: not found; run `liverlesion evaluate {run_dir}` first")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError: not UTF-8 text at all
        raise UserError(f"{path}: not valid JSON ({e}); re-run `liverlesion evaluate {run_dir}`") from e
    missing = [k for k in _METRICS_KEYS if not isinstance(metrics, dict) or k not in metrics]
    if missing or not isinstance(metrics["network"], dict) or not isinstance(metrics["settings"], dict):
        raise UserError(
            f"{path}: not a metrics.json written by `liverlesion evaluate` "
            f"({'no ' + ', '.join(missing) if missing else 'network or settings is not an object'}); "
            f"re-run `liverlesion evaluate {run_dir}`"
        )
    # Sections cut out or retyped (an edited or partly merged file): named here, not a KeyError later.
    net = metrics["network"]
    damaged = [
        where
        for where, value, kind in (
            ("dataset", metrics.get("dataset"), dict),
            ("class_names", metrics["class_names"] if _names(metrics["class_names"]) else None, list),
            *((f"network.{k}", net.get(k), t) for k, t in _NETWORK_KEYS),
            ("network.threshold.per_fold", (net.get("threshold") or {}).get("per_fold"), dict),
            ("network.temperature.per_fold", (net.get("temperature") or {}).get("per_fold"), dict),
        )
        if not isinstance(value, kind)
    ]
    if damaged:
        raise UserError(
            f"{path}: {', '.join(damaged)} missing or of the wrong type (the file was edited or is from "
            f"another tool); re-run `liverlesion evaluate {run_dir}`"
        )
    return metrics


def check_same_predictions(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Refuse to draw a report from a ``predictions.csv`` other than the one ``metrics.json`` was computed
    from (e.g. copied in from another run): its curves and tables would contradict the metrics beside them.

    The lesions the metrics cover and their patients are counted again, as ``evaluate`` counted them.
    """
    path = runs.predictions_path(run_dir)
    dataset = metrics.get("dataset") or {}
    if not path.is_file() or "n_lesions" not in dataset or "n_patients" not in dataset:
        return  # the plots name a missing file; an old metrics.json has nothing to compare
    from liverlesion.predictions import classified_rows, read_predictions_table  # local: pandas

    df = classified_rows(read_predictions_table(path))[0]
    have = (len(df), int(df["patient_id"].astype(str).nunique()))
    want = (dataset["n_lesions"], dataset["n_patients"])
    if have != want:
        raise UserError(
            f"{path}: {have[0]} classified lesions of {have[1]} patients, but {runs.metrics_path(run_dir).name} was "
            f"computed from {want[0]} of {want[1]}: the predictions changed since `liverlesion evaluate`; re-run "
            f"`liverlesion evaluate {run_dir}`"
        )


def _names(value: Any) -> bool:
    """A list of at least two class names."""
    return isinstance(value, list) and len(value) >= 2 and all(isinstance(c, str) for c in value)


# What the report reads from metrics.json before anything else.
_METRICS_KEYS = ("network", "settings", "class_names", "positive_class", "n_lesions", "n_patients")
_NETWORK_KEYS = (
    ("metrics", dict),
    ("per_fold", dict),
    ("threshold", dict),
    ("temperature", dict),
    ("calibration", dict),
    ("confusion_matrix", dict),
    ("size", list),
    ("task", str),
)


def render_report(
    run_dir: str | Path, metrics: dict[str, Any] | None = None, gradcam: dict[str, Any] | None = None
) -> Path:
    """Draw the plots and write ``run_dir/report.html`` from ``metrics.json`` and the predictions.

    Args:
        run_dir: Evaluated run folder.
        metrics: ``metrics.json`` content, if already in memory.
        gradcam: What ``evaluate`` just did with the Grad-CAM gallery (see
            :func:`liverlesion.plots.make_plots`); None: an earlier gallery is shown if present.

    Returns:
        Path of ``report.html``.
    """
    run_dir = Path(run_dir)
    if metrics is not None:  # evaluate's own, just computed: a failure here is our bug, not the user's
        drawn = make_plots(run_dir, metrics, gradcam=gradcam)
        return write_text(
            runs.report_path(run_dir), build_html(run_dir, metrics, drawn["plots"], drawn["notes"])
        )
    runs.check_run_slots(run_dir)
    metrics = load_metrics(run_dir)
    check_same_predictions(run_dir, metrics)
    try:
        drawn = make_plots(run_dir, metrics, gradcam=gradcam)
        html = build_html(run_dir, metrics, drawn["plots"], drawn["notes"])
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        # A value deeper in metrics.json damaged beyond what load_metrics checks (a number
        # replaced by text, a list cut short): name the file, not the line of report code.
        raise UserError(
            f"{runs.metrics_path(run_dir)}: a value is missing or of the wrong type ({type(e).__name__}: "
            f"{str(e)[:80]}); the file was edited or is damaged: re-run `liverlesion evaluate {run_dir}`"
        ) from e
    return write_text(runs.report_path(run_dir), html)


def external_html(metrics: dict[str, Any], esc) -> list[str]:
    """The report's "External validation" section (HTML parts; ``esc`` escapes text)."""
    ext = metrics["external"]
    dom = ext.get("domain_check") or {}
    parts = [
        "<h2>External validation</h2>",
        "<p><b>External validation</b>: trained models applied unchanged to a new labelled set with "
        "<code>liverlesion predict</code>; thresholds and temperatures come from the checkpoints, nothing was "
        f"tuned on these lesions. Manifest: {esc(ext.get('manifest') or 'unknown')}.</p>",
    ]
    models = ext.get("models") or [{"sha256": h} for h in ext["checkpoint_sha256"]]
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{esc(m.get(k) or '')}</td>" for k in ("path", "sha256", "fold", "backbone", "created")
        )
        + "</tr>"
        for m in models
    )
    parts.append(
        "<table><tr><th>model</th><th>checkpoint sha256 (12)</th><th>fold</th><th>backbone</th>"
        f"<th>created</th></tr>{rows}</table>"
    )
    parts.append(f"<p class=note>Decision rule: {esc(ext.get('decision_rule') or 'n/a')}.</p>")
    parts.append("<h3>Domain shift</h3>")
    status = dom.get("status", "not recorded")
    if status in ("shift", "in range", "no training range stored"):
        for line in format_domain(dom):
            cls = "banner" if status == "shift" and line.startswith("warning") else "note"
            parts.append(f"<p class={cls}>{esc(line.strip())}</p>")
    else:
        parts.append("<p class=note>predict recorded no domain check (older liverlesion).</p>")
    if dom.get("checks"):
        trows = "".join(
            f"<tr><td>{esc(c['label'])}</td><td class=num>{c['train_low']:.4g} to {c['train_high']:.4g}</td>"
            f"<td class=num>{c['median']:.4g}</td><td class=num>{c['n_below'] + c['n_above']} / {c['n']}</td>"
            f"<td>{'outside' if c['flagged'] else 'ok'}</td></tr>"
            for c in dom["checks"]
        )
        parts.append(
            "<table><tr><th>statistic</th><th>training range</th><th>median here</th><th>lesions outside</th>"
            f"<th></th></tr>{trows}</table>"
        )
        parts.append(f"<p class=note>{esc(dom.get('rule', ''))}.</p>")
    return parts
