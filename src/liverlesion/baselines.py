"""Baselines on the same patient-level folds as the network.

* ``mean_hu``: the lesion's mean attenuation alone. A logistic regression on mean HU
  gives probabilities; for two classes the predicted class comes from the HU cut-off
  that maximises Youden's J on the fold's training patients.
* ``radiomics_lr`` / ``radiomics_rf``: radiomics-style features (first-order HU
  statistics, GLCM texture, shape and margin) with a scaled logistic regression or a
  random forest, both class-balanced.

Every model is fitted on a fold's training patients (``train_patients`` +
``val_patients``) and predicts that fold's test patients, so the out-of-fold
``predictions.csv`` files compare directly with the network's. Each baseline also
writes ``val_predictions.csv``: a model fitted on ``train_patients`` only predicts the
inner-validation patients, so ``evaluate`` can choose the baselines' thresholds
exactly as it does the network's.

The radiomics-style features are :func:`liverlesion.features.extract_features` of the patch
cache (``hu`` and ``mask`` arrays of each npz, see docs/ARCHITECTURE.md) plus the lesion
table's 3-D measurements.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, runs
from liverlesion.decision import check_some_classified
from liverlesion.errors import UserError
from liverlesion.features import TABLE_FEATURES, extract_features, frozen_features, frozen_table
from liverlesion.fileio import write_csv, write_json
from liverlesion.patch_cache import build_patches, load_patch_index
from liverlesion.predictions import write_predictions

BASELINES = ("mean_hu", "radiomics_lr", "radiomics_rf", "frozen_lr")
RF_TREES = 300  # random forest size


# --------------------------------------------------------------------------- models
def lr_pipeline(seed: int):
    """Median imputation, standardisation, class-balanced logistic regression (the LR baselines and fusion)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline(
        [
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
            ("lr", LogisticRegression(class_weight="balanced", max_iter=5000, random_state=seed)),
        ]
    )


def rf_pipeline(seed: int):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    return Pipeline(
        [
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            (
                "rf",
                RandomForestClassifier(
                    n_estimators=RF_TREES,
                    class_weight="balanced",
                    random_state=seed,
                    n_jobs=1,  # the CV loop is cheap; leave the cores to whoever shares the workstation
                    min_samples_leaf=2,
                ),
            ),
        ]
    )


def _youden_cut(x: np.ndarray, y_pos: np.ndarray, higher_is_positive: bool) -> float:
    """HU cut-off maximising sensitivity + specificity on the training lesions (midpoints between values)."""
    s = x if higher_is_positive else -x
    xs = np.unique(s)
    cuts = np.concatenate([[xs[0] - 1.0], (xs[:-1] + xs[1:]) / 2, [xs[-1] + 1.0]])
    pos, neg = y_pos.sum(), (~y_pos).sum()
    j = [((s > c) & y_pos).sum() / pos + ((s <= c) & ~y_pos).sum() / neg for c in cuts]
    best = float(cuts[int(np.argmax(j))])
    return best if higher_is_positive else -best


