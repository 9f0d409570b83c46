"""Late fusion of the network with the radiomics-style features (``model.fusion``).

The handcrafted half is the radiomics baselines read out into the model: with ``radiomics_vote`` (the
default) the soft vote, i.e. the mean class probability, of the logistic regression
(``baselines.lr_pipeline``, held as arrays in the model's ``fusion_head``) and the random forest
(``baselines.rf_pipeline``, held as a ``forest.TreeEnsemble``); with ``radiomics`` the logistic
regression alone. Each half is calibrated on its own before mixing (the network by temperature on
inner validation, folded into its last layer; the handcrafted half by its own fit), so neither can
swamp the other, and the fused logits are ``alpha * network + (1 - alpha) * handcrafted``. A fold whose
``alpha`` is 0 gives exactly the baselines' probabilities (their mean, or the LR's). ``alpha`` is
``model.fusion_weight`` (default 0.2: a minority vote for the network) when mixing the network in at
that weight lowers the NLL on out-of-fold logits of the training patients (inner patient folds), else
0 (:func:`gate_weight`); with ``auto`` it is chosen on the same logits (:func:`choose_alpha`), and a
mixture then gets a temperature fitted with its weight. Otherwise the fused logits get no temperature.
"""

from __future__ import annotations

import numpy as np

from liverlesion.inference import fit_temperature


def radiomics_logits(model, extra: np.ndarray) -> np.ndarray:
    """The handcrafted half's logits as the model holds it (``LesionNet.handcrafted_logits``)."""
    import torch

    with torch.inference_mode():
        return (
            model.handcrafted_logits(torch.from_numpy(np.asarray(extra, dtype=np.float32))).double().numpy()
        )


def radiomics_lr(x: np.ndarray, fit_y: np.ndarray, k: int, seed: int):
    """The radiomics baselines' logistic regression, as plain arrays (fill, mean, std, W, b) of logits."""
    from liverlesion.baselines import lr_pipeline  # local: heavy (scipy)

    pipe = lr_pipeline(seed).fit(x, fit_y)
    imp, scale, lr = pipe.named_steps["impute"], pipe.named_steps["scale"], pipe.named_steps["lr"]
    fill, mean, std = imp.statistics_, scale.mean_, scale.scale_
    w = np.zeros((k, x.shape[1]))
    b = np.zeros(k)
    # two classes in the fit data (also when a third is absent from it): sklearn gives one binary row
    if len(lr.classes_) == 2:
        w[lr.classes_[1]], b[lr.classes_[1]] = lr.coef_[0] / 2, lr.intercept_[0] / 2
        w[lr.classes_[0]], b[lr.classes_[0]] = -lr.coef_[0] / 2, -lr.intercept_[0] / 2
    else:
        for j, c in enumerate(lr.classes_):
            w[c], b[c] = lr.coef_[j], lr.intercept_[j]
    return fill, mean, std, w, b


def radiomics_forest(x: np.ndarray, fit_y: np.ndarray, k: int, seed: int):
    """The radiomics baselines' random forest (``baselines.radiomics_rf``), as a torch module."""
    from liverlesion.baselines import rf_pipeline  # local: heavy (scipy)
    from liverlesion.forest import TreeEnsemble

    return TreeEnsemble.from_sklearn(rf_pipeline(seed).fit(x, fit_y).named_steps["rf"], k)


def handcrafted_half(fit_x: np.ndarray, fit_y: np.ndarray, k: int, seed: int, vote: bool):
    """The fusion's handcrafted half fitted on ``fit_x``: ``(LR arrays, forest or None)``.

    ``vote`` (``model.fusion: radiomics_vote``): the soft vote of the two radiomics baselines, the
    logistic regression and the random forest; else (``radiomics``) the logistic regression alone.
    """
    x = np.where(np.isfinite(fit_x), fit_x, np.nan)  # inf as missing, as the baselines impute it
    forest = radiomics_forest(x, fit_y, k, seed) if vote else None
    return radiomics_lr(x, fit_y, k, seed), forest


