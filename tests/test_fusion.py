"""Late fusion (fusion.py + train.finish_fold): each half calibrated on its own, then mixed.

The property that makes "fusion is never below its radiomics half" hold to the letter: a fold whose
network weight is 0 gives exactly the soft vote of the radiomics LR and RF baselines (``model.fusion:
radiomics_vote``; ``radiomics``: the LR baseline's probabilities), with no temperature of its own that
would put each fold on a different scale.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from liverlesion.baselines import fit_predict
from liverlesion.config import load_config
from liverlesion.fusion import calibrate_deep, choose_alpha
from liverlesion.model import LesionNet
from liverlesion.train import FoldData, finish_fold

CLASSES = ["cyst", "metastasis"]


def _fusion_net(n_features: int) -> LesionNet:
    torch.manual_seed(0)
    return LesionNet(
        "resnet10t", 2, init_backbone=False, fusion_features=[f"f{i}" for i in range(n_features)]
    )


def _subset(rows: np.ndarray, y: np.ndarray) -> FoldData:
    index = pd.DataFrame(
        {
            "patient_id": [f"p{i // 2:03d}" for i in rows],
            "lesion_id": [f"l{i:03d}" for i in rows],
            "lesion_class": [CLASSES[v] for v in y[rows]],
            "min_axis_mm": 20.0,
        }
    )
    return FoldData(index, [np.zeros((1, 3, 8, 8), np.float32)] * len(rows), y[rows], rows)


def _fold(weight: str = "auto", fusion: str = "radiomics_vote"):
    """One fold whose radiomics features carry the signal and whose network carries none."""
    rng = np.random.default_rng(0)
    n = 90
    y = np.tile([0, 1], n // 2)
    extra = rng.normal(size=(n, 4)) + 1.5 * y[:, None]  # informative radiomics-style features
    extra[::7, 2] = np.nan  # missing values: imputed as the baseline imputes them
    model = _fusion_net(4)
    feats = torch.from_numpy(rng.normal(size=(n, model.num_features)).astype(np.float32))  # no signal

    def deep(data: FoldData) -> np.ndarray:
        with torch.no_grad():
            return model.head.eval()(feats[data.rows]).double().numpy()

    fit, val, test = (_subset(np.arange(a, b), y) for a, b in ((0, 50), (50, 70), (70, 90)))
    cfg = load_config(
        overrides={"eval": {"min_size_mm": 5.0}, "model": {"fusion_weight": weight, "fusion": fusion}}
    )
    return model, deep, fit, val, test, extra, y, cfg


def _baselines(extra: np.ndarray, y: np.ndarray, train_rows: np.ndarray, test_rows: np.ndarray, seed: int):
    """Test-row probabilities of the radiomics LR and RF baselines, fitted by ``baselines`` itself on
    a lesion table of these features (NaN cells as the baselines read them)."""
    names = [f"f{i}" for i in range(extra.shape[1])]
    table = pd.DataFrame(extra, columns=names).assign(lesion_class=[CLASSES[v] for v in y])
    train, test = table.iloc[train_rows], table.iloc[test_rows]
    return {
        n: fit_predict(n, names, CLASSES, "metastasis", seed, train, test)[0]
        for n in ("radiomics_lr", "radiomics_rf")
    }


@pytest.mark.parametrize("fusion", ["radiomics_vote", "radiomics"])
def test_network_weight_zero_gives_the_radiomics_baselines_exactly(fusion):
    """Weight 0: the soft vote of the LR and RF baselines (radiomics_vote), or the LR baseline (radiomics)."""
    model, deep, fit, val, test, extra, y, cfg = _fold(fusion=fusion)
    # the forest's bootstrap samples follow the row order: hand the fold its training rows shuffled
    fit = _subset(fit.rows[::-1], y)
    results, dec = finish_fold(model, deep, fit, val, {"test": test}, CLASSES, cfg, extra, 0)

    assert dec["fusion"]["alpha"] == 0.0
    assert dec["temperature"] == 1.0  # the radiomics half alone: no temperature on top
    assert float(model.fusion_alpha) == 0.0
    assert (model.fusion_forest is not None) == (fusion == "radiomics_vote")
    # fit + inner validation, as the baselines are fitted
    base = _baselines(extra, y, np.arange(0, 70), test.rows, cfg.train.seed)
    want = (
        (base["radiomics_lr"] + base["radiomics_rf"]) / 2
        if fusion == "radiomics_vote"
        else base["radiomics_lr"]
    )
    got = results["test"][["prob_cyst", "prob_metastasis"]].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def _held_out_logits(deep_signal: float, n: int = 160, seed: int = 4):
    """Out-of-fold logits as ``cross_fitted()`` returns them: each half sees the label through noise
    of its own, so a mixture beats either half when both carry signal."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    s = 2 * y - 1.0

    def two(z: np.ndarray) -> np.ndarray:
        return np.stack([-z / 2, z / 2], axis=1)

    deep = two(deep_signal * s + rng.normal(size=n) * 1.5)
    rad = two(1.5 * s + rng.normal(size=n) * 1.5)
    return deep, rad, y, np.zeros(n, bool), np.array([f"q{i // 2:03d}" for i in range(n)])