def _proba(model, X: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Probabilities in ``classes`` order (a class absent from training gets 0)."""
    p = model.predict_proba(X)
    out = np.zeros((len(X), len(classes)))
    for j, c in enumerate(model.classes_):
        out[:, classes.index(c)] = p[:, j]
    return out


class _Fitted:
    """One baseline fitted on one set of patients."""

    def __init__(self, name: str, features: list[str], classes: list[str], positive: str, seed: int):
        self.name, self.features, self.classes, self.positive, self.seed = (
            name,
            features,
            classes,
            positive,
            seed,
        )
        self.info: dict[str, Any] = {}

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> _Fitted:
        self.model = rf_pipeline(self.seed) if self.name == "radiomics_rf" else lr_pipeline(self.seed)
        self.model.fit(X[self.features], y)
        if self.name == "mean_hu" and len(self.classes) == 2:
            x = X[self.features[0]].to_numpy(float)
            ok = np.isfinite(x)
            y_pos = np.asarray(y)[ok] == self.positive
            coef = float(self.model.named_steps["lr"].coef_.ravel()[0])
            # sklearn's binary coefficient favours classes_[1]
            higher = (coef > 0) == (self.model.classes_[1] == self.positive)
            self.info = {"threshold_hu": _youden_cut(x[ok], y_pos, higher), "positive_above": bool(higher)}
        return self

    def predict(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        probs = _proba(self.model, X[self.features], self.classes)
        pred = np.array(self.classes, dtype=object)[probs.argmax(1)]
        if self.info:  # mean HU, two classes: the training-set cut-off decides
            x = X[self.features[0]].to_numpy(float)
            above = x > self.info["threshold_hu"]
            is_pos = above if self.info["positive_above"] else ~above
            other = next(c for c in self.classes if c != self.positive)
            pred = np.where(np.isfinite(x), np.where(is_pos, self.positive, other), pred)
        return probs, pred


def fit_predict(
    name: str,
    features: list[str],
    classes: list[str],
    positive: str,
    seed: int,
    train: pd.DataFrame,
    predict: pd.DataFrame,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit ``name`` on ``train`` and predict ``predict`` (kept as one function so tests can watch it)."""
    fitted = _Fitted(name, features, classes, positive, seed).fit(train, train["lesion_class"].to_numpy())
    probs, pred = fitted.predict(predict)
    return probs, pred, fitted.info


def _frame(
    rows: pd.DataFrame, classes: list[str], probs: np.ndarray, pred: np.ndarray, fold: int
) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "patient_id": rows["patient_id"].astype(str).to_numpy(),
            "lesion_id": rows["lesion_id"].astype(str).to_numpy(),
            "true_class": rows["lesion_class"].astype(str).to_numpy(),
        }
    )
    for j, c in enumerate(classes):
        out[f"prob_{c}"] = np.round(probs[:, j], 6)
    out["pred_class"] = pred
    out["fold"] = fold
    for c in ("max_axial_diameter_mm", "volume_ml"):
        out[c] = rows[c].to_numpy() if c in rows.columns else np.nan
    return out


def _check_inputs(table: pd.DataFrame, splits: dict[str, Any], positive_class: str) -> list[str]:
    missing = [c for c in ("lesion_id", "patient_id", "lesion_class") if c not in table.columns]
    if missing:
        raise UserError(
            f"lesion table: missing column(s) {', '.join(missing)}; pass the table from `inspect`/patches"
        )
    if table.empty:
        raise UserError("lesion table: no lesions; check the manifest with `liverlesion inspect`")
    classes = sorted(table["lesion_class"].astype(str).unique())
    if len(classes) < 2:
        raise UserError(
            f"lesion table: only one class {classes}; the baselines need at least two lesion classes"
        )
    if positive_class not in classes:
        raise UserError(
            f"positive class {positive_class!r} is not among the classes {classes}; use one of them"
        )
    if table["lesion_id"].astype(str).duplicated().any():
        dup = table["lesion_id"][table["lesion_id"].astype(str).duplicated()].iloc[0]
        raise UserError(f"lesion table: lesion_id {dup!r} appears twice; rebuild the table")
    in_splits = {str(p) for s in splits["splits"] for p in s["test_patients"]}
    absent = sorted(set(table["patient_id"].astype(str)) - in_splits)
    if absent:
        raise UserError(
            f"splits: patient(s) {', '.join(absent[:5])} are in no test fold; the splits do not match this lesion "
            "table, delete splits.json to create new ones"
        )
    return classes


