"""Synthetic lesions: the class list setting and class mix, each lesion's ground-truth record, and
its shape and appearance (metastasis, cyst, haemangioma) painted into the phantom.

Lesion classes of the synthetic cohort beyond metastasis and cyst, and the class list setting.

**haemangioma** (portal-venous phase): a well-defined, round lesion whose periphery enhances in
discontinuous nodules / globules to near the blood pool's density (150-180 HU), with centripetal
fill-in: the enhancement reaches inwards from the edge, further at the nodules, and the centre is
only partly filled (about 60-120 HU, depending on size and fill). Small lesions fill further (some
almost completely, "flash filling"); most large ones (>= 30 mm) keep a central unfilled scar.

The synthetic data are no real patient. Research use, not for diagnosis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from liverlesion.errors import UserError
from liverlesion.synth.shapes import random_rotation

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


@dataclass
class SynthLesion:
    """Ground truth of one synthetic lesion (generator parameters, not measured)."""

    label: int
    lesion_class: str
    diameter_mm: float
    centre_mm: tuple[float, float, float]  # (x, y, z) in the phantom frame
    design_hu: float  # HU of the lesion tissue before necrosis/rim/partial volume/noise
    necrotic: bool = False
    rim: bool = False
    complicated: bool = False
    lobulation: float = 0.0
    margin_mm: float = 0.0
    fill: float = 0.0  # haemangioma: how far the centripetal fill-in has reached (fraction of the radius)
    scar: bool = False  # haemangioma: central unfilled scar


class LesionPainter:
    """Places and paints lesions into a phantom (mixed into :class:`~liverlesion.synth.patient.Phantom`;
    uses its ``grid``, ``rng``, ``d``, ``hu``, ``liver``, ``liver_box`` and ``liver_hu``)."""

    def add_lesions(self, classes: list[str], first_label: int = 1) -> tuple[np.ndarray, list[SynthLesion]]:
        """Place non-overlapping lesions fully inside the liver and paint them; returns (labels, truth)."""
        g, rng, p = self.grid, self.rng, self.difficulty_params()
        labels = np.zeros(g.shape, dtype=np.uint8 if len(classes) < 255 else np.uint16)
        (zs, ys, xs) = self.liver_box[0]
        # distance to the liver surface on every 2nd row/column (speed); volume edges count as outside
        liver_b = np.pad(self.liver[zs, ys, xs][:, ::2, ::2], 1)
        sampling = (g.spacing[0], 2 * g.spacing[1], 2 * g.spacing[2])
        dist = ndimage.distance_transform_edt(liver_b, sampling=sampling)[1:-1, 1:-1, 1:-1]
        offset = np.array([zs.start, ys.start, xs.start])
        step = np.array([1, 2, 2])
        # partial-volume voxels reach half a voxel beyond the surface; the coarse grid errs by up to a pixel
        slack = 1.0 + 0.75 * g.spacing[0] + 1.5 * g.spacing[1]
        placed: list[tuple[np.ndarray, float]] = []
        lesions: list[SynthLesion] = []
        for i, cls in enumerate(classes):
            shape = self._lesion_shape(i + first_label, cls, p)
            centre = None
            while centre is None:
                reach = shape["rec"].diameter_mm / 2 * shape["max_scale"]
                cand = np.argwhere(dist >= reach + slack)
                picks = (
                    cand[rng.choice(len(cand), size=min(300, len(cand)), replace=False)]
                    if len(cand)
                    else cand
                )
                for idx in picks:
                    zi, yi, xi = idx * step + offset
                    jitter = rng.uniform(-0.25, 0.25, 3) * np.array(g.spacing[::-1])
                    c = np.array([g.x[xi], g.y[yi], g.z[zi]]) + jitter
                    if all(np.linalg.norm(c - pc) > reach + pr + 3.0 for pc, pr in placed):
                        centre = c
                        break
                if centre is None:  # crowded liver: shrink this lesion and retry
                    shape["rec"].diameter_mm = round(shape["rec"].diameter_mm * 0.8, 2)
                    if shape["rec"].diameter_mm < 2.0:
                        raise UserError(
                            f"--lesions: {len(classes)} lesions do not fit in one synthetic liver; "
                            f"use fewer --lesions per patient (or more --patients)"
                        )
            placed.append((centre, reach))
            shape["rec"].centre_mm = tuple(round(float(c), 2) for c in centre)
            self._render_lesion(labels, centre, shape, p)
            lesions.append(shape["rec"])
        return labels, lesions

    def difficulty_params(self) -> dict[str, float]:
        """Knobs that the difficulty (0 easy, 1 default, 2 hard) turns."""
        d = self.d
        return {
            "complicated_cyst": 0.05 + 0.15 * d,  # fraction of cysts that are proteinaceous/haemorrhagic
            "necrotic_met": 0.12 + 0.2 * d,  # fraction of metastases with a near-water centre
            "rim_met": 0.35,  # fraction of metastases with rim enhancement
            "met_hu": 66.0 - 10.0 * d,  # mean metastasis tissue HU
            "met_hu_sd": 9.0 + 4.0 * d,
            "texture": 1.3 - 0.3 * d,  # scales metastasis heterogeneity (lower = harder)
            "lobulation": 1.25 - 0.25 * d,  # scales metastasis margin lobulation
            "cyst_margin_mm": 0.3 + 0.35 * d,  # cyst edge blur (sharp when easy)
        }

    def _lesion_shape(self, label: int, cls: str, p: dict[str, float]) -> dict[str, Any]:
        rng = self.rng
        met = cls == "metastasis"
        haem = None
        if cls == HAEMANGIOMA:  # its own draws: the default classes' random stream is unchanged
            haem = haemangioma_params(rng, self.d)
            diam = haem["diameter_mm"]
        else:
            diam = float(np.clip(rng.lognormal(np.log(12.0 if met else 9.0), 0.7), 3.0, 50.0))
        rec = SynthLesion(label, cls, round(diam, 2), (0.0, 0.0, 0.0), 0.0)
        if haem is not None:
            axes = haem["axes"]
            rec.lobulation, rec.margin_mm = haem["lobulation"], haem["margin_mm"]
            rec.design_hu, rec.fill, rec.scar = haem["blood_hu"], haem["fill"], haem["scar"]
        elif met:
            axes = np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.65, 1.0)], dtype=np.float32)
            rec.lobulation = float(rng.uniform(0.06, 0.25) * p["lobulation"])
            rec.margin_mm = float(min(rng.uniform(1.0, 3.5), diam * rng.uniform(0.08, 0.2)))
            rec.design_hu = float(np.clip(rng.normal(p["met_hu"], p["met_hu_sd"]), 30, 90))
            rec.necrotic = bool(rng.random() < p["necrotic_met"])
            rec.rim = bool(rng.random() < p["rim_met"])
        else:
            axes = np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0)], dtype=np.float32)
            rec.lobulation = float(rng.uniform(0.0, 0.03))
            rec.margin_mm = float(rng.uniform(0.2, 1.0) * p["cyst_margin_mm"])
            rec.complicated = bool(rng.random() < p["complicated_cyst"])
            rec.design_hu = float(rng.uniform(25, 55) if rec.complicated else rng.uniform(0, 20))
        n_bumps = 5
        bump_dirs = rng.standard_normal((n_bumps, 3)).astype(np.float32)
        bump_dirs /= np.linalg.norm(bump_dirs, axis=1, keepdims=True)
        bump_amp = (rng.uniform(-1, 1, n_bumps) * rec.lobulation).astype(np.float32)
        return {
            "rec": rec,
            "axes": axes,
            "rot": random_rotation(rng),
            "bump_dirs": bump_dirs,
            "bump_amp": bump_amp,
            "kappa": float(rng.uniform(3, 7)),
            "haem": haem,
            # the farthest the lobulated surface can reach, in units of the radius
            "max_scale": 1.0 + float(np.clip(bump_amp, 0, None).sum()),
        }

    def _render_lesion(self, labels: np.ndarray, centre: np.ndarray, shape: dict[str, Any], p) -> None:
        g, rng = self.grid, self.rng
        rec = shape["rec"]
        r = rec.diameter_mm / 2
        met = rec.lesion_class == "metastasis"
        rot, axes = shape["rot"], shape["axes"]
        bump_dirs, bump_amp, kappa = shape["bump_dirs"], shape["bump_amp"], shape["kappa"]
        pad = r * shape["max_scale"] + rec.margin_mm + 2 * max(g.spacing)
        sl, zz, yy, xx = g.box(centre - pad, centre + pad)
        sz, sy, sx = g.spacing

        def shape_fields(zq, yq, xq):
            p_ = np.stack(np.broadcast_arrays(xq - centre[0], yq - centre[1], zq - centre[2]), -1)
            q = (p_ @ rot) / axes  # lesion frame, ellipsoid -> sphere
            dist = np.linalg.norm(q, axis=-1) + 1e-6
            u = q / dist[..., None]
            r_eff = r * (1 + (np.exp(kappa * (u @ bump_dirs.T - 1)) * bump_amp).sum(-1))
            return dist, r_eff

        # partial volume: average the occupancy over sub-samples spread across each voxel
        n_z = int(np.clip(math.ceil(sz / 1.25), 1, 4))
        n_xy = 2 if r < 8 else 1
        occ = np.zeros(np.broadcast_shapes(zz.shape, yy.shape, xx.shape), dtype=np.float32)
        width = max(rec.margin_mm, 0.15)
        for oz in (np.arange(n_z) + 0.5) / n_z - 0.5:
            for oy in (np.arange(n_xy) + 0.5) / n_xy - 0.5:
                for ox in (np.arange(n_xy) + 0.5) / n_xy - 0.5:
                    dist, r_eff = shape_fields(zz + oz * sz, yy + oy * sy, xx + ox * sx)
                    occ += np.clip(0.5 + (r_eff - dist) / width, 0, 1)
        occ /= n_z * n_xy * n_xy
        dist, r_eff = shape_fields(zz, yy, xx)
        rho = dist / r_eff
        if met:
            # clumpy viable tumour: texture coarser than the image noise
            grain = rng.uniform(2.0, 3.5)
            tex = ndimage.gaussian_filter(
                rng.standard_normal(occ.shape).astype(np.float32), (grain / sz, grain / sy, grain / sx)
            )
            tex /= tex.std() + 1e-6
            tissue = rec.design_hu + rng.uniform(8, 18) * p["texture"] * tex
            if rec.necrotic:
                core = rng.uniform(0.5, 0.85)
                w = np.clip((core - rho) / 0.2 + 0.5 + 0.25 * tex, 0, 1)
                tissue = tissue * (1 - w) + rng.uniform(5, 25) * w
            if rec.rim:  # enhancing viable rim, at or above the parenchyma's density
                ring = np.exp(-(((rho - 0.85) / 0.12) ** 2))
                tissue = tissue + ring * (self.liver_hu + rng.uniform(0, 30) - tissue)
        elif shape.get("haem") is not None:
            p_ = np.stack(np.broadcast_arrays(xx - centre[0], yy - centre[1], zz - centre[2]), -1)
            q = (p_ @ rot) / axes
            u = q / (np.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)
            tissue = haemangioma_tissue(rng, shape["haem"], rho, u)
        else:
            tissue = rec.design_hu + 1.5 * rng.standard_normal(occ.shape).astype(np.float32)
        view = self.hu[sl]
        view += occ * (tissue - view)
        # the reader outlines what is visible: voxels at least half occupied (the centre voxel for tiny lesions)
        mask = occ >= min(0.5, 0.999 * float(occ.max()))
        assert not labels[sl][mask].any(), "lesions overlap"
        assert self.liver[sl][mask].all(), "lesion outside the liver"
        labels[sl][mask] = rec.label