def _finish_judged_on(weight: str, deep_signal: float):
    """``finish_fold`` of :func:`_fold` with ``model.fusion_weight=weight``, the weight judged on
    :func:`_held_out_logits`; also the network's inner-validation logits before calibration."""
    model, deep, fit, val, test, extra, y, cfg = _fold(weight)
    net_val = deep(val)  # finish_fold folds the network's temperature into its last layer
    held_out = _held_out_logits(deep_signal)
    tests = {"test": test}
    results, dec = finish_fold(
        model, deep, fit, val, tests, CLASSES, cfg, extra, 0, cross_fitted=lambda: held_out
    )
    return results, dec, net_val, (deep, fit, val, test, extra, y, cfg)


@pytest.mark.parametrize("weight", [0.0, 0.2, 0.5])
def test_a_set_network_weight_is_used_as_set(weight):
    """model.fusion_weight as a number, where the network adds to the radiomics half on held-out
    training lesions: the fused logits are exactly the weighted halves (each calibrated on its own),
    with no temperature on top."""
    from scipy.special import softmax

    from liverlesion.fusion import handcrafted_half, handcrafted_logits

    results, dec, net0, (deep, fit, val, test, extra, y, cfg) = _finish_judged_on(str(weight), 1.5)
    assert dec["fusion"]["alpha"] == weight == dec["network_weight"]
    t_net = dec["fusion"]["network_temperature"]
    rad_val = handcrafted_logits(
        handcrafted_half(extra[fit.rows], y[fit.rows], 2, cfg.train.seed, vote=True), extra[val.rows]
    )
    got_val = results["val"][["logit_cyst", "logit_metastasis"]].to_numpy()
    np.testing.assert_allclose(got_val, weight * net0 / t_net + (1 - weight) * rad_val, atol=1e-4)
    assert dec["temperature"] == 1.0
    train_rows = np.arange(0, 70)  # the radiomics half refitted on fit + inner validation
    rad_test = handcrafted_logits(
        handcrafted_half(extra[train_rows], y[train_rows], 2, cfg.train.seed, vote=True), extra[test.rows]
    )
    got = results["test"][["logit_cyst", "logit_metastasis"]].to_numpy()
    np.testing.assert_allclose(got, weight * deep(test) + (1 - weight) * rad_test, atol=1e-4)
    probs = results["test"][["prob_cyst", "prob_metastasis"]].to_numpy()
    np.testing.assert_allclose(probs, softmax(got, axis=1), atol=1e-6)


