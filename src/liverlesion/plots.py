"""The report's figures (matplotlib PNGs in ``RUN/plots``), drawn from the run folder's files.

Everything here reads ``metrics.json``, the predictions CSVs, the patch cache and the
training logs, never a model: the Grad-CAM gallery is drawn by ``evaluate`` (it needs the
fold models) and only picked up here. matplotlib is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, runs
from liverlesion.fileio import atomic_path
from liverlesion.metrics import metric_label
from liverlesion.patch_cache import load_patch, load_patch_index
from liverlesion.predictions import read_predictions
from liverlesion.summary import fmt_ci, size_metric_keys

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _save(fig: Any, out: Path, dpi: int = 110) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out


def _methods(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"network": metrics["network"], **metrics.get("baselines", {})}


def _curve_class(metrics: dict[str, Any]) -> str:
    pos = metrics["positive_class"]
    return f"{pos!r} vs rest" if len(metrics["class_names"]) > 2 else f"positive class {pos!r}"


def _curve_metric(metrics: dict[str, Any], s: dict[str, Any], key: str) -> Any:
    """The metric of the curve drawn: the positive class one vs rest (``roc_auc_<class>``) where the
    run has more than two classes, whose ``roc_auc`` is the macro mean of every class's curve."""
    m = s["metrics"]
    return (
        m.get(f"{key}_{metrics['positive_class']}", m.get(key))
        if len(metrics["class_names"]) > 2
        else m.get(key)
    )


def _curve_legend(ax: Any, metrics: dict[str, Any], loc: str) -> None:
    """The ROC / PR legend, with what the shading is, and the disclaimer under the axes, where the
    legend cannot hide it (it sat in the ROC's lower right corner, under the legend)."""
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    if any(c.get("curves", {}).get("roc", {}).get("band_low") is not None for c in _methods(metrics).values()):
        handles.append(Patch(facecolor="grey", alpha=0.25, lw=0))
        labels.append("shaded: 95% patient-bootstrap band")
    ax.legend(handles, labels, loc=loc, fontsize=7.5, title="[bracketed: 95% CI]", title_fontsize=7.5)
    ax.figure.supxlabel(DISCLAIMER, x=0.99, ha="right", fontsize=7, color="grey")  # laid out, not overlaid


def plot_roc(metrics: dict[str, Any], out: Path) -> Path:
    """ROC curves of the positive class with 95% bootstrap bands, network and baselines."""
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance (AUC 0.5)")
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
            label=f"{name}: AUC {fmt_ci(_curve_metric(metrics, s, 'roc_auc'))}",
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
        title=f"ROC, {_curve_class(metrics)}",
    )
    _curve_legend(ax, metrics, "lower right")
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
            label=f"{name}: AP {fmt_ci(_curve_metric(metrics, s, 'pr_auc'))}",
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
        title=f"Precision-recall, {_curve_class(metrics)}",
    )
    _curve_legend(ax, metrics, "lower left")
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
    same = len(shown) == 2 and cal["before"]["bins"] == cal["after"]["bins"]
    # before: big hollow markers, solid; after: small filled ones, dashed: both stay visible where
    # they coincide (a run whose temperatures are all 1 drew "after" exactly over "before")
    styles = ({"ls": "-", "ms": 9, "mfc": "none", "mew": 1.5}, {"ls": "--", "ms": 4.5})
    for j, (key, label, marker) in enumerate(shown):
        bins = cal[key]["bins"]
        xs = [b["mean_predicted"] for b in bins if b["count"]]
        ys = [b["observed"] for b in bins if b["count"]]
        text = f"{label} (ECE {cal[key]['ece']:.3f})" + (", same as before" if same and j == 1 else "")
        ax.plot(xs, ys, marker=marker, color=_COLORS[j], label=text, **styles[j])
        centres = np.array([(b["lower"] + b["upper"]) / 2 for b in bins])
        axc.bar(
            centres + (j - 0.5) * width / 2,
            [b["count"] for b in bins],
            width=width / 2,
            color=_COLORS[j],
            label=label,
        )
    ax.set(
        xlim=(-0.03, 1.03),  # markers at 0 and 1 drawn whole, not cut in half by the frame
        ylim=(-0.03, 1.03),
        xlabel="mean predicted probability in the bin",
        ylabel="observed frequency in the bin",
        title=f"Reliability: {cal['target']}",
    )
    ax.legend(fontsize=7.5, loc="upper left")
    axc.set(xlim=(-0.03, 1.03), xlabel="predicted probability", ylabel="lesions per bin")
    if len(shown) > 1:
        axc.legend(fontsize=7, loc="upper center", ncol=2)
    return _save(fig, out)


def plot_size(summary: dict[str, Any], out: Path) -> Path:
    """Size-stratified bar chart (metrics per diameter bin) with 95% CIs where available."""
    strata = [s for s in summary["size"] if s.get("n_lesions")]
    keys = size_metric_keys(summary)
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
        ylabel="metric value",
        xlabel="maximal axial diameter (mm)",
        title="Performance by lesion size (95% patient-bootstrap CIs where n allows)",
    )
    # beside the axes, never over the bars
    pos = summary.get("positive_class")
    ax.legend(
        fontsize=7.5,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        title=f"positive class:\n{pos}" if pos and len(summary.get("class_names", ())) == 2 else None,
        title_fontsize=7.5,
    )
    return _save(fig, out)


