"""Evaluation: metrics vs scikit-learn, validation-only thresholds, temperature scaling,
patient-level bootstrap, paired test, multi-class path and the run-folder entry point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from sklearn import metrics as skm

from liverlesion import DISCLAIMER
from liverlesion.bootstrap import paired_auc_test, patient_bootstrap, pr_interp, roc_step
from liverlesion.calibration import expected_calibration_error
from liverlesion.decision import choose_threshold
from liverlesion.errors import UserError
from liverlesion.evaluate import evaluate_run
from liverlesion.inference import fit_temperature
from liverlesion.metrics import average_precision, binary_metrics, multiclass_metrics, roc_auc
from liverlesion.scoring import size_bin, summarize_predictions

BIN = ["cyst", "metastasis"]


# --------------------------------------------------------------------------- synthetic run files
def synth_predictions(
    seed: int,
    n_patients: int = 24,
    classes: list[str] = BIN,
    folds: int = 3,
    signal: float = 2.0,
    scale: float = 1.0,
    prefix: str = "P",
    fold_of=None,
) -> pd.DataFrame:
    """Rows in the predictions.csv contract: 1-3 lesions per patient, logits = signal on the true class."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        pid = f"{prefix}{p:03d}"
        for j in range(int(rng.integers(1, 4))):
            true = int(rng.integers(0, len(classes)))
            logits = rng.normal(0, 1, len(classes))
            logits[true] += signal
            logits *= scale
            probs = softmax(logits)
            row = {"patient_id": pid, "lesion_id": f"{pid}-L{j + 1:02d}", "true_class": classes[true]}
            row.update({f"prob_{c}": probs[i] for i, c in enumerate(classes)})
            row.update({f"logit_{c}": logits[i] for i, c in enumerate(classes)})
            row["pred_class"] = classes[int(np.argmax(probs))]
            row["fold"] = p % folds if fold_of is None else fold_of
            row["max_axial_diameter_mm"] = float(rng.uniform(4, 40))
            row["volume_ml"] = float(rng.uniform(0.05, 30))
            rows.append(row)
    return pd.DataFrame(rows)


def synth_val(seed: int, folds: int = 3, classes: list[str] = BIN, **kw) -> pd.DataFrame:
    """Inner-validation predictions: for each fold, other patients, same generator."""
    return pd.concat(
        [
            synth_predictions(
                seed + 100 * k, n_patients=10, classes=classes, prefix=f"V{k}_", fold_of=k, **kw
            )
            for k in range(folds)
        ],
        ignore_index=True,
    )


def write_run(
    run: Path,
    test: pd.DataFrame,
    val: pd.DataFrame | None = None,
    n_bootstrap: int = 40,
    baselines: dict[str, pd.DataFrame] | None = None,
    classes: list[str] = BIN,
) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    test.to_csv(run / "predictions.csv", index=False)
    if val is not None:
        val.to_csv(run / "val_predictions.csv", index=False)
    (run / "config.yaml").write_text(f"eval:\n  n_bootstrap: {n_bootstrap}\n  gradcam_max: 4\n")
    (run / "run.json").write_text(
        json.dumps(
            {
                "kind": "cv",
                "manifest": "/data/manifest.csv",
                "class_names": classes,
                "backbone": "resnet18",
                "init": "none (random)",
            }
        )
    )
    for name, df in (baselines or {}).items():
        (run / "baselines" / name).mkdir(parents=True, exist_ok=True)
        df.to_csv(run / "baselines" / name / "predictions.csv", index=False)
    return run


