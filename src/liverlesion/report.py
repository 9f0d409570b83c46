"""Plots (PNG) and a self-contained ``report.html``, drawn from the run folder's files.

Everything here reads ``metrics.json`` and the predictions CSVs, never a model in memory,
so ``liverlesion evaluate RUN`` can redraw the report without retraining. The HTML embeds
its PNGs as base64 data URIs and its CSS inline: it opens offline, with no scripts and
no network access.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, __version__
from liverlesion.errors import UserError
from liverlesion.evaluate import (
    SUMMARY_METRICS,
    apply_thresholds,
    classified_rows,
    fmt_ci,
    format_comparison,
    metric_label,
    read_predictions,
    side_by_side_rows,
)
from liverlesion.fileio import atomic_path, write_text

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
    "classes it was trained on (other lesion types such as HCC, haemangioma or FNH are forced into them).",
    "Probabilities are calibrated on inner-validation data of the same cohort only.",
)
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


# --------------------------------------------------------------------------- plots
def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _save(fig: Any, out: Path, dpi: int = 110) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out


def _methods(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"network": metrics["network"], **metrics.get("baselines", {})}


def plot_roc(metrics: dict[str, Any], out: Path) -> Path:
    """ROC curves of the positive class with 95% bootstrap bands, network and baselines."""
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    for i, (name, s) in enumerate(_methods(metrics).items()):
        cur = s.get("curves", {})
        if "roc" not in cur:
            continue
        col, main = _COLORS[i % len(_COLORS)], name == "network"
        roc = cur["roc"]
        ax.plot(
            roc["fpr"],
            roc["tpr"],
            color=col,
            lw=2.2 if main else 1.2,
            label=f"{name}: AUC {fmt_ci(s['metrics'].get('roc_auc'))}",
        )
        if "band_low" in roc:
            ax.fill_between(
                cur["grid"],
                roc["band_low"],
                roc["band_high"],
                color=col,
                alpha=0.2 if main else 0.07,
                step="post",
                lw=0,
            )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="1 − specificity (false-positive rate)",
        ylabel="sensitivity (true-positive rate)",
        title=f"ROC, positive class {metrics['positive_class']!r}",
    )
    ax.legend(loc="lower right", fontsize=7)
    ax.text(0.99, 0.01, DISCLAIMER, transform=ax.transAxes, fontsize=6, ha="right", va="bottom", color="grey")
    return _save(fig, out)


def plot_pr(metrics: dict[str, Any], out: Path) -> Path:
    """Precision-recall curves with 95% bootstrap bands (interpolated precision)."""
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    prevalence = None
    for i, (name, s) in enumerate(_methods(metrics).items()):
        cur = s.get("curves", {})
        if "pr" not in cur:
            continue
        col, main = _COLORS[i % len(_COLORS)], name == "network"
        pr = cur["pr"]
        prevalence = pr.get("prevalence", prevalence)
        ax.plot(
            pr["recall"],
            pr["precision"],
            color=col,
            lw=2.2 if main else 1.2,
            drawstyle="steps-post",
            label=f"{name}: AP {fmt_ci(s['metrics'].get('pr_auc'))}",
        )
        if "band_low" in pr:
            ax.fill_between(
                cur["grid"], pr["band_low"], pr["band_high"], color=col, alpha=0.2 if main else 0.07, lw=0
            )
    if prevalence is not None:
        ax.axhline(prevalence, ls=":", color="grey", lw=1, label=f"prevalence {prevalence:.2f}")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title=f"Precision-recall, positive class {metrics['positive_class']!r}",
    )
    ax.legend(loc="lower left", fontsize=7)
    return _save(fig, out)


def plot_confusion(summary: dict[str, Any], out: Path) -> Path:
    """Confusion matrix: counts and row percentages (true class rows)."""
    cm = np.array(summary["confusion_matrix"]["counts"], dtype=float)
    labels = summary["confusion_matrix"]["labels"]
    rows = cm.sum(1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(labels)
    fig = _figure(1.4 * k + 2.2, 1.2 * k + 1.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(pct, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n({100 * pct[i, j]:.0f}%)",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if pct[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), labels, rotation=30, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (pooled, per-fold thresholds)")
    return _save(fig, out)


def plot_reliability(summary: dict[str, Any], out: Path) -> Path:
    """Reliability diagram before/after temperature scaling, with bin counts underneath."""
    cal = summary["calibration"]
    fig = _figure(5.2, 5.4)
    gs = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    ax, axc = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect calibration")
    n_bins = cal["n_bins"]
    width = 1.0 / n_bins
    shown = [
        (k, cal.get(f"label_{k}", label), marker)
        for k, label, marker in (("before", "before", "o"), ("after", "after temperature scaling", "s"))
        if k in cal
    ]
    for j, (key, label, marker) in enumerate(shown):
        bins = cal[key]["bins"]
        xs = [b["mean_predicted"] for b in bins if b["count"]]
        ys = [b["observed"] for b in bins if b["count"]]
        ax.plot(xs, ys, marker=marker, color=_COLORS[j], label=f"{label} (ECE {cal[key]['ece']:.3f})")
        centres = np.array([(b["lower"] + b["upper"]) / 2 for b in bins])
        axc.bar(
            centres + (j - 0.5) * width / 2, [b["count"] for b in bins], width=width / 2, color=_COLORS[j]
        )
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed frequency", title=f"Reliability: {cal['target']}")
    ax.legend(fontsize=7, loc="upper left")
    axc.set(xlim=(0, 1), xlabel="predicted probability", ylabel="lesions per bin")
    return _save(fig, out)


def _size_metric_keys(summary: dict[str, Any]) -> list[str]:
    if summary["task"] == "binary":
        return ["sensitivity", "specificity", "accuracy", "roc_auc"]
    return ["accuracy"] + [f"sensitivity_{c}" for c in summary["class_names"]]


def plot_size(summary: dict[str, Any], out: Path) -> Path:
    """Size-stratified bar chart (metrics per diameter bin) with 95% CIs where available."""
    strata = [s for s in summary["size"] if s.get("n_lesions")]
    keys = _size_metric_keys(summary)
    fig = _figure(max(5.0, 1.6 * len(strata) + 2.5), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        xs, vals, lo, hi = [], [], [], []
        for i, s in enumerate(strata):
            e = s["metrics"].get(k, {})
            v = e.get("value")
            if v is None or not np.isfinite(v):
                continue
            xs.append(i + (j - (len(keys) - 1) / 2) * width)
            vals.append(v)
            lo.append(v - e["ci_low"] if e.get("ci_low") is not None else 0.0)
            hi.append(e["ci_high"] - v if e.get("ci_high") is not None else 0.0)
        ax.bar(
            xs,
            vals,
            width=width,
            color=_COLORS[j % len(_COLORS)],
            label=metric_label(k),
            yerr=[lo, hi] if xs else None,
            capsize=2,
            error_kw={"lw": 0.8},
        )
    ax.set_xticks(range(len(strata)), [f"{s['bin']}\n(n={s['n_lesions']})" for s in strata])
    ax.set(
        ylim=(0, 1.05),
        ylabel="value",
        xlabel="maximal axial diameter",
        title="Performance by lesion size (95% patient-bootstrap CIs where n allows)",
    )
    # beside the axes, never over the bars
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, out)


def plot_dataset(df: pd.DataFrame, classes: list[str], out: Path) -> Path:
    """Dataset summary: lesions (and patients) per class, diameter histogram by class."""
    fig = _figure(9.0, 3.8)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    n_les = [int((df["true_class"] == c).sum()) for c in classes]
    n_pat = [int(df.loc[df["true_class"] == c, "patient_id"].nunique()) for c in classes]
    x = np.arange(len(classes))
    ax1.bar(x - 0.2, n_les, width=0.4, color=_COLORS[0], label="lesions")
    ax1.bar(x + 0.2, n_pat, width=0.4, color=_COLORS[1], label="patients with this class")
    for xi, n in zip(x, n_les, strict=True):
        ax1.text(xi - 0.2, n, str(n), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, classes)
    ax1.set(
        title=f"{len(df)} lesions, {df['patient_id'].nunique()} patients",
        ylabel="count",
        ylim=(0, 1.3 * max(n_les + [1])),
    )
    ax1.legend(fontsize=7, loc="upper center", ncol=2)
    diam = pd.to_numeric(df.get("max_axial_diameter_mm", pd.Series(np.nan, index=df.index)), errors="coerce")
    if diam.notna().any():
        edges = np.histogram_bin_edges(diam.dropna(), bins=min(20, max(5, int(diam.notna().sum() ** 0.5))))
        for i, c in enumerate(classes):
            d = diam[df["true_class"] == c].dropna()
            if len(d):
                ax2.hist(d, bins=edges, histtype="step", lw=1.8, color=_COLORS[i % len(_COLORS)], label=c)
        for t in (10, 20):
            ax2.axvline(t, ls=":", color="grey", lw=1)
        ax2.set(xlabel="maximal axial diameter (mm)", ylabel="lesions", title="Lesion size by class")
        ax2.legend(fontsize=7)
    else:
        ax2.text(
            0.5, 0.5, "no max_axial_diameter_mm column", ha="center", va="center", transform=ax2.transAxes
        )
        ax2.set_axis_off()
    return _save(fig, out)


def _patch_dir(run_dir: Path, metrics: dict[str, Any]) -> Path | None:
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    p = info.get("patch_dir") or metrics.get("run", {}).get("patch_dir")
    if not p:
        return None
    p = Path(p)
    if not p.is_absolute():
        p = run_dir / p
    if not p.is_dir():  # the run folder was moved: look for the cache inside it
        moved = run_dir / "patches" / p.name
        p = moved if moved.is_dir() else p
    return p


def _loss_logs(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Per fold and training stage, Lightning's CSV log (``fold_K/logs/csv*/metrics.csv``)."""
    logs = {}
    order = {"probe": 0, "train": 1, "finetune": 2}  # the order the stages ran in
    found = sorted(
        run_dir.glob("fold_*/logs/csv*/metrics.csv"),
        key=lambda f: (
            f.parents[2].name,
            order.get(f.parent.name.removeprefix("csv").strip("_") or "train", 3),
        ),
    )
    for f in found:
        stage = f.parent.name.removeprefix("csv").strip("_") or "train"
        try:
            logs[f"{f.parents[2].name} {stage}"] = pd.read_csv(f)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError):
            continue
    return logs


