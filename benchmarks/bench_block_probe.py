"""Could frozen features of several Inception blocks strengthen the fused model's network half?

For each ``COHORT RUN`` pair (a cohort folder with ``manifest.csv`` and a finished ``liverlesion cv``
run on it, whose folds, predictions and baselines are reused), the quick preset's patches are cut
(cached under ``--work``), and the frozen ImageNet Inception-v3 maps of the blocks Mixed_5b..Mixed_6e
are averaged inside the lesion mask (flip views averaged). Printed, pooled out-of-fold ROC AUC on the
lesions the run classifies:

* a logistic regression (the radiomics baselines' ``lr_pipeline``) on the run's folds, reading Mixed_6e
  alone, and Mixed_5b..Mixed_6d concatenated (the blocks below the one the quick preset fine-tunes),
  against the run's own network half;
* a *probe*: that Mixed_5b..Mixed_6d logistic regression with a temperature fitted on logits cross-fitted
  over each training fold's patients, averaged with the network half (``net2``), then late-fused with the
  run's handcrafted half (the soft vote of the radiomics LR and RF) at each fold's own network weight,
  against the run's fused model. Every difference is against the best baseline of the run.

    python benchmarks/bench_block_probe.py COHORT RUN [COHORT RUN ...] [--work DIR]

About 1-3 minutes per 230-lesion cohort on 2 CPU cores. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import command_line, load_avg, machine_info, print_machine, write_results
from bench_feature_blocks import pooled_block_features
from sklearn.metrics import roc_auc_score

from liverlesion.baselines import lr_pipeline
from liverlesion.config import load_config
from liverlesion.data import load_patch_arrays
from liverlesion.fusion import inner_patient_splits
from liverlesion.inference import fit_temperature
from liverlesion.model import build_model
from liverlesion.patch_cache import build_patches, load_patch, load_patch_index
from liverlesion.weights import resolve_imagenet_weights

BLOCKS = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p) - np.log1p(-p)


def block_features(cohort: Path, work: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The patch index and, per block, lesion-pooled frozen features (lesions x channels)."""
    cfg = load_config(preset="quick", overrides=["model.features_from=last"])
    patch_dir = build_patches(cohort / "manifest.csv", work, cfg.patch)
    table = load_patch_index(patch_dir)
    arrays = load_patch_arrays(patch_dir, table)
    masks = [
        load_patch(patch_dir, str(f), arrays=("mask",))["mask"].astype(np.float32) for f in table["file"]
    ]
    model, _ = build_model(
        cfg.model,
        num_classes=2,
        in_chans=int(arrays[0].shape[1]),
        imagenet=resolve_imagenet_weights("inception_v3"),
    )
    model.eval()
    return table, pooled_block_features(model, BLOCKS, arrays, masks)[1]


def measure(cohort: Path, run: Path, work: Path) -> dict[str, float]:
    table, feats = block_features(cohort, work)
    ids = table["lesion_id"].astype(str).to_numpy()
    pid = table["patient_id"].astype(str).to_numpy()
    y = (table["lesion_class"].astype(str) == "metastasis").to_numpy().astype(int)
    splits = json.loads((run / "splits.json").read_text())["splits"]
    sets = {"6e": feats["Mixed_6e"], "5b-6d": np.concatenate([feats[n] for n in BLOCKS[:-1]], 1)}
    oof = {k: np.full(len(y), np.nan) for k in sets}
    probe = np.full(len(y), np.nan)
    for fold in splits:
        te = np.isin(pid, fold["test_patients"])
        for k, x in sets.items():
            oof[k][te] = lr_pipeline(0).fit(x[~te], y[~te]).predict_proba(x[te])[:, 1]
        x, tr = sets["5b-6d"], ~te
        inner = np.zeros(tr.sum())
        for a, b in inner_patient_splits(pid[tr]):
            inner[b] = lr_pipeline(0).fit(x[tr][a], y[tr][a]).decision_function(x[tr][b])
        t = float(fit_temperature(np.stack([-inner / 2, inner / 2], 1), y[tr]))
        probe[te] = lr_pipeline(0).fit(x[tr], y[tr]).decision_function(x[te]) / t
    pred = pd.read_csv(run / "predictions.csv", dtype={"lesion_id": str}).set_index("lesion_id")
    pred = pred[pred["status"] == "classified"]
    at = pd.Series(np.arange(len(ids)), index=ids).loc[pred.index].to_numpy()
    yy = y[at]
    base = {
        k: pd.read_csv(run / "baselines" / k / "predictions.csv", dtype={"lesion_id": str})
        .set_index("lesion_id")
        .loc[pred.index, "prob_metastasis"]
        .to_numpy()
        for k in ("radiomics_lr", "radiomics_rf", "frozen_lr", "mean_hu")
    }
    best = max(roc_auc_score(yy, v) for v in base.values())
    net = _logit(pred["network_prob_metastasis"].to_numpy())
    vote = _logit((base["radiomics_lr"] + base["radiomics_rf"]) / 2)
    fused = pred["prob_metastasis"].to_numpy()
    # each fold's network weight (0 or model.fusion_weight=0.2), read back from the run's fused output
    at_02 = 1 / (1 + np.exp(-(0.2 * net + 0.8 * vote)))
    w = np.where(np.abs(at_02 - fused) < np.abs(1 / (1 + np.exp(-vote)) - fused), 0.2, 0.0)
    net2 = (net + probe[at]) / 2
    return {
        "LR 6e": roc_auc_score(yy, oof["6e"][at]),
        "LR 5b-6d": roc_auc_score(yy, oof["5b-6d"][at]),
        "network half": roc_auc_score(yy, net),
        "net2": roc_auc_score(yy, net2),
        "fused - best": roc_auc_score(yy, fused) - best,
        "fused with net2 - best": roc_auc_score(yy, w * net2 + (1 - w) * vote) - best,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", type=Path, help="COHORT RUN pairs")
    ap.add_argument("--work", type=Path, default=Path("block_probe_patches"), help="patch caches")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("give COHORT RUN pairs")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    info = {**machine_info("cpu"), "command": command_line(None)}
    rows = {}
    for cohort, run in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        rows[run.name] = measure(cohort, run, args.work / cohort.name)
        print(
            run.name,
            " ".join(f"{k}: {v:+.4f}" if "best" in k else f"{k}: {v:.4f}" for k, v in rows[run.name].items()),
            flush=True,
        )
    df = pd.DataFrame(rows).T
    print(df.round(4).to_string())
    for col in ("fused - best", "fused with net2 - best"):
        print(
            f"{col}: at or above the best baseline on {(df[col] >= 0).sum()} of {len(df)}, mean {df[col].mean():+.4f}"
        )
    info["load_avg_after"] = load_avg()
    print_machine(info, f"torch {torch.__version__}")
    args.pairs = [str(p) for p in args.pairs]
    write_results(args.json, info, args, cohorts=rows)


if __name__ == "__main__":
    main()
