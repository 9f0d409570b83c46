"""Text summaries of ``metrics.json``: value [CI] strings, plain-text tables, the terminal summary.

Shared by ``evaluate`` (terminal), ``external`` and ``report`` (HTML tables); reads only the
metrics dict, never files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from liverlesion import DISCLAIMER
from liverlesion.metrics import SUMMARY_METRICS, metric_label


def fmt_ci(entry: dict[str, Any] | None, digits: int = 2) -> str:
    """``0.93 [0.88–0.97]`` (or ``0.93`` without a CI, ``n/a`` when undefined)."""
    if not entry or entry.get("value") is None or not np.isfinite(entry["value"]):
        return "n/a"
    s = f"{entry['value']:.{digits}f}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        s += f" [{entry['ci_low']:.{digits}f}–{entry['ci_high']:.{digits}f}]"
    return s


def side_by_side_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (metric, network, baselines...) of the side-by-side comparison."""
    methods = {"network": metrics["network"], **metrics.get("baselines", {})}
    keys = list(metrics["network"]["metrics"])
    header = ["metric", *methods]
    rows = [[metric_label(k), *(fmt_ci(m["metrics"].get(k)) for m in methods.values())] for k in keys]
    return header, rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def format_comparison(cmp: dict[str, Any] | None) -> str:
    """One line describing the paired AUC test."""
    if not cmp:
        return "Paired test: no baseline with a defined ROC AUC."
    if cmp.get("difference") is None:
        return f"Paired test: {cmp.get('note', 'not possible')}"
    if cmp.get("p_value") is None:
        return (
            f"Paired test ROC AUC network − {cmp['b']}: {cmp['difference']:+.3f} (too few resamples for a CI)"
        )
    return (
        f"Paired patient-bootstrap test, ROC AUC network − {cmp['b']}: {cmp['difference']:+.3f} "
        f"[{cmp['ci_low']:+.3f} to {cmp['ci_high']:+.3f}], two-sided p = {cmp['p_value']:.3g}"
    )


def undefined_note(summary: dict[str, Any], n_bootstrap: int) -> str | None:
    """Where a CI left out resamples that drew one class only (its metric undefined there), or None.

    Those CIs are conditional on both classes being drawn; ``metrics.json`` counts them as
    ``n_undefined``, and the report says which (pooled, per fold, per size stratum).
    """
    parts = []
    blocks = [("pooled", summary.get("metrics") or {})]
    blocks += [(f"fold {f}", v.get("metrics") or {}) for f, v in (summary.get("per_fold") or {}).items()]
    blocks += [(str(e.get("bin")), e.get("metrics") or {}) for e in summary.get("size") or []]
    for where, metrics in blocks:
        worst = max(
            (v.get("n_undefined") or 0 for v in metrics.values() if v.get("ci_low") is not None), default=0
        )
        if worst:
            parts.append(f"{where} (up to {worst})")
    if not parts:
        return None
    return (
        f"Resamples that drew one class only leave metrics such as ROC AUC undefined; their CIs use the "
        f"other resamples of the {n_bootstrap} (no CI where fewer than half define it): "
        + ", ".join(parts)
        + "."
    )


def network_half_line(metrics: dict[str, Any]) -> str | None:
    """A fusion model's network half alone, next to the frozen-feature floor; None for other models."""
    half = (metrics["network"].get("network_half") or {}).get("metrics", {}).get("roc_auc")
    if not half:
        return None
    floor = (metrics.get("baselines", {}).get("frozen_lr", {}).get("metrics") or {}).get("roc_auc")
    return f"Network half alone (before fusion), ROC AUC {fmt_ci(half)}" + (
        f"; frozen ImageNet features + LR {fmt_ci(floor)}" if floor else ""
    )


def format_summary(metrics: dict[str, Any]) -> str:
    """The terminal summary printed by ``liverlesion evaluate``."""
    net = metrics["network"]
    lines = [
        f"liverlesion evaluate: {DISCLAIMER}",
        f"{metrics['n_lesions']} lesion{'s' if metrics['n_lesions'] != 1 else ''}, {metrics['n_patients']} "
        f"patient{'s' if metrics['n_patients'] != 1 else ''}, {net['n_folds']} folds; "
        f"classes {', '.join(metrics['class_names'])}; positive class {metrics['positive_class']!r}; "
        f"95% CIs from {metrics['settings']['n_bootstrap']} patient-level bootstrap resamples",
    ]
    thr = [v["threshold"] for v in net["threshold"]["per_fold"].values() if v["threshold"] is not None]
    if thr:
        lines.append(
            f"Threshold ({net['threshold']['method']}, chosen per fold on inner validation): "
            + ", ".join(f"{t:.3f}" for t in thr)
        )
    weights = [v.get("network_weight") for v in net["per_fold"].values() if "network_weight" in v]
    if weights:
        lines.append(
            "Fusion, weight of the network per fold (0 = the radiomics half alone, 1 = the network alone): "
            + ", ".join("n/a" if w is None else f"{w:.2f}" for w in weights)
        )
    half = network_half_line(metrics)
    if half:
        lines.append(half)
    for k in SUMMARY_METRICS:
        if k in net["metrics"]:
            lines.append(f"  {metric_label(k):<14} {fmt_ci(net['metrics'][k])}")
    cal = net["calibration"]
    if cal.get("available") and "after" not in cal:
        b = cal["before"]
        lines.append(
            f"Calibration ({cal.get('label_before', 'before')}): ECE {b['ece']:.3f}, Brier {b['brier']:.3f}, "
            f"NLL {b['nll']:.3f}"
        )
    elif cal.get("available"):
        b, a = cal["before"], cal["after"]
        lines.append(
            f"Calibration (temperature scaling): ECE {b['ece']:.3f} -> {a['ece']:.3f}, "
            f"Brier {b['brier']:.3f} -> {a['brier']:.3f}, NLL {b['nll']:.3f} -> {a['nll']:.3f}"
        )
    lines.append("")
    lines.append(format_table(*side_by_side_rows(metrics)))
    if metrics.get("baselines"):
        lines.append(format_comparison(metrics.get("comparison")))
    for n in metrics.get("notes", []):
        lines.append(f"Note: {n}")
    return "\n".join(lines)


def size_metric_keys(summary: dict[str, Any]) -> list[str]:
    """The metrics shown per size stratum (plot and table) for one method's summary."""
    if summary["task"] == "binary":
        return ["sensitivity", "specificity", "accuracy", "roc_auc"]
    return ["accuracy"] + [f"sensitivity_{c}" for c in summary["class_names"]]