def run_baselines(
    lesion_table: pd.DataFrame,
    patch_dir: Path | None,
    splits: dict[str, Any],
    out: Path,
    positive_class: str = "metastasis",
    seed: int = 0,
    extractor: str = "skimage",
    frozen: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Fit and score the baselines on the given patient-level folds.

    ``frozen`` (``lesion_id`` + ``deep_*`` columns: frozen ImageNet features of each lesion's patch)
    adds ``frozen_lr``, a logistic regression on them: it shows whether training the network added
    anything over what the pretrained backbone already knows.

    Args:
        lesion_table: One row per lesion (lesion table or patch index): ``lesion_id``,
            ``patient_id``, ``lesion_class``, ``hu_mean``, shape columns.
        patch_dir: Patch cache for the radiomics features; ``None`` runs ``mean_hu`` only.
        splits: From :func:`liverlesion.splits.make_splits` / ``splits.json``.
        out: Folder for ``<name>/predictions.csv``, ``<name>/val_predictions.csv``,
            ``<name>/baseline.json`` and ``features.csv``.
        positive_class: Class whose mean-HU cut-off is chosen (two-class case).
        seed: Random forest / solver seed.
        extractor: Feature extractor, ``skimage`` or ``pyradiomics``.

    Returns:
        ``{name: path of predictions.csv}``.
    """
    out = Path(out)
    table = lesion_table.copy()
    table["lesion_id"] = table["lesion_id"].astype(str)
    table["patient_id"] = table["patient_id"].astype(str)
    classes = _check_inputs(table, splits, positive_class)

    features: dict[str, list[str]] = {}
    if "hu_mean" not in table.columns and patch_dir is None:
        raise UserError(
            "lesion table has no hu_mean column and no patch folder was given; pass the patch cache"
        )
    if patch_dir is not None:
        feats = extract_features(patch_dir, extractor)
        unknown = sorted(set(table["lesion_id"]) - set(feats["lesion_id"]))
        if unknown:
            raise UserError(
                f"patch folder {patch_dir}: no patch for lesion(s) {', '.join(unknown[:5])}; rebuild the patches "
                "from the same manifest"
            )
        feats = feats.set_index("lesion_id")
        table = table.drop(columns=[c for c in feats.columns if c in table.columns]).join(
            feats, on="lesion_id"
        )
        radiomic = list(feats.columns)
        shape = [c for c in TABLE_FEATURES if c in table.columns]
        for c in shape:
            table[c] = pd.to_numeric(table[c], errors="coerce")
        if {"min_axis_mm", "max_axial_diameter_mm"} <= set(shape):
            # elongation: 1 for a sphere, small for a flat or elongated lesion
            table["shape3d_axis_ratio"] = table["min_axis_mm"] / table["max_axial_diameter_mm"].where(
                table["max_axial_diameter_mm"] > 0
            )
            shape.append("shape3d_axis_ratio")
        features["radiomics_lr"] = features["radiomics_rf"] = radiomic + shape
        write_csv(out / "features.csv", table[["lesion_id", "patient_id", "lesion_class", *radiomic, *shape]])
    if frozen is not None:
        deep = [c for c in frozen.columns if c != "lesion_id"]
        table = table.drop(columns=[c for c in deep if c in table.columns]).join(
            frozen.assign(lesion_id=frozen["lesion_id"].astype(str)).set_index("lesion_id"), on="lesion_id"
        )
        features["frozen_lr"] = deep
    if "hu_mean" in table.columns:  # mean over the whole 3-D lesion
        table["hu_mean"] = pd.to_numeric(table["hu_mean"], errors="coerce")
        features["mean_hu"] = ["hu_mean"]
    else:  # mean over the patch's lesion pixels
        features["mean_hu"] = ["fo_mean"]
    names = [n for n in BASELINES if n in features]

    test_frames: dict[str, list[pd.DataFrame]] = {n: [] for n in names}
    val_frames: dict[str, list[pd.DataFrame]] = {n: [] for n in names}
    fold_info: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    seen: set[str] = set()
    for s in splits["splits"]:
        k = int(s["fold"])
        fit_p, val_p, test_p = (
            set(map(str, s[key])) for key in ("train_patients", "val_patients", "test_patients")
        )
        assert not (fit_p | val_p) & test_p, f"fold {k}: a test patient is also a training patient"
        train = table[table["patient_id"].isin(fit_p | val_p)]
        fit = table[table["patient_id"].isin(fit_p)]
        val = table[table["patient_id"].isin(val_p)]
        test = table[table["patient_id"].isin(test_p)]
        assert not set(train["patient_id"]) & set(test["patient_id"]), (
            f"fold {k}: patient leak into the test fold"
        )
        assert not seen & set(test["lesion_id"]), f"fold {k}: a lesion is in two test folds"
        seen |= set(test["lesion_id"])
        if test.empty:
            continue
        for part, rows in (("training", train), ("inner-training", fit)):
            if rows["lesion_class"].nunique() < 2:
                raise UserError(
                    f"fold {k}: the {part} patients hold only class {sorted(set(rows['lesion_class']))}; "
                    "use fewer folds (cv.folds) or more patients"
                )
        for n in names:
            probs, pred, info = fit_predict(n, features[n], classes, positive_class, seed, train, test)
            test_frames[n].append(_frame(test, classes, probs, pred, k))
            fold_info[n].append({"fold": k, **info})
            if not val.empty:
                vp, vpred, _ = fit_predict(n, features[n], classes, positive_class, seed, fit, val)
                val_frames[n].append(_frame(val, classes, vp, vpred, k))
    assert seen == set(table["lesion_id"]), "some lesions got no out-of-fold prediction"

    paths: dict[str, Path] = {}
    for n in names:
        folder = out / n
        paths[n] = write_predictions(
            runs.predictions_path(folder), pd.concat(test_frames[n], ignore_index=True)
        )
        if val_frames[n]:
            write_predictions(runs.val_predictions_path(folder), pd.concat(val_frames[n], ignore_index=True))
        write_json(
            folder / "baseline.json",
            {
                "name": n,
                "disclaimer": DISCLAIMER,
                "classes": classes,
                "positive_class": positive_class,
                "features": features[n],
                "extractor": extractor if n != "mean_hu" else None,
                "model": _describe(n),
                "fitted_on": "each fold's train_patients + val_patients; val_predictions.csv: train_patients only",
                "folds": fold_info[n],
            },
        )
    return paths


def _describe(name: str) -> str:
    return {
        "frozen_lr": "LogisticRegression(class_weight=balanced) on standardised frozen ImageNet backbone "
        "features (global average pooled) of the lesion patch",
        "mean_hu": "LogisticRegression(class_weight=balanced) on standardised mean HU; "
        "two classes: Youden-optimal HU cut-off on the training patients gives pred_class",
        "radiomics_lr": "SimpleImputer(median) + StandardScaler + LogisticRegression(class_weight=balanced)",
        "radiomics_rf": f"SimpleImputer(median) + RandomForestClassifier(n_estimators={RF_TREES}, "
        "class_weight=balanced, min_samples_leaf=2)",
    }[name]


# --------------------------------------------------------------------------- CLI
def _simple_metrics(df: pd.DataFrame, classes: list[str], positive: str) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    y = df["true_class"].astype(str).to_numpy()
    probs = df[[f"prob_{c}" for c in classes]].to_numpy(float)
    out = {
        "accuracy": float(accuracy_score(y, df["pred_class"].astype(str))),
        "balanced_accuracy": float(balanced_accuracy_score(y, df["pred_class"].astype(str))),
    }
    try:
        if len(classes) == 2:
            out["roc_auc"] = float(roc_auc_score(y == positive, probs[:, classes.index(positive)]))
        else:
            out["roc_auc"] = float(roc_auc_score(y, probs, multi_class="ovr", labels=classes))
    except ValueError:  # one class only in the data
        out["roc_auc"] = math.nan
    return out


def _metrics_table(paths: dict[str, Path], classes: list[str], cfg) -> tuple[str, dict[str, Any]]:
    summarize: Callable[..., dict[str, Any]] | None
    try:  # local: guarded by the ImportError fallback below
        from liverlesion.metrics import metric_label
        from liverlesion.scoring import summarize_predictions
        from liverlesion.summary import fmt_ci, format_table

        summarize = summarize_predictions
    except ImportError:  # evaluate.py not available: point estimates from scikit-learn
        summarize = None
        metric_label = str
    keys = ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")
    results: dict[str, Any] = {}
    rows = []
    for name, path in paths.items():
        df = pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str, "true_class": str})
        if summarize is not None:
            val_path = runs.val_predictions_path(path.parent)
            val = (
                pd.read_csv(val_path, dtype={"patient_id": str, "lesion_id": str})
                if val_path.is_file()
                else None
            )
            res = summarize(
                df,
                cfg.eval.positive_class,
                classes,
                val,
                n_bootstrap=cfg.eval.n_bootstrap,
                threshold=cfg.eval.threshold if val is not None else 0.5,
                seed=cfg.cv.seed,
                detail=False,
                name=name,
            )
            results[name] = res
            rows.append([name, *(fmt_ci(res["metrics"].get(k)) for k in keys)])
        else:
            res = _simple_metrics(df, classes, cfg.eval.positive_class)
            results[name] = res
            rows.append([name, *(f"{res[k]:.3f}" if k in res else "n/a" for k in keys)])
    header = ["baseline", *(metric_label(k) for k in keys)]
    if summarize is not None:
        table = format_table(header, rows) + (
            f"\n95% CIs from {cfg.eval.n_bootstrap} patient-level bootstrap resamples; thresholds "
            f"({cfg.eval.threshold}) chosen per fold on the inner-validation patients, as for the network"
        )
    else:
        table = (
            "\n".join("  ".join(map(str, r)) for r in [header, *rows]) + "\n(point estimates, threshold 0.5)"
        )
    return table, results


def frozen_lr_table(cfg, patch_dir: Path, table: pd.DataFrame) -> pd.DataFrame | None:
    """Frozen ImageNet features of every lesion (the ``frozen_lr`` baseline); None without ImageNet weights."""
    if str(cfg.model.weights).lower() != "imagenet":
        print("frozen_lr: skipped (model.weights is not imagenet)")
        return None
    from liverlesion.data import load_patch_arrays  # local: heavy (torch)
    from liverlesion.model import build_model  # local: heavy (torch)

    arrays = load_patch_arrays(
        patch_dir, table
    )  # image only: the baseline pools globally whatever model.pool is
    model, init = build_model(
        dataclasses.replace(cfg.model, pool="global"), num_classes=2, in_chans=int(arrays[0].shape[1])
    )
    print(f"frozen_lr: pooled {cfg.model.backbone} features ({init}) of {len(arrays)} lesions")
    return frozen_table(table["lesion_id"], frozen_features(model, arrays))


def check_run_folder(out: Path, patients: set[str] | None = None, lesions: set[str] | None = None) -> None:
    """Refuse to add baselines to a run folder whose ``predictions.csv`` holds other patients or lesions.

    ``evaluate`` compares the baselines with that file lesion by lesion, so baselines of another cohort
    written there could only be refused later (after patches and fits).

    Args:
        out: The output folder (a ``cv`` run folder, or a new one).
        patients: The manifest's patients (before any work): the run's must all be among them.
        lesions: The patch index's lesions (before the fits): they must be the run's.

    Raises:
        UserError: The run folder's predictions are of other patients or lesions.
    """
    runs.check_run_slots(out)
    pred = runs.predictions_path(out)
    if not pred.is_file():
        return
    try:
        have = pd.read_csv(pred, usecols=["patient_id", "lesion_id"], dtype=str)
    except (ValueError, OSError, pd.errors.ParserError):
        return  # a damaged file is evaluate's to report, with its own message
    fix = "give another -o folder, or the manifest that run was made from"
    if patients is not None:
        extra = sorted(set(have["patient_id"].dropna()) - patients)
        if extra:
            raise UserError(
                f"-o {out}: its {pred.name} is of patients not in this manifest ({', '.join(extra[:3])}"
                f"{', ...' if len(extra) > 3 else ''}); baselines of this manifest there would not match "
                f"that run's lesions; {fix}"
            )
    if lesions is not None:
        theirs = set(have["lesion_id"].dropna())
        if theirs != lesions:
            odd = sorted(theirs ^ lesions)
            raise UserError(
                f"-o {out}: its {pred.name} has {len(theirs)} lesions, this manifest {len(lesions)}, "
                f"{len(odd)} in only one of them (e.g. {', '.join(odd[:3])}); baselines of this manifest "
                f"there would not match that run's lesions; {fix}"
            )


def run_baselines_cli(manifest: str | Path, out: str | Path, cfg) -> dict[str, Path]:
    """``liverlesion baselines``: patches, splits, baselines and a metrics table.

    Args:
        manifest: Manifest CSV.
        out: Output folder (patch cache in ``out/patches``, ``splits.json``, ``baselines/``).
        cfg: Resolved :class:`~liverlesion.config.Config`.

    Returns:
        ``{name: path of predictions.csv}``.
    """
    from liverlesion.manifest import read_manifest
    from liverlesion.run_checks import (  # local: heavy (torch, in resolve_init)
        check_manifest_folds,
        check_positive_setting,
        class_names_from,
        resolve_init,
    )
    from liverlesion.splits import load_or_create_splits  # local: heavy (sklearn)

    manifest, out = Path(manifest), Path(out)
    if not manifest.is_file():
        raise UserError(f"manifest {manifest}: file not found; give the path of a manifest CSV")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; give a folder for the baseline results")
    # Validate, then work: the folds the patients can fill and, for frozen_lr, the network and its weights.
    df = read_manifest(manifest)
    check_run_folder(out, patients=set(df["patient_id"].astype(str)))
    check_positive_setting(cfg, class_names_from(df))
    check_manifest_folds(df, cfg)
    if str(cfg.model.weights).lower() == "imagenet":  # otherwise frozen_lr is skipped: no network needed
        resolve_init(cfg)
    print(f"liverlesion baselines: {DISCLAIMER}")
    # The patch index is the lesion table plus the npz file of each lesion: reading the
    # volumes once gives both.
    patch_dir = Path(build_patches(manifest, runs.patches_dir(out), cfg.patch))
    table = load_patch_index(patch_dir)
    check_run_folder(out, lesions=set(table["lesion_id"].astype(str)))
    check_some_classified(table, cfg.eval.min_size_mm)
    splits = load_or_create_splits(
        runs.splits_path(out), table, cfg.cv.folds, cfg.cv.seed, cfg.train.val_fraction
    )
    classes = sorted(table["lesion_class"].astype(str).unique())
    print(
        f"{len(table)} lesions, {table['patient_id'].nunique()} patients, classes {classes}; "
        f"{cfg.cv.folds}-fold patient-level CV (same splits.json as `liverlesion cv` with this config)"
    )
    paths = run_baselines(
        table,
        patch_dir,
        splits,
        runs.baselines_dir(out),
        positive_class=cfg.eval.positive_class,
        seed=cfg.cv.seed,
        frozen=frozen_lr_table(cfg, patch_dir, table),
    )
    text, results = _metrics_table(paths, classes, cfg)
    write_json(
        runs.baseline_summary_path(out),
        {
            "disclaimer": DISCLAIMER,
            "positive_class": cfg.eval.positive_class,
            "classes": classes,
            "baselines": results,
        },
    )
    print(text)
    print(f"Wrote {', '.join(str(p) for p in paths.values())}")
    return paths