def baseline_from(test: pd.DataFrame, seed: int, noise: float, classes: list[str] = BIN) -> pd.DataFrame:
    """A weaker method on the same lesions, without logit columns (as baselines may be)."""
    rng = np.random.default_rng(seed)
    y = test["true_class"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    z = rng.normal(0, noise, (len(test), len(classes)))
    z[np.arange(len(test)), y] += 1.0
    p = softmax(z, axis=1)
    df = test[["patient_id", "lesion_id", "true_class"]].copy()
    for i, c in enumerate(classes):
        df[f"prob_{c}"] = p[:, i]
    df["pred_class"] = [classes[i] for i in p.argmax(1)]
    for c in ("fold", "max_axial_diameter_mm", "volume_ml"):
        df[c] = test[c]
    return df


# --------------------------------------------------------------------------- metric functions
Y = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.6, 0.55, 0.2, 0.7, 0.3, 0.45, 0.05])


def test_binary_metrics_agree_with_sklearn():
    m = binary_metrics(Y, P, threshold=0.5)
    yp = (P >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y, yp))
    assert m["f1"] == pytest.approx(skm.f1_score(Y, yp))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(Y, yp))
    assert m["specificity"] == pytest.approx(skm.recall_score(Y, yp, pos_label=0))
    assert m["ppv"] == pytest.approx(skm.precision_score(Y, yp))
    assert m["npv"] == pytest.approx(skm.precision_score(Y, yp, pos_label=0))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y, yp))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(Y, P))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(Y, P))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(Y, P))
    assert m["nll"] == pytest.approx(skm.log_loss(Y, P))
    # A different threshold changes the count metrics, not the ranking metrics.
    m2 = binary_metrics(Y, P, threshold=0.3)
    assert m2["sensitivity"] == pytest.approx(skm.recall_score(Y, (P >= 0.3).astype(int)))
    assert m2["roc_auc"] == m["roc_auc"]


def test_ranking_metrics_equal_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for n in (5, 17, 60, 200):
        for _ in range(10):
            y = rng.integers(0, 2, n)
            if y.min() == y.max():
                continue
            s = np.round(rng.uniform(0, 1, n), 1)  # rounded: many tied scores
            assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
            assert average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
            fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
            grid = np.linspace(0, 1, 101)
            step = roc_step(y, s)
            for g, t in zip(grid, step, strict=True):  # the staircase: best TPR reachable at FPR <= g
                assert t == pytest.approx(tpr[fpr <= g + 1e-12].max())
            prec, rec, _ = skm.precision_recall_curve(y, s)
            interp = pr_interp(y, s)
            for g, pr in zip(grid, interp, strict=True):
                assert pr == pytest.approx(prec[rec >= g - 1e-12].max())


def test_binary_metrics_undefined_with_one_class_are_nan():
    m = binary_metrics(np.zeros(4, int), np.array([0.1, 0.2, 0.7, 0.3]))
    assert math.isnan(m["roc_auc"]) and math.isnan(m["sensitivity"]) and math.isnan(m["pr_auc"])
    assert m["specificity"] == pytest.approx(0.75)


def test_multiclass_metrics_agree_with_sklearn():
    rng = np.random.default_rng(3)
    y = np.tile([0, 1, 2], 10)
    probs = softmax(rng.normal(0, 1, (30, 3)) + 1.5 * np.eye(3)[y], axis=1)
    names = ["cyst", "hcc", "metastasis"]
    m = multiclass_metrics(y, probs, names)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["brier"] == pytest.approx(np.mean(np.sum((probs - np.eye(3)[y]) ** 2, axis=1)))
    assert m["nll"] == pytest.approx(skm.log_loss(y, probs))
    prec, rec, f1, _ = skm.precision_recall_fscore_support(y, pred)
    for i, c in enumerate(names):
        assert m[f"sensitivity_{c}"] == pytest.approx(rec[i])
        assert m[f"ppv_{c}"] == pytest.approx(prec[i])
        assert m[f"f1_{c}"] == pytest.approx(f1[i])
        assert m[f"roc_auc_{c}"] == pytest.approx(skm.roc_auc_score(y == i, probs[:, i]))
        assert m[f"pr_auc_{c}"] == pytest.approx(skm.average_precision_score(y == i, probs[:, i]))
        assert m[f"specificity_{c}"] == pytest.approx(skm.recall_score(y == i, pred == i, pos_label=False))


