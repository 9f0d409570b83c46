"""Post hoc: would a handcrafted half of radiomics LR *and* random forest lift the fused model?

The fused model (``model.fusion: radiomics``) mixes its calibrated network half with the radiomics
logistic regression: ``w * network + (1 - w) * LR`` in logits, ``w`` per fold from
``predictions.csv`` (``network_weight``). On cohorts where the random-forest baseline beats the
LR, the fused model can only catch up through the network. This script re-mixes, from the files
of finished ``liverlesion cv`` runs and with nothing refitted, the run's own out-of-fold outputs:

  * ``fused``: the fused model as run (``prob_<positive>`` in ``predictions.csv``)
  * ``net+lr``: ``w * network + (1 - w) * LR`` (reproduces ``fused``; a check)
  * ``net+(lr+rf)/2``: the same with the handcrafted half the mean of the LR's and the forest's logits
  * ``(lr+rf)/2``: that handcrafted half alone

and prints each pooled ROC AUC (lesions ``predict`` classifies) against the best baseline of the
run. The forest's logits are those of its probabilities clipped to [0.001, 0.999]: it is not
calibrated, and no weight is chosen here, so this is a lead, not a result of the shipped model.

    python benchmarks/bench_fusion_halves.py RUN [RUN ...]

RUN: a ``liverlesion cv`` folder with the fusion model and its baselines (binary task; the positive
class is the run's ``eval.positive_class``).
Results: benchmarks/README.md, "Stratified folds".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import logit
from sklearn.metrics import roc_auc_score

from liverlesion.config import load_run_config


def _z(p: pd.Series) -> np.ndarray:
    return logit(np.clip(p.to_numpy(float), 1e-3, 1 - 1e-3))


def run(run_dir: Path) -> dict[str, float]:
    positive = load_run_config(run_dir / "config.yaml").eval.positive_class
    pred = pd.read_csv(run_dir / "predictions.csv", dtype={"lesion_id": str})
    pred = pred[pred["status"] == "classified"].set_index("lesion_id")
    y = (pred["true_class"].astype(str) == positive).to_numpy(int)
    base = {}
    for d in sorted((run_dir / "baselines").iterdir()):
        f = d / "predictions.csv"
        if f.is_file():
            base[d.name] = pd.read_csv(f, dtype={"lesion_id": str}).set_index("lesion_id").loc[pred.index]
    col = f"prob_{positive}"
    auc = {name: roc_auc_score(y, b[col]) for name, b in base.items()}
    w = pred["network_weight"].to_numpy(float)
    net, lr, rf = (
        _z(pred[f"network_prob_{positive}"]),
        _z(base["radiomics_lr"][col]),
        _z(base["radiomics_rf"][col]),
    )
    return {
        "best baseline": max(auc.values()),
        "fused": roc_auc_score(y, pred[col]),
        "net+lr": roc_auc_score(y, w * net + (1 - w) * lr),
        "net+(lr+rf)/2": roc_auc_score(y, w * net + (1 - w) * (lr + rf) / 2),
        "(lr+rf)/2": roc_auc_score(y, (lr + rf) / 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    args = ap.parse_args()
    for r in args.runs:
        res = run(r)
        best = res.pop("best baseline")
        print(
            f"{r}: best baseline {best:.4f} | "
            + " | ".join(f"{k} {v:.4f} ({v - best:+.4f})" for k, v in res.items())
        )


if __name__ == "__main__":
    main()
