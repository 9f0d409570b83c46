"""Replay early stopping with other ``train.min_delta`` values on runs that have finished.

Every stage that trains with early stopping (the lpft probe and fine-tuning stages, the
``end_to_end`` recipe) logs its inner-validation loss per epoch to ``fold_K/logs/csv_*/metrics.csv``.
Early stopping and the kept weights depend on nothing else, so replaying Lightning's rule (an epoch
counts as better only when the loss falls more than ``min_delta`` below the last epoch that counted;
stop after ``train.patience`` epochs that do not count) on those losses gives, exactly, for each
stage and each ``min_delta``:

  * the epochs it would have run (never more than the run ran: a larger ``min_delta`` only stops
    sooner, so the replay is exact for values at or above the run's own ``train.min_delta``), and
  * the epoch whose weights it would have kept (the lowest loss among those epochs), marked ``*``
    where that differs from the run's: only there would the model, and so its scores, change.

The run's own value is the reference, printed first. Runs are read, nothing is trained.

    python benchmarks/bench_early_stopping.py RUN [RUN ...] [--deltas 0.001 0.002 0.005]

Results: benchmarks/README.md, "A minimum fall of the loss for early stopping".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from liverlesion.config import load_run_config
from liverlesion.runs import loss_logs


def replay(losses: np.ndarray, patience: int, min_delta: float) -> int:
    """Epochs run under Lightning's EarlyStopping(mode="min") on these per-epoch losses."""
    best, wait = float("inf"), 0
    for epoch, loss in enumerate(losses):
        if loss < best - min_delta:
            best, wait = float(loss), 0
        else:
            wait += 1
            if wait >= patience:
                return epoch + 1
    return len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--deltas", nargs="+", type=float, default=[0.001, 0.002, 0.005])
    args = ap.parse_args()
    for run in args.runs:
        cfg = load_run_config(run / "config.yaml")
        patience, own = cfg.train.patience, cfg.train.min_delta
        deltas = [d for d in args.deltas if d >= own]
        print(f"\n{run}: patience {patience}, run with min_delta {own:g}")
        labels = [f"min_delta {d:g}" for d in deltas]
        print("fold and stage      run (kept) | " + " | ".join(labels))
        saved = dict.fromkeys(deltas, 0)
        changed = dict.fromkeys(deltas, 0)
        total = 0
        for name, log in loss_logs(run).items():
            if "val_loss" not in log:
                continue
            v = log.dropna(subset=["val_loss"]).groupby("epoch")["val_loss"].last().to_numpy()
            kept = int(np.argmin(v)) + 1
            total += len(v)
            row = f"{name:18s} {len(v):3d} ({kept:2d})   |"
            for d, label in zip(deltas, labels, strict=True):
                n = replay(v, patience, d)
                k = int(np.argmin(v[:n])) + 1
                saved[d] += len(v) - n
                changed[d] += k != kept
                row += f" {f'{n:3d} ({k:2d})' + ('*' if k != kept else ''):{len(label)}s} |"
            print(row)
        for d in deltas:
            print(
                f"min_delta {d:g}: {saved[d]} of {total} epochs not run; "
                f"{changed[d]} stage(s) would keep another epoch's weights"
            )


if __name__ == "__main__":
    main()