def handcrafted_logits(half, x: np.ndarray) -> np.ndarray:
    """Logits of a half from :func:`handcrafted_half` on features ``x`` (NaN = missing)."""
    import torch

    from liverlesion.forest import vote_logits

    (fill, mean, std, w, b), forest = half
    x = np.where(np.isfinite(x), x, fill)
    lr = torch.from_numpy(((x - mean) / std) @ w.T + b)
    with torch.inference_mode():
        probs = None if forest is None else forest(torch.from_numpy(x)).double()
        return vote_logits(lr, probs).numpy()


def fit_fusion(model, fit_x: np.ndarray, fit_y: np.ndarray, seed: int, vote: bool) -> None:
    """Fit the model's handcrafted half (:func:`handcrafted_half`) on the training rows given, in
    lesion-table order (the forest's bootstrap samples depend on the row order, as the baseline's do)."""
    import torch

    (fill, mean, std, w, b), forest = handcrafted_half(fit_x, fit_y, model.num_classes, seed, vote)
    with torch.no_grad():
        model.fusion_fill.copy_(torch.as_tensor(fill, dtype=torch.float32))
        model.fusion_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        model.fusion_std.copy_(torch.as_tensor(std, dtype=torch.float32))
        model.fusion_head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        model.fusion_head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    model.fusion_forest = None if forest is None else forest.to(model.fusion_fill.device)


def choose_alpha(
    deep: np.ndarray, rad: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None
) -> tuple[float, float, dict[str, float]]:
    """Weight ``a`` of the network in the fused logits ``(a * deep + (1 - a) * rad) / T``, by NLL.

    ``deep`` comes in temperature-scaled (:func:`calibrate_deep`), ``rad`` as the radiomics logistic
    regression gives it. Each candidate mixture is scored after a temperature of its own, so the
    halves are compared on equal terms however over- or under-confident each is on held-out
    lesions. Returns ``(a, T, nll_by_a)``: ``T`` is the chosen mixture's temperature (averaging two
    calibrated halves' logits leaves them under-confident, and an unscaled mixture would sit on a
    different scale than the folds that keep one half), and 1 when one half is kept alone, which
    is then exactly itself: at ``a = 0`` the same probabilities as the ``radiomics_lr`` baseline.

    A grid of weights is scored on a few dozen to a few hundred lesions, so the winner is partly
    noise. A mixture is taken only when it beats the better half by more than one standard error of
    the paired per-lesion NLL difference (the one-standard-error rule), *and* ranks the lesions
    better than that half by more than one standard error of the ROC AUC difference
    (:func:`ranks_better`); otherwise the better half alone is used. So on cohorts where one half is
    weak, fusion falls back to the other instead of mixing in noise, and a mixture that is merely
    better calibrated (averaging two models softens over-confidence, which lowers the NLL without
    separating the classes any better) is not taken either. With ``groups`` (patient ids) both
    standard errors are over patients: lesions of one patient are alike, so counting them as
    independent would overstate the evidence for a mixture, as in every other patient-level
    statistic here.
    """
    if not len(y):
        return 0.5, 1.0, {}
    losses: dict[float, np.ndarray] = {}
    temps: dict[float, float] = {}
    for a in np.round(np.linspace(0.0, 1.0, 21), 2):
        losses[float(a)], temps[float(a)] = _mixture_nll(deep, rad, y, float(a))
    scores = {a: float(v.mean()) for a, v in losses.items()}
    best = min(scores.values())
    # ties (e.g. both halves perfect on inner validation): the most even mix
    mix = min((a for a, v in scores.items() if v <= best + 1e-4), key=lambda a: abs(a - 0.5))
    half = 0.0 if scores[0.0] <= scores[1.0] else 1.0
    gain = losses[half] - losses[mix]
    take = float(gain.mean()) > mean_se(gain, groups)
    if take and 0.0 < mix < 1.0:
        take = ranks_better(mix * deep + (1 - mix) * rad, half * deep + (1 - half) * rad, y, groups)
    alpha = mix if take else half
    return alpha, (temps[alpha] if 0.0 < alpha < 1.0 else 1.0), scores


