"""Accuracy benchmark: network variants against every baseline, on the same patient-level folds.

For each synthetic cohort (difficulty 0, 1, 2; two seeds each by default) this runs ``liverlesion
cv`` once per network variant, with the baselines (mean HU, radiomics LR / RF, frozen ImageNet
features + LR) computed on the same folds in the same run, and prints pooled ROC AUC, accuracy and
F1 with patient-bootstrap 95% CIs, plus the paired patient-bootstrap AUC difference of each variant
against the best baseline of that cohort. Nothing here is a timed test; record results in
benchmarks/README.md.

Variants (all inception_v3 with ImageNet weights, the quick preset's folds and bootstrap):
  * ``today``:   the previous quick recipe (end-to-end fine-tuning at 80 px, no TTA, no fusion)
  * ``lpft``:    the new default recipe (frozen-feature head, then the top block fine-tuned), 160 px
  * ``fusion``:  ``lpft`` + radiomics late fusion (the quick preset as shipped)
  * ``e2e160``:  end-to-end fine-tuning at the quick preset's 160 px
  * ``fusion_last``: ``fusion`` with the head on the last Inception block (Mixed_7c, the paper's
    2048 channels) instead of the default mid-level one (``model.features_from``)
  * ``lpft_last``: ``lpft`` (network alone) on the last block
  * ``fusion_lesion`` / ``lpft_lesion``: ``fusion`` / ``lpft`` with the features pooled inside the
    lesion mask (``model.pool=lesion``) instead of over the whole patch
  * ``fusion_auto`` / ``lpft_raw``: the fusion weight chosen per fold / early stopping on the raw loss
  * ``fusion_stacks``: ``fusion`` with three 2.5-D stacks per lesion (``patch.stacks=1``)

Usage:
    python benchmarks/bench_accuracy.py [--difficulties 0 1 2] [--seeds 0 1] [--variants ...]
        [--patients 63 --lesions 230] [--out /tmp/bench_accuracy]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import cpu_info

VARIANTS = {
    "today": [
        "patch.size_px=80", "train.recipe=end_to_end", "model.fusion=none", "model.tta=none",
        "train.epochs=8", "train.batch_size=16", "train.lr=1e-3", "train.patience=4", "train.warmup_epochs=0",
    ],
    "lpft": ["model.fusion=none"],
    "fusion": [],
    "fusion_auto": ["model.fusion_weight=auto"],  # the weight chosen per fold (the rule before)
    "e2e160": ["train.recipe=end_to_end", "model.fusion=none", "train.epochs=8", "train.patience=4"],
    "fusion_last": ["model.features_from=last"],
    "lpft_last": ["model.fusion=none", "model.features_from=last"],
    "fusion_lesion": ["model.pool=lesion"],
    "lpft_lesion": ["model.fusion=none", "model.pool=lesion"],
    "lpft_raw": ["model.fusion=none", "train.select_on=loss"],  # early stopping on the raw loss (before)
    "fusion_stacks": ["patch.stacks=1"],  # three 2.5-D stacks per lesion (centre slice and one either side)
}  # fmt: skip


def _ci(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    lo, hi = m.get("ci_low"), m.get("ci_high")
    return f"{m['value']:.3f} [{lo:.3f}-{hi:.3f}]" if lo is not None else f"{m['value']:.3f}"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def run_grid(args, make_cohort, label: str = "") -> None:
    """``liverlesion cv`` of every variant on every cohort (difficulty x seed), with the baselines of
    the same folds; prints one JSON row per run and a Markdown table. ``make_cohort(folder, seed,
    difficulty)`` writes ``folder/manifest.csv`` (called only where it is missing)."""
    from liverlesion.cli_common import default_training_threads
    from liverlesion.config import load_config
    from liverlesion.cv import run_cv

    print(json.dumps({"machine": cpu_info()}))
    t_all = time.time()
    rows = []
    for d in args.difficulties:
        for seed in args.seeds:
            cohort = args.out / f"cohort_d{d:g}_s{seed}"
            if not (cohort / "manifest.csv").exists():
                t0 = time.time()
                make_cohort(cohort, seed, d)
                print(json.dumps({"cohort_seconds": round(time.time() - t0)}))
            for i, v in enumerate(args.variants):
                run = args.out / f"run_d{d:g}_s{seed}_{v}"
                cfg = load_config(preset="quick", overrides=VARIANTS[v])
                # as `liverlesion cv` does: torch on the free cores, so that two benchmark runs side
                # by side do not each start one thread per core
                default_training_threads(cfg, None)
                t0 = time.time()
                if not (run / "metrics.json").exists():
                    run_cv(cohort / "manifest.csv", run, cfg, resume=run.exists(), baselines=True)
                m = json.loads((run / "metrics.json").read_text())
                secs = time.time() - t0
                bases = m["baselines"]
                cmp = m.get("comparison") or {}
                best = cmp.get("b", "?")
                half = ((m["network"].get("network_half") or {}).get("metrics") or {}).get("roc_auc")
                row = {
                    "cohort": f"{label}d{d:g} s{seed}",
                    "method": v,
                    "auc": _ci(m["network"]["metrics"].get("roc_auc")),
                    "network_half_auc": _ci(half) if half else "",
                    "accuracy": _ci(m["network"]["metrics"].get("accuracy")),
                    "f1": _ci(m["network"]["metrics"].get("f1")),
                    "vs_best": f"{best}: {_num(cmp.get('difference'))} "
                    f"[{_num(cmp.get('ci_low'))}, {_num(cmp.get('ci_high'))}]",
                    "seconds": round(secs),
                    "coverage": f"{m['coverage']['n_classified']}/{m['coverage']['n_lesions']}",
                }
                rows.append(row)
                print(json.dumps(row))
                if i == 0:  # the baselines are identical across variants (same folds, same lesions)
                    for b, bm in bases.items():
                        rows.append(
                            {
                                "cohort": row["cohort"],
                                "method": f"baseline {b}",
                                "auc": _ci(bm["metrics"].get("roc_auc")),
                                "accuracy": _ci(bm["metrics"].get("accuracy")),
                                "f1": _ci(bm["metrics"].get("f1")),
                            }
                        )
    cols = ["cohort", "method", "auc", "network_half_auc", "accuracy", "f1", "vs_best", "coverage", "seconds"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    print(f"\nwall time {time.time() - t_all:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--difficulties", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--patients", type=int, default=63)
    ap.add_argument("--lesions", type=int, default=230)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_accuracy"))
    args = ap.parse_args()

    from liverlesion.synth import generate_cohort

    def make(folder: Path, seed: int, d: float) -> None:
        generate_cohort(folder, patients=args.patients, lesions=args.lesions, seed=seed, difficulty=d)

    run_grid(args, make)


if __name__ == "__main__":
    main()