def test_ece_equal_width_bins():
    # Bin [0.1, 0.2): mean p 0.1, observed 0.5; bin [0.9, 1]: mean p 0.9, observed 1.0.
    ece = expected_calibration_error(np.array([0, 1, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9]), n_bins=10)
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    calibrated = expected_calibration_error(rng.uniform(0, 1, 20000) < p, p, 10)
    overconfident = expected_calibration_error(
        rng.uniform(0, 1, 20000) < p, np.clip((p - 0.5) * 2 + 0.5, 0, 1), 10
    )
    assert calibrated < 0.02 < overconfident


# --------------------------------------------------------------------------- thresholds
def test_youden_threshold_on_validation_data():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    t = choose_threshold(y, p)
    assert 0.2 < t <= 0.3  # separates the two groups
    assert choose_threshold(y, p, method=0.5) == 0.5
    assert choose_threshold(np.ones(3, int), np.array([0.2, 0.5, 0.9])) == 0.5  # one class: default


def test_threshold_is_chosen_on_validation_not_test():
    # Validation: scores are low overall (best cut ~0.25). Test: shifted up (best cut ~0.72).
    def frame(pos_scores, neg_scores, fold, prefix):
        rows = []
        for i, (s, c) in enumerate(
            [(s, "metastasis") for s in pos_scores] + [(s, "cyst") for s in neg_scores]
        ):
            rows.append(
                {
                    "patient_id": f"{prefix}{i}",
                    "lesion_id": f"{prefix}{i}-L01",
                    "true_class": c,
                    "prob_cyst": 1 - s,
                    "prob_metastasis": s,
                    "fold": fold,
                }
            )
        return pd.DataFrame(rows)

    val = pd.concat([frame([0.3, 0.35, 0.4, 0.5], [0.0, 0.1, 0.15, 0.2], f, f"V{f}_") for f in (0, 1)])
    test = pd.concat([frame([0.75, 0.8, 0.9, 0.95], [0.5, 0.6, 0.65, 0.7], f, f"T{f}_") for f in (0, 1)])
    test_tuned = choose_threshold((test.true_class == "metastasis").astype(int), test.prob_metastasis)
    assert test_tuned > 0.7  # what peeking at test data would give

    s = summarize_predictions(test, "metastasis", BIN, val, n_bootstrap=0)
    for f in ("0", "1"):
        t = s["threshold"]["per_fold"][f]
        assert t["source"] == "inner-validation" and 0.2 < t["threshold"] <= 0.3
    # Applied to test: every test lesion is called positive, so specificity is 0 (a test-tuned cut gives 1).
    assert s["metrics"]["specificity"]["value"] == 0.0
    assert s["metrics"]["sensitivity"]["value"] == 1.0
    assert s["metrics"]["roc_auc"]["value"] == 1.0

    no_val = summarize_predictions(test, "metastasis", BIN, None, n_bootstrap=0)
    assert {v["threshold"] for v in no_val["threshold"]["per_fold"].values()} == {0.5}
    assert any("threshold 0.5" in n for n in no_val["notes"])
    fixed = summarize_predictions(test, "metastasis", BIN, val, n_bootstrap=0, threshold="0.6")
    assert {v["threshold"] for v in fixed["threshold"]["per_fold"].values()} == {0.6}


# --------------------------------------------------------------------------- temperature scaling
def test_temperature_scaling_lowers_nll_on_overconfident_data():
    # Weak signal blown up 4x: overconfident logits, T should come out > 1.
    val = synth_val(1, signal=0.8, scale=4.0)
    test = synth_predictions(2, n_patients=40, signal=0.8, scale=4.0)
    y = val["true_class"].map({"cyst": 0, "metastasis": 1}).to_numpy()
    t = fit_temperature(val[["logit_cyst", "logit_metastasis"]].to_numpy(), y)
    assert t > 1.5
    s = summarize_predictions(test, "metastasis", BIN, val, n_bootstrap=0)
    cal = s["calibration"]
    assert cal["available"] and cal["fitted"]
    assert cal["after"]["nll"] < cal["before"]["nll"]
    assert cal["after"]["brier"] < cal["before"]["brier"]
    for v in s["temperature"]["per_fold"].values():
        assert v["temperature"] > 1 and v["val_nll_after"] < v["val_nll_before"]
    assert sum(b["count"] for b in cal["after"]["bins"]) == len(test)


