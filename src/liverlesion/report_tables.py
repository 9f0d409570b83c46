"""HTML building blocks of ``report.html``: CSS, escaping, tables, embedded PNGs, and the rows
of its tables (per fold, per size stratum, per lesion, per patient, library versions).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import __version__, runs
from liverlesion.config import FUSION_HALF, fusion_votes
from liverlesion.metrics import metric_label
from liverlesion.model_input import POOL_TEXT
from liverlesion.predictions import read_predictions_table
from liverlesion.summary import fmt_ci, size_metric_keys
from liverlesion.versions import library_versions

CSS = """
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
.wide{max-width:100%;overflow-x:auto}td.text{white-space:normal;min-width:12em}
"""

# sorts a table when a header with class "sort" is clicked (numbers as numbers); no dependencies
SORT_JS = """<script>
document.querySelectorAll("table.sortable").forEach(function(t){
  t.querySelectorAll("th").forEach(function(th,i){th.classList.add("sort");th.addEventListener("click",function(){
    var b=t.tBodies[0],r=Array.from(b.rows),d=th.dataset.dir==="asc"?-1:1;th.dataset.dir=d>0?"asc":"desc";
    r.sort(function(x,y){var a=x.cells[i].textContent,c=y.cells[i].textContent,p=parseFloat(a),q=parseFloat(c);
      return (isNaN(p)||isNaN(q)?a.localeCompare(c):p-q)*d;});r.forEach(function(e){b.appendChild(e);});});});});
</script>"""


def esc(x: Any) -> str:
    """HTML-escape any value as text."""
    return html.escape(str(x), quote=True)


def table(
    header: list[Any], rows: list[list[Any]], num_from: int = 1, text_cols: tuple[int, ...] = ()
) -> str:
    """An HTML table; columns from ``num_from`` on are numbers (right-aligned, never wrapped), except
    ``text_cols``: sentences (notes) that wrap. Wrapped in a ``.wide`` box that scrolls sideways
    inside the page, not the page, should a table still be wider than it."""

    def cls(i: int) -> str:
        return " class=text" if i in text_cols else " class=num" if i >= num_from else ""

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{esc(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows
    )
    if not any(str(h) for h in header):  # a key-value table: no empty header row
        return f"<div class=wide><table><tbody>{body}</tbody></table></div>"
    return f"<div class=wide><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def img(path: Path | None, caption: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def num(v: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals, or ``n/a``."""
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def versions_rows(run_info: dict[str, Any]) -> list[list[str]]:
    """Per library: version now and at training (``run.json``)."""
    rows = [["liverlesion", __version__, str(run_info.get("liverlesion_version", ""))]]
    trained = run_info.get("versions", {}) or {}
    for pkg, v in library_versions().items():
        rows.append([pkg, v, str(trained.get(pkg, trained.get(pkg.lower(), "")))])
    return rows


def per_fold_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-fold table (and the mean ± SD row)."""
    keys = [
        k
        for k in ("accuracy", "sensitivity", "specificity", "roc_auc", "macro_f1")
        if k in summary["metrics"]
    ]
    fused = any("network_weight" in v for v in summary["per_fold"].values())
    weight = ["network weight"] if fused else []
    header = ["fold", "patients", "lesions", "threshold", "temperature", *weight, *map(metric_label, keys)]
    rows = []
    for f, v in summary["per_fold"].items():
        rows.append(
            [
                f,
                v["n_patients"],
                v["n_lesions"],
                num(v["threshold"]),
                num(v["temperature"], 2),
                *([num(v.get("network_weight"), 2)] if fused else []),
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
            *([""] if fused else []),
            *(
                f"{fm[k]['mean']:.2f} ± {fm[k]['sd']:.2f}"
                if fm[k]["mean"] is not None and fm[k]["sd"] is not None
                else num(fm[k]["mean"], 2)
                for k in keys
            ),
        ]
    )
    return header, rows


def size_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the size-stratum table."""
    keys = size_metric_keys(summary)
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


def lesion_rows(run_dir: Path, classes: list[str], positive: str | None) -> tuple[list[str], list[list[str]]]:
    """The per-lesion table: truth, prediction, P(positive), status, fold, size."""
    path = runs.predictions_path(run_dir)
    if not path.is_file():
        return [], []
    df = read_predictions_table(path)
    pcol = f"prob_{positive}" if positive and f"prob_{positive}" in df else None
    cols = ["lesion_id", "patient_id", "true_class", "pred_class", "status", "fold"]
    cols = [c for c in cols if c in df]
    extra = [c for c in ("max_axial_diameter_mm", "hu_mean") if c in df]
    header = cols[:2] + ["truth", "prediction"] + cols[4:] + ([f"P({positive})"] if pcol else []) + extra
    rows = []
    for _, r in df.iterrows():
        row = [str(r[c]) for c in cols]
        if pcol:
            row.append(num(r[pcol]))
        row += [num(r[c], 1) for c in extra]
        rows.append(row)
    return header, rows