def test_a_set_weight_is_refused_where_the_network_adds_nothing():
    """The training patients' held-out logits decide whether the network gets its weight at all;
    refused, the fused model is the radiomics baselines' soft vote exactly."""
    from liverlesion.fusion import gate_weight

    taken = {0.0: 0, 1.5: 0}
    for seed in range(20):
        for signal in taken:  # a network without signal, and one as good as the radiomics half
            deep, rad, y, _, _ = _held_out_logits(signal, seed=seed)
            alpha, scores = gate_weight(deep, rad, y, 0.2)
            assert alpha in (0.0, 0.2) and (alpha == 0.2) == (scores[0.2] < scores[0.0])
            taken[signal] += alpha == 0.2
    # a point comparison on 160 lesions: noise passes now and then (4 of 40 seeds), signal always
    assert taken[0.0] <= 5 and taken[1.5] == 20
    assert gate_weight(deep[:0], rad[:0], y[:0], 0.2) == (0.2, {})  # nothing to judge on: as set

    results, dec, _, (_, _, _, test, extra, y, cfg) = _finish_judged_on("0.2", 0.0)
    assert dec["fusion"]["alpha"] == 0.0 and dec["temperature"] == 1.0
    base = _baselines(extra, y, np.arange(0, 70), test.rows, cfg.train.seed)
    want = (base["radiomics_lr"] + base["radiomics_rf"]) / 2
    np.testing.assert_allclose(results["test"][["prob_cyst", "prob_metastasis"]].to_numpy(), want, atol=1e-5)


def test_network_temperature_is_folded_into_its_last_layer():
    model = _fusion_net(2).eval()
    f = torch.randn(5, model.num_features)
    with torch.no_grad():
        before = model.head(f)
        calibrate_deep(model, 2.5)
        after = model.head(f)
    torch.testing.assert_close(after, before / 2.5)


@pytest.mark.parametrize(
    ("deep_signal", "rad_signal", "expect"),
    [(0.0, 3.0, "radiomics"), (3.0, 0.0, "network"), (2.0, 2.0, "mix")],
)
def test_choose_alpha_keeps_the_better_half_unless_a_mix_clearly_wins(deep_signal, rad_signal, expect):
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 150)
    s = 2 * y - 1.0

    def logits(signal: float) -> np.ndarray:
        z = signal * s + rng.normal(size=len(y)) * 1.5  # independent noise per half
        return np.stack([-z / 2, z / 2], axis=1)

    alpha, t, scores = choose_alpha(logits(deep_signal), logits(rad_signal), y)
    assert set(scores) == {round(a, 2) for a in np.linspace(0, 1, 21)}
    if expect == "radiomics":
        assert alpha == 0.0 and t == 1.0  # a half kept alone is itself: no temperature
    elif expect == "network":
        assert alpha == 1.0 and t == 1.0
    else:
        assert 0.0 < alpha < 1.0
        assert t < 1.0  # the average of two calibrated halves' logits is under-confident


def test_a_mixture_must_also_rank_better_than_the_half(monkeypatch):
    """The "mix" case above, but with a mixture that does not separate the classes any better."""
    import liverlesion.fusion as fusion

    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 150)
    s = 2 * y - 1.0
    z = [2.0 * s + rng.normal(size=len(y)) * 1.5 for _ in range(2)]
    deep, rad = (np.stack([-v / 2, v / 2], axis=1) for v in z)
    assert 0.0 < choose_alpha(deep, rad, y)[0] < 1.0
    monkeypatch.setattr(fusion, "ranks_better", lambda *a, **k: False)
    alpha, t, _ = choose_alpha(deep, rad, y)
    assert alpha in (0.0, 1.0) and t == 1.0


def test_ranks_better_needs_more_than_noise():
    from liverlesion.fusion import ranks_better

    rng = np.random.default_rng(3)
    y = np.tile([0, 1], 100)
    s = 2 * y - 1.0
    good = s + rng.normal(size=len(y))
    z = lambda v: np.stack([-v, v], axis=1)  # noqa: E731
    assert not ranks_better(z(good), z(good), y)  # the same ranking
    assert not ranks_better(z(2 * good), z(good), y)  # more confident, same ranking
    assert ranks_better(z(good + s), z(good), y)  # more signal
    assert not ranks_better(z(good), z(good + s), y)
    assert not ranks_better(z(good + rng.normal(size=len(y)) * 0.3), z(good), y)  # noise, not signal