def test_temperature_recorded_with_the_predictions_is_reported_not_refitted():
    # a fusion model's checkpoint keeps T = 1 (its network half is calibrated before mixing): the
    # report must show the temperature the probabilities were made with, not a refit on validation
    val = synth_val(1, signal=0.8, scale=4.0)  # a refit would give T > 1.5 (test above)
    test = synth_predictions(2, n_patients=40, signal=0.8, scale=4.0).assign(temperature=1.0)
    s = summarize_predictions(test, "metastasis", BIN, val, n_bootstrap=0)
    for v in s["temperature"]["per_fold"].values():
        assert v["temperature"] == 1.0 and v["source"] == "checkpoint"
        assert v["val_nll_after"] == v["val_nll_before"]
    assert s["calibration"]["after"]["nll"] == s["calibration"]["before"]["nll"]
    stored = synth_predictions(2, n_patients=40, signal=0.8, scale=4.0).assign(temperature=2.0)
    s2 = summarize_predictions(stored, "metastasis", BIN, val, n_bootstrap=0)
    assert {v["temperature"] for v in s2["temperature"]["per_fold"].values()} == {2.0}


def test_temperature_below_one_for_underconfident_and_one_for_one_class():
    val = synth_val(3, signal=3.0, scale=0.3)
    y = val["true_class"].map({"cyst": 0, "metastasis": 1}).to_numpy()
    assert fit_temperature(val[["logit_cyst", "logit_metastasis"]].to_numpy(), y) < 1.0
    assert fit_temperature(np.array([[0.0, 3.0], [0.0, 2.0]]), np.array([1, 1])) == 1.0


