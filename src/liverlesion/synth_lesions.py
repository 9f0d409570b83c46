"""Lesion classes of the synthetic cohort beyond metastasis and cyst, and the class list setting.

**haemangioma** (portal-venous phase): a well-defined, round lesion whose periphery enhances in
discontinuous nodules / globules to near the blood pool's density (150-180 HU), with centripetal
fill-in: the enhancement reaches inwards from the edge, further at the nodules, and the centre is
only partly filled (about 60-120 HU, depending on size and fill). Small lesions fill further (some
almost completely, "flash filling"); most large ones (>= 30 mm) keep a central unfilled scar.

The synthetic data are no real patient. Research use, not for diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from liverlesion.errors import UserError

HAEMANGIOMA = "haemangioma"
DEFAULT_CLASSES = ("metastasis", "cyst")
KNOWN_CLASSES = ("metastasis", "cyst", HAEMANGIOMA)
# relative share of each class in a cohort (metastasis : cyst = 60 : 40 as before; haemangioma 30)
CLASS_WEIGHT = {"metastasis": 0.6, "cyst": 0.4, HAEMANGIOMA: 0.3}
BLOOD_POOL_HU = (150.0, 180.0)  # portal-venous blood pool (aorta / portal vein)
SCAR_MIN_DIAMETER_MM = 30.0


def parse_classes(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """The cohort's class list from ``--classes`` (comma-separated text or a sequence).

    Raises:
        UserError: An unknown or repeated class, or fewer than two classes.
    """
    if value is None:
        return DEFAULT_CLASSES
    items = (
        [c.strip() for c in value.split(",")] if isinstance(value, str) else [str(c).strip() for c in value]
    )
    items = [c for c in items if c]
    unknown = [c for c in items if c not in KNOWN_CLASSES]
    if unknown:
        raise UserError(
            f"--classes {','.join(items)}: unknown class {unknown[0]!r}; choose from {', '.join(KNOWN_CLASSES)}"
        )
    if len(set(items)) != len(items):
        dup = next(c for c in items if items.count(c) > 1)
        raise UserError(f"--classes {','.join(items)}: {dup!r} is given twice; name each class once")
    if len(items) < 2:
        raise UserError(
            f"--classes {','.join(items) or '(empty)'}: a classifier needs at least two classes, "
            "e.g. metastasis,cyst,haemangioma"
        )
    return tuple(items)


def class_counts(classes: Sequence[str], lesions: int) -> dict[str, int]:
    """Exact lesion count per class from :data:`CLASS_WEIGHT` (largest remainder; each class at least 1)."""
    w = np.array([CLASS_WEIGHT[c] for c in classes], dtype=float)
    share = w / w.sum() * lesions
    n = np.floor(share).astype(int)
    for i in np.argsort(-(share - n), kind="stable")[: lesions - int(n.sum())]:
        n[i] += 1
    while (n == 0).any() and lesions >= len(classes):  # tiny cohorts: every class appears
        n[int(np.argmax(n))] -= 1
        n[int(np.flatnonzero(n == 0)[0])] += 1
    return {c: int(k) for c, k in zip(classes, n, strict=True)}


def allocate_classes(
    rng: np.random.Generator, counts_per_patient: np.ndarray, classes: Sequence[str]
) -> list[list[str]]:
    """Class of every lesion, patient by patient: exact class mix, classes correlated within a patient."""
    total = int(counts_per_patient.sum())
    k = len(classes)
    propensity = rng.normal(0, 1.0, (len(counts_per_patient), k))  # patients lean towards some classes
    score = np.repeat(propensity, counts_per_patient, axis=0) + rng.normal(0, 1.0, (total, k))
    assigned = np.full(total, -1)
    for c, n in enumerate(class_counts(classes, total).values()):
        if c == k - 1:
            assigned[assigned < 0] = c
            break
        free = np.flatnonzero(assigned < 0)
        assigned[free[np.argsort(-score[free, c], kind="stable")[:n]]] = c
    out, start = [], 0
    for n in counts_per_patient:
        out.append([classes[i] for i in assigned[start : start + n]])
        start += n
    return out


def haemangioma_params(rng: np.random.Generator, difficulty: float) -> dict[str, Any]:
    """Draw one haemangioma's size, margin and enhancement pattern."""
    diam = float(np.clip(rng.lognormal(np.log(14.0), 0.6), 4.0, 50.0))
    small = diam < 15.0
    fill = float(rng.uniform(0.55, 1.0) if small else rng.uniform(0.25, 0.7))
    blood = float(rng.uniform(*BLOOD_POOL_HU))
    n_nod = int(rng.integers(5, 11))
    dirs = rng.standard_normal((n_nod, 3)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    scar = bool(diam >= SCAR_MIN_DIAMETER_MM and rng.random() < 0.7)
    return {
        "diameter_mm": diam,
        "axes": np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0)], dtype=np.float32),
        "lobulation": float(rng.uniform(0.0, 0.04)),
        "margin_mm": float(rng.uniform(0.2, 0.6) * (0.75 + 0.25 * difficulty)),  # well defined
        "blood_hu": blood,
        "fill": fill,
        # the partly filled centre: unenhanced haemangioma (~40 HU) plus part of the contrast
        "centre_hu": float(40.0 + (blood - 40.0) * rng.uniform(0.15, 0.5) * (0.6 + 0.4 * fill)),
        "nodule_dirs": dirs,
        "nodule_kappa": float(rng.uniform(4.0, 9.0)),
        "scar": scar,
        "scar_rho": float(rng.uniform(0.12, 0.25)) if scar else 0.0,
        "scar_hu": float(rng.uniform(15.0, 35.0)) if scar else 0.0,
    }


def haemangioma_tissue(
    rng: np.random.Generator, params: dict[str, Any], rho: np.ndarray, u: np.ndarray
) -> np.ndarray:
    """HU inside one haemangioma before partial volume, blur and noise.

    Args:
        rng: The patient's generator.
        params: :func:`haemangioma_params`.
        rho: Distance from the centre in units of the local radius (1 = the edge).
        u: ``(..., 3)`` unit direction from the centre, in the lesion's frame.
    """
    nod = np.exp(params["nodule_kappa"] * (u @ params["nodule_dirs"].T - 1.0)).max(-1)  # 1 at a nodule
    # the fill-in front: enhancement reaches further in at the nodules (globular), less between them
    front = 1.0 - params["fill"] * (0.45 + 0.55 * nod)
    w = np.clip((rho - front) / 0.08 + 0.5, 0.0, 1.0)
    tissue = params["centre_hu"] * (1.0 - w) + params["blood_hu"] * w
    if params["scar"]:
        s = np.clip((params["scar_rho"] - rho) / 0.05 + 0.5, 0.0, 1.0)
        tissue = tissue * (1.0 - s) + params["scar_hu"] * s
    return (tissue + 3.0 * rng.standard_normal(rho.shape)).astype(np.float32)
