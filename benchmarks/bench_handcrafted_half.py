"""Which model should read the radiomics-style features in the fusion (its handcrafted half)?

The fused model (``model.fusion: radiomics``) reads the radiomics-style features with the radiomics
baselines' logistic regression (``baselines.lr_pipeline``), so a fold that keeps the network's weight
at 0 *is* the ``radiomics_lr`` baseline. On cohorts where the ``radiomics_rf`` baseline beats the
logistic regression, the fused model can then only match the forest if the network makes up the
difference. This script asks whether another handcrafted half would be at least as good as *both*
baselines on every cohort: each candidate is fitted on each fold's training patients (``cv``'s own
folds, ``splits.json``) from the run's ``baselines/features.csv``, and scored by pooled out-of-fold
ROC AUC over the lesions not too small to characterise, next to the two baselines computed here in
the same run (references).

Candidates, every choice made on the fold's training patients only (inner patient folds):
  * ``lr+rf mean``: the mean of the two baselines' probabilities (no choice made)
  * ``lr+rf chosen``: their logits mixed with a weight chosen as the fusion chooses the network's
    (``fusion.choose_alpha``: NLL on inner out-of-fold logits, one-standard-error rule, patients as
    the unit), the forest's logits temperature-scaled on the same out-of-fold logits first
  * ``lr C by cv``: the logistic regression with C chosen by inner grouped CV (log loss)
  * ``l1 lr C by cv``: the same with an L1 penalty
  * ``spline lr``: an additive model (per-feature quadratic splines, 4 knots) read by a logistic regression
  * ``gbm``: histogram gradient boosting (depth 3, 200 trees, learning rate 0.05)

    python benchmarks/bench_handcrafted_half.py RUN [RUN ...]

RUN: a folder of ``liverlesion cv`` or ``liverlesion baselines`` (``splits.json`` and
``baselines/features.csv``). About a minute per 230-lesion run on 2 CPU cores (the forests dominate).
Results: benchmarks/README.md, "The handcrafted half".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import cpu_info
from scipy.special import logit
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import SplineTransformer, StandardScaler

from liverlesion.baselines import lr_pipeline, rf_pipeline
from liverlesion.config import load_config
from liverlesion.decision import too_small_rows
from liverlesion.fusion import (
    choose_alpha,
    cross_fitted_radiomics,
    handcrafted_half,
    handcrafted_logits,
    inner_patient_splits,
)
from liverlesion.inference import fit_temperature

REFERENCES = ("radiomics_lr", "radiomics_rf")


def _z(p: np.ndarray) -> np.ndarray:
    """Two-class logits ``(n, 2)`` of positive-class probabilities (as the fusion's halves are held)."""
    z = logit(np.clip(p, 1e-4, 1 - 1e-4))
    return np.c_[-z / 2, z / 2]


def _grid(pipe, grid: dict, groups: np.ndarray) -> GridSearchCV:
    return GridSearchCV(pipe, grid, scoring="neg_log_loss", cv=GroupKFold(min(5, len(set(groups)))))


def _candidates(seed: int) -> dict:
    """name -> fit(x, y, groups) returning a fitted model with predict_proba."""

    def lr_cv(x, y, g):
        return _grid(lr_pipeline(seed), {"lr__C": [0.01, 0.03, 0.1, 0.3, 1, 3, 10]}, g).fit(x, y, groups=g)

    def l1_cv(x, y, g):
        pipe = lr_pipeline(seed).set_params(lr__penalty="l1", lr__solver="liblinear")
        return _grid(pipe, {"lr__C": [0.03, 0.1, 0.3, 1, 3]}, g).fit(x, y, groups=g)

    def spline(x, y, g):
        return Pipeline(
            [
                ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                ("scale", StandardScaler()),
                ("spline", SplineTransformer(n_knots=4, degree=2, extrapolation="linear")),
                ("scale2", StandardScaler()),
                ("lr", LogisticRegression(class_weight="balanced", C=0.1, max_iter=5000)),
            ]
        ).fit(x, y)

    def gbm(x, y, g):
        return HistGradientBoostingClassifier(
            max_depth=3, learning_rate=0.05, max_iter=200, class_weight="balanced", random_state=seed
        ).fit(x, y)

    return {"lr C by cv": lr_cv, "l1 lr C by cv": l1_cv, "spline lr": spline, "gbm": gbm}


def _lr_rf_chosen(x, y, g, x_test, seed: int) -> tuple[np.ndarray, float]:
    """LR and RF logits mixed with a weight chosen on inner patient folds, as the fusion does.

    The LR half is the fusion's own with ``model.fusion: radiomics`` (``fusion.handcrafted_half``).
    """
    splits = inner_patient_splits(g)
    zl = cross_fitted_radiomics(x, y, splits, 2, seed, vote=False)
    zr = np.zeros((len(y), 2))
    for tr, te in splits:
        zr[te] = _z(rf_pipeline(seed).fit(x[tr], y[tr]).predict_proba(x[te])[:, 1])
    t_rf = float(fit_temperature(zr, y))
    alpha, t, _ = choose_alpha(zr / t_rf, zl, y, g)
    lt = handcrafted_logits(handcrafted_half(x, y, 2, seed, vote=False), x_test)
    rt = _z(rf_pipeline(seed).fit(x, y).predict_proba(x_test)[:, 1]) / t_rf
    z = (alpha * rt + (1 - alpha) * lt) / t
    return 1 / (1 + np.exp(z[:, 0] - z[:, 1])), alpha


def run(run_dir: Path) -> dict:
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else load_config()
    pos, seed = cfg.eval.positive_class, cfg.train.seed
    table = pd.read_csv(run_dir / "baselines" / "features.csv", dtype={"patient_id": str, "lesion_id": str})
    splits = json.loads((run_dir / "splits.json").read_text())["splits"]
    names = [c for c in table.columns if c not in ("lesion_id", "patient_id", "lesion_class")]
    x = table[names].to_numpy(float)
    x = np.where(np.isfinite(x), x, np.nan)
    y = (table["lesion_class"].astype(str) == pos).to_numpy().astype(int)
    groups = table["patient_id"].astype(str).to_numpy()
    keep = ~too_small_rows(table, cfg.eval.min_size_mm)
    cands = _candidates(seed)
    probs = {n: np.full(len(y), np.nan) for n in [*REFERENCES, "lr+rf mean", "lr+rf chosen", *cands]}
    weights = []
    t0 = time.time()
    for s in splits:
        test = np.isin(groups, s["test_patients"])
        tr = ~test
        probs["radiomics_lr"][test] = lr_pipeline(seed).fit(x[tr], y[tr]).predict_proba(x[test])[:, 1]
        probs["radiomics_rf"][test] = rf_pipeline(seed).fit(x[tr], y[tr]).predict_proba(x[test])[:, 1]
        probs["lr+rf mean"][test] = (probs["radiomics_lr"][test] + probs["radiomics_rf"][test]) / 2
        probs["lr+rf chosen"][test], a = _lr_rf_chosen(x[tr], y[tr], groups[tr], x[test], seed)
        weights.append(a)
        for n, fit in cands.items():
            model = fit(x[tr], y[tr], groups[tr])
            probs[n][test] = model.predict_proba(x[test])[:, 1]
    auc = {n: float(roc_auc_score(y[keep], p[keep])) for n, p in probs.items()}
    return {"run": str(run_dir), "lesions": int(keep.sum()), "auc": auc, "rf_weight": weights,
            "seconds": round(time.time() - t0)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="folders of `liverlesion cv` or `baselines` runs")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    print(json.dumps({"machine": cpu_info()}))
    results = [run(r) for r in args.runs]
    names = list(results[0]["auc"])
    print(
        "\npooled out-of-fold ROC AUC (lesions not too small to characterise); Δ = candidate − best reference"
    )
    print("| run | lesions | " + " | ".join(names) + " | weight of RF in `lr+rf chosen` |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for r in results:
        best = max(r["auc"][n] for n in REFERENCES)
        cells = [f"{v:.3f}" if n in REFERENCES else f"{v:.3f} ({v - best:+.3f})" for n, v in r["auc"].items()]
        w = ", ".join(f"{a:g}" for a in r["rf_weight"])
        print(f"| {Path(r['run']).name} | {r['lesions']} | " + " | ".join(cells) + f" | {w} |")
    for n in names:
        if n in REFERENCES:
            continue
        ok = sum(r["auc"][n] >= max(r["auc"][m] for m in REFERENCES) for r in results)
        print(f"{n}: at or above both references on {ok} of {len(results)} runs")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