def plot_dataset(df: pd.DataFrame, classes: list[str], out: Path) -> Path:
    """Dataset summary: lesions (and patients) per class, diameter histogram by class."""
    fig = _figure(9.0, 3.8)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    n_les = [int((df["true_class"] == c).sum()) for c in classes]
    n_pat = [int(df.loc[df["true_class"] == c, "patient_id"].nunique()) for c in classes]
    x = np.arange(len(classes))
    # greys: blue and orange are the classes in the histogram beside it
    ax1.bar(x - 0.2, n_les, width=0.4, color="#4d4d4d", label="lesions")
    ax1.bar(x + 0.2, n_pat, width=0.4, color="#b3b3b3", label="patients with this class")
    for xi, n in zip(x, n_les, strict=True):
        ax1.text(xi - 0.2, n, str(n), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, classes)
    small = int((df["status"].astype(str) != "classified").sum()) if "status" in df else 0
    # every lesion of predictions.csv: more than the report's "N patients, M lesions", which counts
    # the classified ones only; said so, not left as two numbers that disagree
    ax1.set(
        title=f"{len(df)} lesions, {df['patient_id'].nunique()} patients"
        + (f"\n(incl. {small} too small to characterise)" if small else ""),
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
            ax2.axvline(t, ls=":", color="grey", lw=1, label="size bins: 10, 20 mm" if t == 10 else None)
        ax2.set(xlabel="maximal axial diameter (mm)", ylabel="lesions", title="Lesion size by class")
        ax2.legend(fontsize=7)
    else:
        ax2.text(
            0.5, 0.5, "no max_axial_diameter_mm column", ha="center", va="center", transform=ax2.transAxes
        )
        ax2.set_axis_off()
    return _save(fig, out)


def plot_losses(run_dir: Path, out: Path) -> Path | None:
    """Training and inner-validation loss per epoch, one panel per fold and stage (None without logs)."""
    logs = {k: v for k, v in runs.loss_logs(run_dir).items() if "epoch" in v}
    if not logs:
        return None
    n = len(logs)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = _figure(3.2 * cols, 2.4 * rows)
    for i, (name, df) in enumerate(logs.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        # val_loss is what early stopping compared (train.select_on: after the fold's temperature
        # by default); val_raw_loss, logged beside it since then, is the plain cross-entropy
        for col, style, label in (
            ("train_loss", "-", "train loss"),
            ("val_raw_loss", ":", "val loss, raw"),
            ("val_loss", "--", "val loss, early stopping"),
        ):
            if col in df:
                d = df.dropna(subset=[col]).groupby("epoch")[col].last()
                if len(d):
                    ax.plot(d.index + 1, d.to_numpy(), style, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("cross-entropy loss", fontsize=8)
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
    # 4 to a row, 2.6 in each: shown ~1000 px wide in the report, the 8 pt titles stay readable
    # (6 to a row in 6.5 pt came out at ~7 px)
    cols = min(len(shown), 4)
    rows = (len(shown) + cols - 1) // cols
    fig = _figure(2.6 * max(cols, 3), 3.1 * rows)
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
            f"{r['lesion_id']}\ntrue {r['true_class']}, called {r['pred_class']}\n{probs}", fontsize=8
        )
        ax.axis("off")
    fig.suptitle(
        "Most confident errors (out-of-fold), centre slice; orange outline: lesion mask\n" + DISCLAIMER,
        fontsize=10,
    )
    return _save(fig, out)


def make_plots(
    run_dir: str | Path, metrics: dict[str, Any], gradcam: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Draw every PNG into ``run_dir/plots`` from the files on disk.

    Args:
        run_dir: Run folder holding ``metrics.json`` and ``predictions.csv``.
        metrics: The ``metrics.json`` content.
        gradcam: What ``evaluate`` just did with the Grad-CAM gallery (``{"path", "notes"}``,
            see :func:`liverlesion.evaluate.draw_gradcam_gallery`); None: not redrawn, an
            earlier gallery is shown if there is one.

    Returns:
        ``{"plots": {name: Path}, "notes": [str]}``.
    """
    run_dir = Path(run_dir)
    plots_dir = runs.plots_dir(run_dir)
    net = metrics["network"]
    classes = metrics["class_names"]
    df, _ = read_predictions(runs.predictions_path(run_dir), classes)
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

    gallery_png = runs.gradcam_gallery_path(run_dir)
    if gradcam is not None:  # drawn (or tried) by this evaluate
        notes += gradcam["notes"]
        if gradcam.get("path") is not None:
            plots["gradcam"] = Path(gradcam["path"])
    elif gallery_png.is_file():
        plots["gradcam"] = gallery_png
        notes.append(
            "Grad-CAM gallery from an earlier run of `liverlesion evaluate` (not redrawn: --no-gradcam)"
        )
    worst = plot_worst_errors(
        df, classes, runs.run_patch_dir(run_dir, metrics), plots_dir / "worst_errors.png"
    )
    if worst is not None:
        plots["worst_errors"] = worst
    losses = plot_losses(run_dir, plots_dir / "losses.png")
    if losses is not None:
        plots["losses"] = losses
    return {"plots": plots, "notes": notes}
