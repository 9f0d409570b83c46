"""Lesion probabilities from a network: the one path from patches to calibrated probabilities.

For each lesion, the network's logits are averaged over its samples (2-D mode: its slices) and over
the test-time-augmentation views (``model.tta``: ``flips`` = identity, left-right, up-down, both),
divided by the checkpoint's temperature and turned into probabilities with a softmax; an ensemble
averages its members' probabilities. ``train`` (inner-validation and test predictions),
``predict``, ``serve`` and ``export`` all go through these functions, and the class is then chosen
by :func:`liverlesion.decision.decide` with the threshold stored in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

TTA_MODES = ("flips", "none")


def tta_flips(mode: str) -> list[tuple[int, ...]]:
    """The flip axes of each test-time view of an ``(N, C, H, W)`` batch (``()`` = identity)."""
    if mode == "none":
        return [()]
    if mode == "flips":
        return [(), (3,), (2,), (2, 3)]
    raise ValueError(f"unknown TTA mode {mode!r}")


def tta_views(x, mode: str) -> list:
    """The test-time views of a torch batch ``(N, C, H, W)``, in :func:`tta_flips` order."""
    import torch

    return [x if not dims else torch.flip(x, dims=dims) for dims in tta_flips(mode)]


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of ``logits / temperature`` (``(N, K)`` probabilities)."""
    from scipy.special import softmax

    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=1)


def _nll_at(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    from scipy.special import log_softmax

    return float(-np.mean(log_softmax(logits / temperature, axis=1)[np.arange(len(y)), y]))


TEMPERATURE_PRIOR_SD = 0.5  # prior on log T: N(0, 0.5^2), so T stays near 1 unless the data insist


def fit_temperature(
    logits: np.ndarray, y_true: Sequence[int] | np.ndarray, prior_sd: float = TEMPERATURE_PRIOR_SD
) -> float:
    """Temperature T of ``softmax(logits / T)`` (Guo et al. 2017), as a posterior mode.

    Inner-validation sets hold a few dozen lesions, and the maximum-likelihood T of so few is
    noisy (0.1-1.3 across the folds of one demo run): each fold's probabilities then sit on a
    different scale and the pooled ranking suffers. So the mean NLL is penalised by
    ``(log T)^2 / (2 prior_sd^2 n)``: a Gaussian prior on log T, which matters little once the
    validation set is large. Fit on inner-validation logits only. Returns 1.0 when there are
    fewer than two samples or only one class.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=float)
    y = np.asarray(y_true).astype(int)
    if len(y) < 2 or len(np.unique(y)) < 2 or not np.isfinite(logits).all():
        return 1.0
    weight = 1.0 / (2.0 * prior_sd**2 * len(y)) if prior_sd > 0 else 0.0

    def objective(s: float) -> float:
        return _nll_at(logits, y, math.exp(s)) + weight * s * s

    # Optimise log T so the search is symmetric in "sharpen" vs "soften"; T in [0.05, 20].
    res = minimize_scalar(
        objective, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-4}
    )
    return float(math.exp(res.x)) if objective(res.x) <= objective(0.0) else 1.0


def lesion_logits(
    forward: Callable,
    samples: Sequence[np.ndarray],
    extra: np.ndarray | None = None,
    tta: str = "flips",
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """Mean logits ``(n_lesions, K)`` over each lesion's samples and test-time views.

    Args:
        forward: ``forward(x, extra) -> logits`` for a batch ``x`` ``(B, C, H, W)`` (a ``LesionNet``,
            or its upper part on cached activations) and per-sample ``extra`` features (or None).
            An exported graph (``forward.takes_numpy``, see :mod:`liverlesion.onnx_backend`) takes and
            returns numpy arrays and averages its test-time views itself: torch is not imported.
        samples: Per lesion, an array ``(S, C, H, W)`` (patches in ``[0, 1]``, or cached activations
            whose views were computed with :func:`tta_views`, in which case ``tta`` is ``"none"``).
        extra: Per-lesion extra inputs ``(n_lesions, F)`` (fusion features) or None.
        tta: Test-time augmentation mode.
        batch_size: Samples per forward call.
        device: Torch device of ``forward``.
    """
    if getattr(forward, "takes_numpy", False):
        # The graph holds its own views (export.ProbabilityModel); they must be the ones asked for.
        assert forward.tta == tta, f"exported graph has tta={forward.tta!r}, asked for {tta!r}"
        return _mean_over_samples(forward, samples, extra, batch_size)

    import torch

    def run(x: np.ndarray, e: np.ndarray | None) -> np.ndarray:
        xt = torch.from_numpy(x).to(device)
        et = None if e is None else torch.from_numpy(e).to(device)
        views = tta_views(xt, tta)
        return (sum(forward(v, et).double() for v in views) / len(views)).cpu().numpy()

    with torch.inference_mode():
        return _mean_over_samples(run, samples, extra, batch_size)


def _mean_over_samples(
    run: Callable, samples: Sequence[np.ndarray], extra: np.ndarray | None, batch_size: int
) -> np.ndarray:
    """``run(x, e)`` over batches of all lesions' samples; each lesion's mean logits (float64)."""
    n = len(samples)
    owner = np.concatenate([np.full(len(a), i) for i, a in enumerate(samples)]) if n else np.zeros(0, int)
    flat = np.concatenate([np.asarray(a, dtype=np.float32) for a in samples]) if n else None
    total: np.ndarray | None = None
    count = np.zeros(n)
    for start in range(0, len(owner), batch_size):
        x = np.ascontiguousarray(flat[start : start + batch_size])
        who = owner[start : start + batch_size]
        e = None if extra is None else np.ascontiguousarray(extra[who], dtype=np.float32)
        lg = np.asarray(run(x, e), dtype=np.float64)
        if total is None:
            total = np.zeros((n, lg.shape[1]))
        np.add.at(total, who, lg)
        np.add.at(count, who, 1)
    if total is None:
        return np.zeros((0, 0))
    return total / count[:, None]


def ensemble_probs(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    """Ensemble probabilities: the mean of the members' calibrated probabilities."""
    return np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in member_probs]), axis=0)