def patient_rows(run_dir: Path) -> tuple[list[str], list[list[str]]]:
    """Per patient: lesions, how many classified, how many right."""
    path = runs.predictions_path(run_dir)
    if not path.is_file():
        return [], []
    df = read_predictions_table(path)
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
                     str(int(c.sum())), str(right), num(right / c.sum(), 2) if c.sum() else "n/a"])  # fmt: skip
    return ["patient", "fold", "lesions (truth)", "lesions", "classified", "right", "accuracy"], rows


def sortable(header: list[str], rows: list[list[str]]) -> str:
    """A table the reader can sort by clicking a column header."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<div class=scroll><table class=sortable><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def add_toc(parts: list[str]) -> list[str]:
    """Give every h2 an id and put a table of contents after the first paragraph."""
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


def model_rows(cfg_path: Path, backbone: str, summary: dict[str, Any]) -> list[list[str]]:
    """Model-card rows saying what the network reads, how it was trained and what it is fused with.

    From the run's ``config.yaml`` (the settings the checkpoints were trained with) and, for a fusion
    model, the weight each fold gave the network (``network_weight`` of the predictions). A run folder
    without a readable config (an external validation) gets the network row alone.
    """
    from liverlesion.config import load_run_config  # local: yaml
    from liverlesion.errors import UserError
    from liverlesion.patches import stacks_each_side  # local: scipy

    head = f"{backbone} (timm) with the paper's head (FC 512, dropout 0.4, FC 512)"
    try:
        cfg = load_run_config(cfg_path) if Path(cfg_path).is_file() else None
    except (UserError, OSError, ValueError):
        cfg = None
    if cfg is None:
        return [["Network", head]]
    m, p, t = cfg.model, cfg.patch, cfg.train
    block = {
        "last": "the last block's features, as the paper",
        "mid": "the second-to-last stage's features (model.features_from = mid; the paper reads the last block)",
    }.get(
        m.features_from,
        f"the features of {m.features_from} (model.features_from; the paper reads the last block)",
    )
    pool = POOL_TEXT.get(m.pool, m.pool)
    n_stacks = 2 * stacks_each_side(p) + 1
    stacks = f" ({n_stacks} stacks per lesion, features averaged)" if n_stacks > 1 else ""
    rows = [
        [
            "Network",
            f"{head}, reading {block}, {pool}; input {p.size_px} px "
            f"{p.mode} patches{stacks}; test-time augmentation: {m.tta}",
        ],
        [
            "Training",
            f"lpft: the head on cached frozen ImageNet features ({t.aug_views} augmented views per lesion), "
            f"then the top {t.finetune_blocks} block(s) fine-tuned; early stopping on inner validation"
            if t.recipe == "lpft"
            else "end to end: the whole network fine-tuned (the paper); early stopping on inner validation",
        ],
    ]
    if m.fusion != "none":
        weights = [v.get("network_weight") for v in summary.get("per_fold", {}).values()]
        known = [w for w in weights if w is not None]
        fixed = _set_weight(m)
        how = (
            f"w = {fixed:g}, set by model.fusion_weight"
            if fixed is not None and known and all(w == fixed for w in known)
            else "w chosen on each fold's training patients, 0 when mixing in the network does not "
            "clearly help"
        )
        text = (
            f"late fusion with {FUSION_HALF.get(m.fusion, m.fusion)} (model.fusion={m.fusion}): "
            f"logits = w·network + (1 − w)·radiomics, each half calibrated first; {how}."
        )
        if known:
            text += f" Weight of the network per fold: {', '.join(num(w, 2) for w in weights)}"
            text += (
                "; every fold kept the radiomics half alone, so these predictions are "
                + (
                    "the mean of the radiomics LR and RF baselines' probabilities."
                    if fusion_votes(m)
                    else "the radiomics logistic regression's."
                )
                if max(known) == 0
                else "."
            )
        rows.append(["Fusion", text])
    return rows


def _set_weight(m) -> float | None:
    from liverlesion.config import fixed_fusion_weight
    from liverlesion.errors import UserError

    try:
        return fixed_fusion_weight(m)
    except UserError:  # a hand-edited config.yaml: describe the recorded weights only
        return None