def test_no_logits_means_no_calibration():
    test = synth_predictions(4).drop(columns=["logit_cyst", "logit_metastasis"])
    s = summarize_predictions(test, "metastasis", BIN, None, n_bootstrap=0)
    assert s["calibration"]["available"] is False
    assert all(v["temperature"] == 1.0 for v in s["temperature"]["per_fold"].values())


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_resamples_whole_patients():
    groups = np.array(["a", "a", "a", "b", "c", "c"])
    sizes = {"a": 3, "b": 1, "c": 2}
    for idx in patient_bootstrap(groups, 20, seed=1):
        drawn = pd.Series(groups[idx]).value_counts()
        assert all(n % sizes[g] == 0 for g, n in drawn.items())  # whole patients only
        assert sum(n // sizes[g] for g, n in drawn.items()) == 3  # as many patients as there are
    a = [i.tolist() for i in patient_bootstrap(groups, 5, seed=7)]
    b = [i.tolist() for i in patient_bootstrap(groups, 5, seed=7)]
    assert a == b


def test_bootstrap_ci_covers_point_and_shrinks_with_more_patients():
    df = synth_predictions(5, n_patients=30, signal=1.5)
    copies = []
    for r in range(4):  # the same cohort four times, as new patients
        d = df.copy()
        d["patient_id"] = d["patient_id"] + f"_r{r}"
        d["lesion_id"] = d["lesion_id"] + f"_r{r}"
        copies.append(d)
    big = pd.concat(copies, ignore_index=True)
    small_s = summarize_predictions(df, "metastasis", BIN, None, n_bootstrap=300, detail=False)
    big_s = summarize_predictions(big, "metastasis", BIN, None, n_bootstrap=300, detail=False)
    for k in ("accuracy", "sensitivity", "roc_auc", "brier"):
        a, b = small_s["metrics"][k], big_s["metrics"][k]
        assert a["value"] == pytest.approx(b["value"])  # same point estimate
        assert a["ci_low"] <= a["value"] <= a["ci_high"]
        assert b["ci_low"] <= b["value"] <= b["ci_high"]
        assert (b["ci_high"] - b["ci_low"]) < 0.75 * (a["ci_high"] - a["ci_low"])
    again = summarize_predictions(df, "metastasis", BIN, None, n_bootstrap=300, detail=False)
    assert again["metrics"]["roc_auc"] == small_s["metrics"]["roc_auc"]  # seeded


def test_one_class_resamples_are_counted_not_used():
    # Only one patient has a positive lesion: many resamples lack it, so AUC is undefined there.
    rows = [
        {
            "patient_id": f"P{i}",
            "lesion_id": f"P{i}-L01",
            "true_class": "cyst",
            "prob_cyst": 0.8 - i / 50,
            "prob_metastasis": 0.2 + i / 50,
            "fold": 0,
        }
        for i in range(6)
    ]
    rows.append(
        {
            "patient_id": "P9",
            "lesion_id": "P9-L01",
            "true_class": "metastasis",
            "prob_cyst": 0.1,
            "prob_metastasis": 0.9,
            "fold": 0,
        }
    )
    s = summarize_predictions(pd.DataFrame(rows), "metastasis", BIN, None, n_bootstrap=200, detail=False)
    auc = s["metrics"]["roc_auc"]
    assert auc["value"] == 1.0
    assert 20 < auc["n_undefined"] < 200
    assert s["metrics"]["specificity"]["n_undefined"] == 0


def test_paired_test_detects_a_better_model_and_not_identical_ones():
    test = synth_predictions(6, n_patients=40, signal=2.5)
    y = test["true_class"].map({"cyst": 0, "metastasis": 1}).to_numpy()
    good = test[["prob_cyst", "prob_metastasis"]].to_numpy()
    rng = np.random.default_rng(0)
    noise = softmax(rng.normal(0, 1, good.shape), axis=1)
    groups = test["patient_id"].to_numpy()
    better = paired_auc_test(y, good, noise, groups, positive_index=1, n_bootstrap=300)
    assert better["difference"] > 0.2 and better["ci_low"] > 0 and better["p_value"] < 0.02
    same = paired_auc_test(y, good, good.copy(), groups, positive_index=1, n_bootstrap=300)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    worse = paired_auc_test(y, noise, good, groups, positive_index=1, n_bootstrap=300)
    assert worse["ci_high"] < 0 and worse["p_value"] < 0.02


# --------------------------------------------------------------------------- breakdowns
def test_size_bins_and_small_strata_have_no_ci():
    assert list(size_bin(np.array([5.0, 9.99, 10.0, 15.0, 20.0, 20.01, np.nan]))) == [
        "<10 mm",
        "<10 mm",
        "10–20 mm",
        "10–20 mm",
        "10–20 mm",
        ">20 mm",
        "unknown",
    ]
    df = synth_predictions(7, n_patients=30)
    df.loc[df.index[:4], "max_axial_diameter_mm"] = 6.0  # a tiny "<10 mm" stratum
    df.loc[df.index[4:], "max_axial_diameter_mm"] = 25.0
    s = summarize_predictions(df, "metastasis", BIN, None, n_bootstrap=60)
    strata = {b["bin"]: b for b in s["size"]}
    assert strata["<10 mm"]["n_lesions"] == 4 and strata["<10 mm"]["metrics"]["accuracy"]["ci_low"] is None
    assert strata["10–20 mm"]["n_lesions"] == 0
    assert strata[">20 mm"]["n_lesions"] == len(df) - 4
    assert strata[">20 mm"]["metrics"]["accuracy"]["ci_low"] is not None
    assert sum(strata[">20 mm"]["n_per_class"].values()) == len(df) - 4


def test_multiclass_path():
    classes = ["cyst", "hcc", "metastasis"]
    test = synth_predictions(8, n_patients=30, classes=classes, signal=2.0)
    val = synth_val(9, classes=classes)
    s = summarize_predictions(test, "metastasis", classes, val, n_bootstrap=50)
    assert s["task"] == "multiclass"
    for k in ("accuracy", "macro_f1", "roc_auc", "brier", "ece", "sensitivity_hcc", "ppv_cyst"):
        assert np.isfinite(s["metrics"][k]["value"])
    assert all(v["threshold"] is None for v in s["threshold"]["per_fold"].values())
    assert np.array(s["confusion_matrix"]["counts"]).sum() == len(test)
    assert s["curves"]["positive_class"] == "metastasis" and "band_low" in s["curves"]["roc"]
    probs = test[[f"prob_{c}" for c in classes]].to_numpy()
    y = test["true_class"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    assert s["metrics"]["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, probs.argmax(1)))


# --------------------------------------------------------------------------- run folder
def test_evaluate_run_writes_metrics_and_prints_table(tmp_path, capsys):
    test = synth_predictions(10, n_patients=30)
    run = write_run(
        tmp_path / "run",
        test,
        synth_val(11),
        baselines={"mean_hu": baseline_from(test, 1, 1.5), "radiomics_lr": baseline_from(test, 2, 0.8)},
    )
    m = evaluate_run(run, gradcam=False)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["disclaimer"] == DISCLAIMER and on_disk["class_names"] == BIN
    assert on_disk["positive_class"] == "metastasis" and on_disk["settings"]["n_bootstrap"] == 40
    assert on_disk["n_lesions"] == len(test) and on_disk["n_patients"] == test["patient_id"].nunique()
    assert set(on_disk["thresholds"]) == {"0", "1", "2"} and set(on_disk["temperatures"]) == {"0", "1", "2"}
    assert set(on_disk["baselines"]) == {"mean_hu", "radiomics_lr"}
    # Baselines without their own inner-validation file are scored at 0.5, never tuned on test.
    assert {v["threshold"] for v in on_disk["baselines"]["mean_hu"]["threshold"]["per_fold"].values()} == {
        0.5
    }
    assert on_disk["baselines"]["mean_hu"]["calibration"]["available"] is False  # no logit columns
    cmp = on_disk["comparison"]
    assert cmp["b"] == max(m["baselines"], key=lambda n: m["baselines"][n]["metrics"]["roc_auc"]["value"])
    # the best of 2 is picked on the test lesions themselves, and the comparison says so (was only
    # "baseline with the highest pooled ROC AUC")
    assert "of 2 baselines, picked on these same test lesions" in cmp["selection"]
    assert "understated" in cmp["selection"]
    assert 0 <= cmp["p_value"] <= 1
    assert (run / "report.html").is_file()
    out = capsys.readouterr().out
    assert DISCLAIMER in out and "ROC AUC" in out and "mean_hu" in out and "radiomics_lr" in out
    assert "[" in out and "–" in out  # "0.93 [0.88–0.97]"
    assert "Paired patient-bootstrap test" in out
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp files left


def test_evaluate_run_overrides_and_no_val(tmp_path, capsys):
    test = synth_predictions(12, n_patients=20)
    run = write_run(tmp_path / "run", test, None)
    m = evaluate_run(run, positive_class="cyst", n_bootstrap=0, gradcam=False)
    assert m["positive_class"] == "cyst" and m["settings"]["n_bootstrap"] == 0
    assert m["network"]["metrics"]["accuracy"]["ci_low"] is None
    assert any("val_predictions.csv not found" in n for n in m["notes"])
    assert set(m["thresholds"].values()) == {0.5}
    # settings say what happened, not "fitted on each fold's inner-validation predictions (val_predictions.csv)"
    assert m["settings"]["threshold_fitted_on"] == "not fitted: 0.5 (no usable inner-validation predictions)"
    assert m["settings"]["temperature_fitted_on"].startswith("not fitted: T = 1")


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="run folder not found"):
        evaluate_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="liverlesion cv"):
        evaluate_run(tmp_path / "empty")
    test = synth_predictions(13, n_patients=8)
    run = write_run(tmp_path / "run", test)
    with pytest.raises(UserError, match=r"'hcc' is not among the classes .*cyst, metastasis"):
        evaluate_run(run, positive_class="hcc", gradcam=False)
    with pytest.raises(UserError, match="--n-bootstrap -1"):
        evaluate_run(run, n_bootstrap=-1, gradcam=False)
    (run / "config.yaml").write_text("eval:\n  threshold: best\n")
    with pytest.raises(UserError, match="eval.threshold='best'"):
        evaluate_run(run, gradcam=False)
    (run / "config.yaml").write_text("eval:\n  n_bootstrap: 10\n")
    test.drop(columns=["fold"]).to_csv(run / "predictions.csv", index=False)
    with pytest.raises(UserError, match="missing column.*fold"):
        evaluate_run(run, gradcam=False)
    bad = test.copy()
    bad.loc[2, "prob_metastasis"] = 1.7
    bad.to_csv(run / "predictions.csv", index=False)
    with pytest.raises(UserError, match="outside \\[0, 1\\] in row\\(s\\) 4"):
        evaluate_run(run, gradcam=False)
    bad = test.copy()
    bad.loc[[1, 3], ["prob_cyst", "prob_metastasis"]] = [[0.9, 0.9], [0.0, 0.0]]  # was renormalised silently
    bad.to_csv(run / "predictions.csv", index=False)
    with pytest.raises(UserError, match=r"row\(s\) 3, 5 do not sum to 1 \(row 3: 1.8"):
        evaluate_run(run, gradcam=False)
    bad = test.copy()
    bad.loc[0, "true_class"] = "adenoma"
    bad.to_csv(run / "predictions.csv", index=False)
    with pytest.raises(UserError, match="adenoma"):
        evaluate_run(run, gradcam=False)
    dup = pd.concat([test, test.iloc[:1]])
    dup.to_csv(run / "predictions.csv", index=False)
    with pytest.raises(UserError, match="more than once"):
        evaluate_run(run, gradcam=False)
    # a file cut short (a partial copy): its last row lacks the later columns and must not be
    # read as a lesion the size rule left out, nor give metrics on fewer lesions
    full = test.assign(status="classified")
    full.loc[1, "status"] = "too small to characterise"
    text = full.to_csv(index=False)
    (run / "predictions.csv").write_text(
        text[: text.index("\n", len(text) // 2) + 1] + text.split("\n")[-2][:20]
    )
    with pytest.raises(UserError, match=r"looks truncated: its last row \(file line \d+\) has 3 of"):
        evaluate_run(run, gradcam=False)
    odd = full.copy()
    odd.loc[3, "status"] = "clasified"
    odd.to_csv(run / "predictions.csv", index=False)
    with pytest.raises(UserError, match=r"status in row\(s\) 5 is neither 'classified'"):
        evaluate_run(run, gradcam=False)
    assert not (run / "metrics.json").exists()  # nothing written on error
    full.to_csv(run / "predictions.csv", index=False)
    evaluate_run(run, gradcam=False)  # the whole file reads
    assert (run / "metrics.json").exists()


def test_cli_evaluate_error_is_one_line(tmp_path, capsys):
    from liverlesion.cli import main

    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "liverlesion cv" in err and len(err.strip().splitlines()) == 1


def test_ece_interval_brackets_its_estimate():
    """Resampled ECEs run high (duplicated patients leave noisier bins), so a plain percentile interval
    can lie wholly above the estimate; the shifted interval brackets it, and other metrics keep theirs."""
    from liverlesion.bootstrap import bootstrap_ci
    from liverlesion.calibration import expected_calibration_error

    rng = np.random.default_rng(1)
    n = 70
    p = rng.beta(1.0, 1.0, n)
    y = (rng.random(n) < p).astype(float)
    groups = np.array([f"P{i // 3}" for i in range(n)])  # 3 lesions per patient

    def fn(idx):
        return {"ece": expected_calibration_error(y[idx], p[idx]), "mean_p": float(p[idx].mean())}

    res = bootstrap_ci(fn, groups, 300, seed=0)
    ece = res["ece"]
    assert 0.0 <= ece["ci_low"] <= ece["value"] <= ece["ci_high"], ece
    draws = [fn(idx)["mean_p"] for idx in patient_bootstrap(groups, 300, seed=0)]
    assert res["mean_p"]["ci_low"] == pytest.approx(np.percentile(draws, 2.5))  # unshifted


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        # another cohort's baselines: was "radiomics_lr: no rows; re-run the step that wrote it"
        ("other_cohort", r"none of its \d+ lesions is in predictions.csv \(its ids e.g. 'Q000-L01'"),
        ("subset", r"lacks \d+ of the \d+ lesions of predictions.csv"),  # was scored on the subset, rc 0
        ("other_patients", r"lesion 'P000-L01' has patient_id 'XP000' there but 'P000'"),  # was rc 0
        ("other_truth", r"has true_class '\w+' there but"),
    ],
)
def test_baselines_of_other_lesions_are_refused_before_any_work(tmp_path, damage, expected):
    test = synth_predictions(14, n_patients=12)
    b = baseline_from(test, 1, 1.0)
    if damage == "other_cohort":
        b = baseline_from(synth_predictions(99, n_patients=12, prefix="Q"), 1, 1.0)
    elif damage == "subset":
        b = b.iloc[: len(b) // 2]
    elif damage == "other_patients":
        b["patient_id"] = "X" + b["patient_id"]
    else:
        b["true_class"] = b["true_class"].map({"cyst": "metastasis", "metastasis": "cyst"})
    run = write_run(tmp_path / "run", test, synth_val(15), n_bootstrap=5, baselines={"radiomics_lr": b})
    with pytest.raises(UserError, match=expected) as e:
        evaluate_run(run, gradcam=False)
    msg = str(e.value)
    assert "\n" not in msg and "baselines/radiomics_lr/predictions.csv" in msg
    assert "liverlesion baselines" in msg and "delete" in msg
    assert not (run / "metrics.json").exists() and not (run / "report.html").exists()


def test_validation_rows_of_a_folds_own_test_patients_are_refused(tmp_path):
    # thresholds are chosen on each fold's validation rows: a val_predictions.csv holding that fold's
    # test patients (another run's file) tuned them on the lesions they are scored on, with exit 0
    test = synth_predictions(10, n_patients=30)
    leaked = test[test["fold"] == 1].head(3)  # fold 1's own test rows, filed as its validation rows
    run = write_run(tmp_path / "run", test, pd.concat([synth_val(11), leaked], ignore_index=True))
    with pytest.raises(UserError) as e:
        evaluate_run(run, gradcam=False)
    msg = str(e.value)
    assert "val_predictions.csv: fold 1's validation rows include patient" in msg and "\n" not in msg
    assert "thresholds would be tuned on test lesions" in msg and not (run / "metrics.json").exists()
    # the same rows under another fold are that fold's validation patients: accepted
    moved = leaked.assign(fold=(leaked["fold"] + 1) % 3)
    write_run(tmp_path / "run", test, pd.concat([synth_val(11), moved], ignore_index=True))
    evaluate_run(run, gradcam=False)


@pytest.mark.parametrize(("n_small", "says"), [(1, "1 is too small"), (2, "2 are too small")])
def test_coverage_note_counts_too_small_lesions_in_words(tmp_path, n_small, says):
    test = synth_predictions(10, n_patients=30).assign(status="classified")
    test.loc[list(range(n_small)), "status"] = "too small to characterise"
    run = write_run(tmp_path / "run", test, n_bootstrap=0)
    m = evaluate_run(run, gradcam=False)
    (note,) = [n for n in m["notes"] if n.startswith("metrics cover")]
    assert f"; {says} to characterise" in note