def plot_losses(run_dir: Path, out: Path) -> Path | None:
    """Training and inner-validation loss per epoch, one panel per fold and stage (None without logs)."""
    logs = {k: v for k, v in _loss_logs(run_dir).items() if "epoch" in v}
    if not logs:
        return None
    n = len(logs)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = _figure(3.2 * cols, 2.4 * rows)
    for i, (name, df) in enumerate(logs.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for col, style in (("train_loss", "-"), ("val_loss", "--")):
            if col in df:
                d = df.dropna(subset=[col]).groupby("epoch")[col].last()
                if len(d):
                    ax.plot(d.index + 1, d.to_numpy(), style, label=col.replace("_", " "))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Loss curves (inner validation: the patients early stopping watched)", fontsize=10)
    return _save(fig, out)


def plot_worst_errors(
    df: pd.DataFrame, classes: list[str], patch_dir: Path | None, out: Path, n: int = 12
) -> Path | None:
    """The most confident mistakes: each lesion's centre slice, mask outline, truth and probabilities.

    None when there are no mistakes among the classified lesions or no patch cache to draw from.
    """
    from liverlesion.patches import load_patch, load_patch_index

    if patch_dir is None or not (Path(patch_dir) / "index.csv").is_file():
        return None
    d = df[df["pred_class"].isin(classes) & (df["pred_class"] != df["true_class"])].copy()
    if d.empty:
        return None
    d["p_wrong"] = [float(r[f"prob_{r['pred_class']}"]) for _, r in d.iterrows()]
    d = d.sort_values("p_wrong", ascending=False).head(n)
    index = load_patch_index(patch_dir).set_index("lesion_id")
    shown = [r for _, r in d.iterrows() if str(r["lesion_id"]) in index.index]
    if not shown:
        return None
    cols = min(len(shown), 6)
    rows = (len(shown) + cols - 1) // cols
    fig = _figure(2.1 * cols, 2.5 * rows)
    for i, r in enumerate(shown):
        patch = load_patch(patch_dir, index.loc[str(r["lesion_id"])])
        img, mask = patch["image"], patch["mask"]
        s = img.shape[0] // 2
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(img[s, img.shape[1] // 2], cmap="gray", vmin=0, vmax=1)
        if mask[s].any():
            ax.contour(mask[s] > 0, levels=[0.5], colors=["#ff7f0e"], linewidths=0.8)
        probs = "\n".join(f"P({c}) {float(r[f'prob_{c}']):.2f}" for c in classes)
        ax.set_title(
            f"{r['lesion_id']}\ntrue {r['true_class']}, called {r['pred_class']}\n{probs}", fontsize=6.5
        )
        ax.axis("off")
    fig.suptitle("Most confident errors (out-of-fold)", fontsize=10)
    return _save(fig, out)


def make_plots(
    run_dir: str | Path, metrics: dict[str, Any] | None = None, gradcam: bool = True
) -> dict[str, Any]:
    """Draw every PNG into ``run_dir/plots`` from the files on disk.

    Args:
        run_dir: Run folder holding ``metrics.json`` and ``predictions.csv``.
        metrics: Already-loaded ``metrics.json`` content (read from disk if None).
        gradcam: Also draw the Grad-CAM gallery (needs fold models and the patch cache).

    Returns:
        ``{"plots": {name: Path}, "notes": [str]}``.
    """
    run_dir = Path(run_dir)
    metrics = metrics if metrics is not None else load_metrics(run_dir)
    plots_dir = run_dir / "plots"
    net = metrics["network"]
    classes = metrics["class_names"]
    df, _ = read_predictions(run_dir / "predictions.csv", classes)
    plots: dict[str, Path] = {}
    notes: list[str] = []
    if "roc" in net.get("curves", {}):
        plots["roc"] = plot_roc(metrics, plots_dir / "roc.png")
        plots["pr"] = plot_pr(metrics, plots_dir / "pr.png")
    plots["confusion"] = plot_confusion(net, plots_dir / "confusion_matrix.png")
    if net["calibration"].get("available"):
        plots["reliability"] = plot_reliability(net, plots_dir / "reliability.png")
    if any(s.get("n_lesions") for s in net["size"]) and any(s["bin"] != "unknown" for s in net["size"]):
        plots["size"] = plot_size(net, plots_dir / "size_breakdown.png")
    plots["dataset"] = plot_dataset(df, classes, plots_dir / "dataset.png")

    gallery = plots_dir / "gradcam_gallery.png"
    if gradcam:
        patch_dir = _patch_dir(run_dir, metrics)
        try:
            if patch_dir is None:
                raise UserError(f"{run_dir / 'run.json'}: no patch_dir recorded; cannot find the patches")
            from liverlesion.gradcam import gradcam_gallery

            shown = apply_thresholds(
                classified_rows(df)[0], classes, metrics["positive_class"], net["threshold"]["per_fold"]
            )
            plots["gradcam"] = gradcam_gallery(
                run_dir, shown, patch_dir, int(metrics["settings"]["gradcam_max"]), gallery
            )
        except (UserError, ImportError, OSError, ValueError, KeyError, RuntimeError) as e:
            # The gallery is an illustration; metrics.json and the rest of the report stay valid.
            notes.append(f"Grad-CAM gallery not drawn: {e}")
            print(f"liverlesion evaluate: warning: Grad-CAM gallery not drawn: {e}", file=sys.stderr)
    elif gallery.is_file():
        plots["gradcam"] = gallery
        notes.append(
            "Grad-CAM gallery from an earlier run of `liverlesion evaluate` (not redrawn: --no-gradcam)"
        )
    worst = plot_worst_errors(df, classes, _patch_dir(run_dir, metrics), plots_dir / "worst_errors.png")
    if worst is not None:
        plots["worst_errors"] = worst
    losses = plot_losses(run_dir, plots_dir / "losses.png")
    if losses is not None:
        plots["losses"] = losses
    return {"plots": plots, "notes": notes}


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1100px;padding:0 1.2em 3em;
color:#222;line-height:1.4}
.banner{background:#b00020;color:#fff;font-weight:bold;padding:.6em 1em;margin:0 -1.2em 1em;font-size:1.1em}
h1{margin:.3em 0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.note{color:#555;font-size:.9em}.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{margin:0;flex:1 1 420px}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
figcaption{font-size:.85em;color:#555}
.toc{columns:2;font-size:.9em}.toc a{color:#1a4f8b}th.sort{cursor:pointer}th.sort:after{content:" \\2195";color:#999}
.scroll{max-height:480px;overflow-y:auto}
"""

# sorts a table when a header with class "sort" is clicked (numbers as numbers); no dependencies
_SORT_JS = """<script>
document.querySelectorAll("table.sortable").forEach(function(t){
  t.querySelectorAll("th").forEach(function(th,i){th.classList.add("sort");th.addEventListener("click",function(){
    var b=t.tBodies[0],r=Array.from(b.rows),d=th.dataset.dir==="asc"?-1:1;th.dataset.dir=d>0?"asc":"desc";
    r.sort(function(x,y){var a=x.cells[i].textContent,c=y.cells[i].textContent,p=parseFloat(a),q=parseFloat(c);
      return (isNaN(p)||isNaN(q)?a.localeCompare(c):p-q)*d;});r.forEach(function(e){b.appendChild(e);});});});});
</script>"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(header: list[Any], rows: list[list[Any]], num_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i >= num_from else ''}>{_e(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    if not any(str(h) for h in header):  # a key-value table: no empty header row
        return f"<table><tbody>{body}</tbody></table>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path | None, caption: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _versions(run_info: dict[str, Any]) -> list[list[str]]:
    from liverlesion.versions import library_versions

    rows = [["liverlesion", __version__, str(run_info.get("liverlesion_version", ""))]]
    trained = run_info.get("versions", {}) or {}
    for pkg, v in library_versions().items():
        rows.append([pkg, v, str(trained.get(pkg, trained.get(pkg.lower(), "")))])
    return rows


def _per_fold_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = [
        k
        for k in ("accuracy", "sensitivity", "specificity", "roc_auc", "macro_f1")
        if k in summary["metrics"]
    ]
    header = ["fold", "patients", "lesions", "threshold", "temperature", *map(metric_label, keys)]
    rows = []
    for f, v in summary["per_fold"].items():
        rows.append(
            [
                f,
                v["n_patients"],
                v["n_lesions"],
                _num(v["threshold"]),
                _num(v["temperature"], 2),
                *(fmt_ci(v["metrics"].get(k)) for k in keys),
            ]
        )
    fm = summary["fold_mean"]
    rows.append(
        [
            "mean ± SD",
            "",
            "",
            "",
            "",
            *(
                f"{fm[k]['mean']:.2f} ± {fm[k]['sd']:.2f}"
                if fm[k]["mean"] is not None and fm[k]["sd"] is not None
                else _num(fm[k]["mean"], 2)
                for k in keys
            ),
        ]
    )
    return header, rows


def _size_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = _size_metric_keys(summary)
    classes = summary["class_names"]
    header = [
        "diameter",
        "lesions",
        "patients",
        *(f"n {c}" for c in classes),
        *map(metric_label, keys),
        "note",
    ]
    rows = []
    for s in summary["size"]:
        m = s.get("metrics", {})
        counts = s.get("n_per_class", {})
        rows.append(
            [
                s["bin"],
                s["n_lesions"],
                s.get("n_patients", 0),
                *(counts.get(c, 0) for c in classes),
                *(fmt_ci(m.get(k)) for k in keys),
                s.get("note", ""),
            ]
        )
    return header, rows


def _lesion_rows(
    run_dir: Path, classes: list[str], positive: str | None
) -> tuple[list[str], list[list[str]]]:
    """The per-lesion table: truth, prediction, P(positive), status, fold, size."""
    path = run_dir / "predictions.csv"
    if not path.is_file():
        return [], []
    df = pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str})
    pcol = f"prob_{positive}" if positive and f"prob_{positive}" in df else None
    cols = ["lesion_id", "patient_id", "true_class", "pred_class", "status", "fold"]
    cols = [c for c in cols if c in df]
    extra = [c for c in ("max_axial_diameter_mm", "hu_mean") if c in df]
    header = cols[:2] + ["truth", "prediction"] + cols[4:] + ([f"P({positive})"] if pcol else []) + extra
    rows = []
    for _, r in df.iterrows():
        row = [str(r[c]) for c in cols]
        if pcol:
            row.append(_num(r[pcol]))
        row += [_num(r[c], 1) for c in extra]
        rows.append(row)
    return header, rows


def _patient_rows(run_dir: Path) -> tuple[list[str], list[list[str]]]:
    """Per patient: lesions, how many classified, how many right."""
    path = run_dir / "predictions.csv"
    if not path.is_file():
        return [], []
    df = pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str})
    if "status" in df:
        classified = df["status"].astype(str) == "classified"
    else:
        classified = pd.Series(True, index=df.index)
    rows = []
    for pid, g in df.groupby("patient_id", sort=True):
        c = classified[g.index]
        right = int((g.loc[c, "pred_class"] == g.loc[c, "true_class"]).sum())
        truth = ", ".join(f"{k} {v}" for k, v in g["true_class"].value_counts().sort_index().items())
        rows.append([str(pid), str(g["fold"].iloc[0]) if "fold" in g else "", truth, str(len(g)),
                     str(int(c.sum())), str(right), _num(right / c.sum(), 2) if c.sum() else "n/a"])  # fmt: skip
    return ["patient", "fold", "lesions (truth)", "lesions", "classified", "right", "accuracy"], rows


def _sortable(header: list[str], rows: list[list[str]]) -> str:
    """A table the reader can sort by clicking a column header."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<div class=scroll><table class=sortable><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _add_toc(parts: list[str]) -> list[str]:
    """Give every h2 an id and put a table of contents after the first paragraph."""
    import re

    toc, done = [], []
    for p in parts:
        m = re.match(r"<h2>(.*?)</h2>", p, re.S)
        if m:
            anchor = f"s{len(toc) + 1}"
            toc.append(f'<li><a href="#{anchor}">{m.group(1)}</a></li>')
            p = f'<h2 id="{anchor}">{m.group(1)}</h2>' + p[m.end() :]
        done.append(p)
    at = next((i for i, p in enumerate(done) if p.startswith("<p class=note>")), 4) + 1
    return done[:at] + ["<nav><b>Contents</b><ul class=toc>" + "".join(toc) + "</ul></nav>"] + done[at:]


def build_html(run_dir: Path, metrics: dict[str, Any], plots: dict[str, Path], notes: list[str]) -> str:
    """The report as one HTML string (PNG data URIs, inline CSS, all text escaped)."""
    net = metrics["network"]
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    cfg_path = run_dir / "config.yaml"
    cfg_text = (
        cfg_path.read_text(encoding="utf-8") if cfg_path.is_file() else "(no config.yaml in the run folder)"
    )
    s = metrics["settings"]
    external = metrics.get("validation") == "external"
    kind = "external validation" if external else "evaluation"
    out: list[str] = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>liverlesion report: {_e(run_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<div class=banner>{_e(DISCLAIMER[:1].upper() + DISCLAIMER[1:])}</div>",
        f"<h1>liverlesion {kind}: {_e(run_dir.name)}</h1>",
        f"<p class=note>Created {_e(metrics.get('created', ''))} by liverlesion {_e(metrics.get('liverlesion_version'))}."
        f" {_e(metrics['n_lesions'])} lesions from {_e(metrics['n_patients'])} patients; classes "
        f"{_e(', '.join(metrics['class_names']))}; positive class <b>{_e(metrics['positive_class'])}</b>. "
        f"95% confidence intervals from {_e(s['n_bootstrap'])} patient-level bootstrap resamples "
        "(all lesions of a drawn patient come along).</p>",
    ]
    # Summary
    out.append(
        "<h2>Summary (network on the external set)</h2>"
        if external
        else "<h2>Summary (network, pooled out-of-fold)</h2>"
    )
    keys = [k for k in SUMMARY_METRICS if k in net["metrics"]]
    out.append(
        _table(["metric", "value [95% CI]"], [[metric_label(k), fmt_ci(net["metrics"][k])] for k in keys])
    )
    for n in metrics.get("notes", []) + notes:
        out.append(f"<p class=note>Note: {_e(n)}</p>")
    if external:
        from liverlesion.external import external_html

        out += external_html(metrics, _e)
    # Side by side
    out.append("<h2>Network and baselines, side by side</h2>")
    header, rows = side_by_side_rows(metrics)
    out.append(_table(header, rows))
    if metrics.get("baselines"):
        cmp = metrics.get("comparison")
        out.append(f"<p>{_e(format_comparison(cmp))}</p>")
        if cmp and cmp.get("difference") is not None:
            out.append(
                f"<p class=note>Best baseline = {_e(cmp.get('selection', ''))}; same resampled patients for "
                f"both methods in every resample; {_e(cmp['n_undefined'])} resamples without both classes "
                f"skipped. {_e(cmp.get('note', ''))}</p>"
            )
        for name, b in metrics["baselines"].items():
            for n in b.get("notes", []):
                out.append(f"<p class=note>{_e(name)}: {_e(n)}</p>")
    else:
        out.append("<p class=note>No baselines/*/predictions.csv in the run folder.</p>")
    if net["task"] == "multiclass":
        out.append("<h2>Per class (one vs rest)</h2>")
        pc_keys = ("sensitivity", "specificity", "ppv", "f1", "roc_auc")
        out.append(
            _table(
                ["class", "lesions", *map(metric_label, pc_keys)],
                [
                    [c, net["n_per_class"][c], *(fmt_ci(net["metrics"].get(f"{k}_{c}")) for k in pc_keys)]
                    for c in net["class_names"]
                ],
            )
        )
    # Per fold
    out.append("<h2>Per fold</h2>")
    out.append(_table(*_per_fold_rows(net)))
    out.append("<h2>Thresholds and temperatures</h2>")
    out.append(
        f"<p>Threshold method: <b>{_e(s['threshold_method'])}</b>, fitted on {_e(s['threshold_fitted_on'])}; "
        f"never chosen on test data. Temperature fitted on {_e(s['temperature_fitted_on'])}.</p>"
    )
    trows = []
    for f, t in net["threshold"]["per_fold"].items():
        temp = net["temperature"]["per_fold"].get(f, {})
        trows.append(
            [
                f,
                _num(t["threshold"]),
                t["note"],
                _num(temp.get("temperature"), 3),
                f"{_num(temp.get('val_nll_before'))} → {_num(temp.get('val_nll_after'))}",
                temp.get("note", ""),
            ]
        )
    out.append(
        _table(["fold", "threshold", "threshold note", "T", "val NLL before → after", "T note"], trows)
    )
    # Size
    out.append("<h2>By lesion size</h2>")
    out.append(_table(*_size_rows(net)))
    out.append(_img(plots.get("size"), "Metrics per diameter bin with 95% CIs"))
    # Calibration
    out.append("<h2>Calibration</h2>")
    cal = net["calibration"]
    if cal.get("available"):
        out.append(
            f"<p class=note>{_e(cal['note'])}. ECE with {_e(cal['n_bins'])} equal-width bins on the "
            f"{_e(cal['target'])}.</p>"
        )
        out.append(
            _table(
                ["", "Brier", "ECE", "NLL"],
                [
                    [
                        cal.get(f"label_{k}", k),
                        _num(cal[k]["brier"]),
                        _num(cal[k]["ece"]),
                        _num(cal[k]["nll"]),
                    ]
                    for k in ("before", "after")
                    if k in cal
                ],
            )
        )
        out.append(_img(plots.get("reliability"), "Reliability diagram before / after temperature scaling"))
        out.append(
            "<p class=note>With few lesions per bin the ECE is noisy and biased upwards, so its bootstrap "
            "interval can lie above the point estimate; temperatures fitted on small inner-validation sets "
            "are unstable and may not improve calibration on the test folds.</p>"
        )
    else:
        out.append(f"<p class=note>{_e(cal.get('note', 'not available'))}</p>")
    # Plots
    out.append("<h2>Curves and confusion matrix</h2><div class=grid>")
    out.append(_img(plots.get("roc"), "ROC curves; shaded: 95% patient-bootstrap band"))
    out.append(_img(plots.get("pr"), "Precision-recall curves; shaded: 95% patient-bootstrap band"))
    out.append(_img(plots.get("confusion"), "Confusion matrix (counts and row %)"))
    out.append("</div>")
    out.append("<h2>Grad-CAM gallery</h2>")
    if plots.get("gradcam"):
        out.append(
            f"<p class=note>Grad-CAM (pytorch-grad-cam) of each lesion's own fold model for the "
            f"{_e(s.get('gradcam_target', 'predicted class'))}, on the centre slice; misclassified lesions "
            "first. Heat maps show where the network looked, not why; they are not a segmentation.</p>"
        )
        out.append(_img(plots.get("gradcam"), "Grad-CAM gallery"))
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
    out.append(f"<p>{_e(ds['n_patients'])} patients, {_e(ds['n_lesions'])} lesions.</p>")
    out.append(_table(["class", "lesions", "max axial diameter, mm: median (IQR)"], drows))
    out.append(_img(plots.get("dataset"), "Lesions per class and size histogram"))
    # Model card
    out.append("<h2>Model card</h2>")
    card = [
        [
            "Intended use",
            "Research on focal liver lesion classification on CT. Not for diagnosis, triage or any "
            "clinical decision.",
        ],
        [
            "Network",
            f"{run_info.get('backbone', metrics.get('run', {}).get('backbone', 'unknown'))} (timm) with the "
            "paper's head (FC 512, dropout 0.4, FC 512)",
        ],
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
        ["Known limits", " ".join(k for k in KNOWN_LIMITS if not (external and k.startswith("No external")))],
        ["Published context", PAPER_CONTEXT],
    ]
    out.append(_table(["", ""], card, num_from=99))
    # Config and versions
    out.append("<h2>Resolved configuration (config.yaml)</h2>")
    out.append(f"<pre>{_e(cfg_text)}</pre>")
    out.append("<h2>Library versions</h2>")
    out.append(
        _table(["package", "now (evaluate)", "at training (run.json)"], _versions(run_info), num_from=99)
    )
    # Lesions and patients, the run itself
    header, rows = _patient_rows(run_dir)
    if rows:
        out.append("<h2>Per patient</h2>")
        out.append("<p class=note>Out-of-fold results; click a column header to sort.</p>")
        out.append(_sortable(header, rows))
    header, rows = _lesion_rows(run_dir, metrics["class_names"], metrics.get("positive_class"))
    if rows:
        out.append("<h2>Per lesion</h2>")
        out.append("<p class=note>Every lesion of predictions.csv; click a column header to sort.</p>")
        out.append(_sortable(header, rows))
    out.append("<h2>Worst errors</h2>")
    if "worst_errors" in plots:
        out.append(
            "<p class=note>The misclassified lesions the model was most sure of, with their probabilities: "
            "start reading errors here.</p>"
        )
        out.append(_img(plots["worst_errors"], "most confident out-of-fold errors"))
    else:
        out.append("<p class=note>No gallery: no misclassified lesion, or no patch cache to draw from.</p>")
    if "losses" in plots:
        out.append("<h2>Loss curves</h2>")
        out.append(_img(plots["losses"], "training and inner-validation loss per epoch, per fold and stage"))
    out.append("<h2>Run time and hardware</h2>")
    hw = run_info.get("hardware") or {}
    run_rows = [
        [
            "training time (all folds)",
            f"{run_info['train_seconds']:.0f} s" if "train_seconds" in run_info else "n/a",
        ],
        ["CPU", str(hw.get("cpu", "n/a"))],
        ["CPU cores", str(hw.get("cores", "n/a"))],
        ["GPU", str(hw.get("gpu") or "none")],
    ]
    out.append(_table(["", ""], run_rows, num_from=99))
    out.append(f"<p class=note>{_e(DISCLAIMER)}</p>{_SORT_JS}</body></html>")
    return "\n".join(x for x in _add_toc(out) if x)


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run_dir/metrics.json`` (written by ``evaluate``)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; run `liverlesion evaluate {run_dir}` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-run `liverlesion evaluate {run_dir}`") from e


def render_report(run_dir: str | Path, gradcam: bool = True, metrics: dict[str, Any] | None = None) -> Path:
    """Draw the plots and write ``run_dir/report.html`` from ``metrics.json`` and the predictions.

    Args:
        run_dir: Evaluated run folder.
        gradcam: Draw the Grad-CAM gallery (needs fold models and the patch cache).
        metrics: ``metrics.json`` content, if already in memory.

    Returns:
        Path of ``report.html``.
    """
    run_dir = Path(run_dir)
    if metrics is None:
        metrics = load_metrics(run_dir)
    drawn = make_plots(run_dir, metrics, gradcam=gradcam)
    return write_text(run_dir / "report.html", build_html(run_dir, metrics, drawn["plots"], drawn["notes"]))