def test_standard_error_counts_patients_not_lesions():
    from liverlesion.fusion import mean_se

    rng = np.random.default_rng(2)
    per_patient = rng.normal(size=40)
    copies = np.repeat(per_patient, 4)  # four identical lesions per patient: no more evidence
    groups = np.repeat(np.arange(40), 4)
    naive, robust = mean_se(copies), mean_se(copies, groups)
    assert naive == pytest.approx(mean_se(per_patient) / 2, rel=0.05)  # lesions as independent
    assert robust == pytest.approx(mean_se(per_patient), rel=0.05)  # patients as the unit
    assert mean_se(copies, np.zeros(len(copies))) == float("inf")  # one patient: no evidence


def test_network_weight_is_recorded_with_the_predictions_and_reported_per_fold():
    from liverlesion.report_tables import per_fold_rows
    from liverlesion.scoring import summarize_predictions

    model, deep, fit, val, test, extra, _, cfg = _fold()
    results, dec = finish_fold(model, deep, fit, val, {"test": test}, CLASSES, cfg, extra, 0)
    w = dec["fusion"]["alpha"]  # the weight as chosen, not its float32 copy in the model
    assert float(model.fusion_alpha.item()) == pytest.approx(w)
    for df in results.values():
        assert (df["network_weight"] == w).all() and dec["network_weight"] == w
    frames = []
    for f, a in enumerate((0.0, 0.35)):  # two folds, two weights, as evaluate reads them
        frames.append(
            results["test"].assign(
                fold=str(f), network_weight=a, lesion_id=lambda d, f=f: d["lesion_id"] + f"-{f}"
            )
        )
    s = summarize_predictions(
        pd.concat(frames, ignore_index=True), "metastasis", CLASSES, None, n_bootstrap=0
    )
    assert [v["network_weight"] for v in s["per_fold"].values()] == [0.0, 0.35]
    header, rows = per_fold_rows(s)
    col = header.index("network weight")
    assert [r[col] for r in rows[:2]] == ["0.00", "0.35"]
    # a model without fusion: no column, no line
    plain = summarize_predictions(
        results["test"].drop(columns="network_weight"), "metastasis", CLASSES, None, n_bootstrap=0
    )
    assert "network weight" not in per_fold_rows(plain)[0]
    assert all("network_weight" not in v for v in plain["per_fold"].values())


def test_the_network_half_is_recorded_and_scored_next_to_the_fused_model():
    # whatever weight the fusion gives it, a run shows what the network alone does
    from liverlesion.metrics import roc_auc
    from liverlesion.scoring import summarize_predictions
    from liverlesion.summary import network_half_line

    model, deep, fit, val, test, extra, _, cfg = _fold()
    results, _ = finish_fold(model, deep, fit, val, {"test": test}, CLASSES, cfg, extra, 0)
    df = results["test"]
    half = df[[f"network_prob_{c}" for c in CLASSES]].to_numpy(float)
    ok = (df["status"] == "classified").to_numpy()
    assert np.isnan(half[~ok]).all() and np.allclose(half[ok].sum(1), 1.0)
    # the network half's probabilities are the network's own (calibrated) logits, before mixing
    expected = np.exp(deep(test)) / np.exp(deep(test)).sum(1, keepdims=True)
    np.testing.assert_allclose(half[ok], expected[ok], atol=1e-6)
    s = summarize_predictions(df[ok], "metastasis", CLASSES, None, n_bootstrap=20)
    pos = CLASSES.index("metastasis")
    y = (df[ok]["true_class"] == "metastasis").to_numpy()
    assert s["network_half"]["metrics"]["roc_auc"]["value"] == pytest.approx(roc_auc(y, half[ok, pos]))
    assert "network_half" not in summarize_predictions(
        df[ok].drop(columns=[f"network_prob_{c}" for c in CLASSES]),
        "metastasis",
        CLASSES,
        None,
        n_bootstrap=0,
    )
    # evaluate's summary prints it next to the frozen-feature floor
    floor = {"metrics": {"roc_auc": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}}}
    line = network_half_line({"network": s, "baselines": {"frozen_lr": floor}})
    assert line.startswith("Network half alone (before fusion), ROC AUC 0.") and line.endswith(
        "LR 0.50 [0.40–0.60]"
    )
    assert network_half_line({"network": {"metrics": {}}}) is None