def gate_weight(
    deep: np.ndarray, rad: np.ndarray, y: np.ndarray, weight: float
) -> tuple[float, dict[float, float]]:
    """``weight`` (``model.fusion_weight``) if mixing the network in at it lowers the NLL, else 0.

    The halves come in as for :func:`choose_alpha`, on held-out training lesions, and each of the
    two candidates is scored after a temperature of its own. The weight itself is not fitted: per
    fold, the NLL-best weight of a grid is noisy (on 50 folds of 10 benchmark runs it was 0–0.45,
    median 0.2) and a one-standard-error rule on it kept 0 in most folds. What the training patients
    do tell reliably is whether the network adds anything at all; where it adds nothing, the fused
    model is the radiomics half alone, exactly. A point comparison: on 160 lesions a network without
    signal passes about one time in ten (``tests/test_fusion.py``). Returns ``(alpha, nll_by_alpha)``.
    """
    if not len(y) or weight == 0.0:
        return float(weight), {}
    scores = {a: float(_mixture_nll(deep, rad, y, a)[0].mean()) for a in (0.0, float(weight))}
    return (float(weight) if scores[float(weight)] < scores[0.0] else 0.0), scores


def _mixture_nll(deep: np.ndarray, rad: np.ndarray, y: np.ndarray, a: float) -> tuple[np.ndarray, float]:
    """Per-lesion NLL of the mixture ``a * deep + (1 - a) * rad`` after its own temperature, and that T."""
    from scipy.special import log_softmax

    z = a * deep + (1 - a) * rad
    t = float(fit_temperature(z, y))
    return -log_softmax(z / t, axis=1)[np.arange(len(y)), y], t


def ranks_better(
    a: np.ndarray, b: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, n_bootstrap: int = 200
) -> bool:
    """Whether logits ``a`` rank the lesions better than ``b`` by more than one standard error.

    The ROC AUC difference (one-vs-rest macro for more than two classes) against its standard
    deviation over ``n_bootstrap`` paired patient-bootstrap resamples (lesions when ``groups`` is None).
    """
    from scipy.special import softmax

    from liverlesion.bootstrap import paired_auc_differences
    from liverlesion.metrics import auc_score

    y = np.asarray(y).astype(int)
    pa, pb = softmax(np.asarray(a, float), axis=1), softmax(np.asarray(b, float), axis=1)
    gain = auc_score(y, pa, 1) - auc_score(y, pb, 1)
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    diffs = paired_auc_differences(y, pa, pb, g, n_bootstrap=n_bootstrap)
    return bool(np.isfinite(gain) and len(diffs) > 1 and gain > diffs.std(ddof=1))


def mean_se(values: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Standard error of the mean of ``values``; cluster-robust over ``groups`` when given."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n < 2:
        return 0.0
    if groups is None:
        return float(v.std(ddof=1) / np.sqrt(n))
    codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
    c = int(codes.max()) + 1
    if c < 2:
        return float("inf")  # one patient: no evidence beyond it
    resid = np.bincount(codes, weights=v - v.mean(), minlength=c)
    return float(np.sqrt(c / (c - 1) * np.sum(resid**2)) / n)


def calibrate_deep(model, temperature: float) -> None:
    """Fold the network half's temperature into its last layer: its logits become ``logits / T``.

    Each half is calibrated before mixing, so a fold that keeps one half alone needs no temperature
    on the fused output (the checkpoint's is 1), and a fold whose weight is 0 gives exactly the
    radiomics half's probabilities. Grad-CAM, export and ``predict`` read the scaled layer as any other.
    """
    import torch

    last = model.head[-1]
    with torch.no_grad():
        last.weight.div_(temperature)
        last.bias.div_(temperature)


def inner_patient_splits(groups: np.ndarray, n_splits: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped inner folds over a training fold (positions into ``groups``)."""
    from sklearn.model_selection import GroupKFold

    n = min(n_splits, len(np.unique(groups)))
    return list(GroupKFold(n_splits=n).split(np.zeros(len(groups)), groups=groups)) if n >= 2 else []


def cross_fitted_radiomics(
    x: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]], k: int, seed: int, vote: bool
) -> np.ndarray:
    """Out-of-fold logits of the handcrafted half (:func:`handcrafted_half`) on the probe's inner splits."""
    out = np.zeros((len(y), k))
    for tr, te in splits:
        if len(np.unique(y[tr])) < 2:
            continue  # an inner fold with one class: no model, neutral logits
        out[te] = handcrafted_logits(handcrafted_half(x[tr], y[tr], k, seed, vote), x[te])
    return out
