"""Synthetic abdominal CT cohort: colorectal liver metastases vs simple cysts.

The demo and the tests need CT-like data that can be shared freely. Each
synthetic patient is a portal-venous abdominal CT phantom: body outline with
skin, subcutaneous fat and abdominal-wall muscle, spine, ribs, paraspinal and
psoas muscles, aorta, IVC, kidneys, spleen, stomach, gallbladder, bowel loops,
lung bases and heart at the top, the CT table, and a liver with branching
enhanced portal and hepatic veins. Lesions are placed inside the liver:

* **cyst**: water density (0-20 HU), homogeneous, sharp round/oval margin; a
  difficulty-dependent fraction is "complicated" (proteinaceous, 25-45 HU).
* **metastasis**: hypo-attenuating soft tissue (~40-80 HU), heterogeneous
  texture, lobulated and ill-defined margin, sometimes rim enhancement, sometimes
  a necrotic centre close to cyst density.

Voxels integrate the scene over their footprint (partial volume: small lesions
on thick slices look fainter), then the image is blurred by a point-spread
function and Gaussian noise with a CT-like noise power spectrum is added
(filtered back-projection: the ramp filter times a soft-tissue apodisation, so
the noise is fine-grained and band-pass, not blotchy). The in-plane matrix is
384 x 384 by default (``matrix``), about 0.75-1.0 mm pixels, at the coarse end of
clinical CT (0.6-0.9 mm at 512 x 512); a 192 matrix (1.5-2 mm) is faster but
its partial volume makes small cysts look much denser than they would on CT,
so it is meant for tests only.

Class mix: 60 % metastasis, 40 % cyst (exact counts), lesions of one patient are
correlated in class (patients tend to have mostly metastases or mostly cysts),
as in clinical cohorts. Diameters are log-normal (median 12 mm for metastases,
9 mm for cysts), clipped to 3-50 mm; about 40 % are under 10 mm.

The data are synthetic: no real patient is depicted. Research use, not for diagnosis.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from liverlesion import DISCLAIMER
from liverlesion.errors import UserError
from liverlesion.synth_lesions import (
    DEFAULT_CLASSES,
    HAEMANGIOMA,
    allocate_classes,
    haemangioma_params,
    haemangioma_tissue,
    parse_classes,
)

CLASSES = DEFAULT_CLASSES  # the default class list (``generate_cohort(classes=...)`` sets another)
METASTASIS_FRACTION = 0.6  # class mix of the cohort (metastasis : cyst = 60 : 40)
MAX_LESIONS_PER_PATIENT = 12  # more would not fit non-overlapping in a liver
IN_PLANE_PX = 384  # default rows = columns of every volume (``matrix``)
MATRIX_RANGE = (64, 1024)
NPS_PEAK_LP_MM = 0.3  # noise power spectrum peak of a soft-tissue kernel, line pairs per mm
SLICE_THICKNESSES_MM = (1.25, 2.0, 2.5, 3.0, 5.0)
SLICE_THICKNESS_P = (0.1, 0.15, 0.3, 0.2, 0.25)
MIN_SLICES, MAX_SLICES = 40, 80
SYNTHETIC_NOTE = f"SYNTHETIC DATA (no real patient); {DISCLAIMER}"


# --------------------------------------------------------------------------- geometry helpers
class _Grid:
    """Voxel centres in mm in the patient frame: x -> patient left, y -> posterior, z -> superior.

    ``z`` is measured from the liver's centre, so anatomy can be placed relative to it.
    The array is ``[z, y, x]``: row 0 anterior, column 0 patient right, slice 0 inferior (LPS).
    """

    def __init__(
        self, shape: tuple[int, int, int], spacing: tuple[float, float, float], y_centre: float, z0: float
    ):
        self.shape = shape
        self.spacing = spacing  # (z, y, x) mm
        nz, ny, nx = shape
        sz, sy, sx = spacing
        self.z = (z0 + np.arange(nz) * sz).astype(np.float32)
        self.y = (y_centre + (np.arange(ny) - (ny - 1) / 2) * sy).astype(np.float32)
        self.x = ((np.arange(nx) - (nx - 1) / 2) * sx).astype(np.float32)

    def _range(self, axis: np.ndarray, step: float, lo: float, hi: float) -> slice:
        i0 = int(math.floor((lo - axis[0]) / step))
        i1 = int(math.ceil((hi - axis[0]) / step)) + 1
        return slice(max(i0, 0), min(max(i1, 0), len(axis)))

    def box(self, lo: np.ndarray, hi: np.ndarray):
        """Index slices and broadcastable local coordinates for the mm box ``lo..hi`` (x, y, z)."""
        sz, sy, sx = self.spacing
        zs = self._range(self.z, sz, lo[2], hi[2])
        ys = self._range(self.y, sy, lo[1], hi[1])
        xs = self._range(self.x, sx, lo[0], hi[0])
        if zs.stop <= zs.start or ys.stop <= ys.start or xs.stop <= xs.start:
            return None
        return (
            (zs, ys, xs),
            self.z[zs][:, None, None],
            self.y[ys][None, :, None],
            self.x[xs][None, None, :],
        )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: tuple[float, ...]) -> np.ndarray:
    """Low-frequency noise (std ~1) with correlation length ~``cell`` voxels per axis.

    White noise on a coarse lattice is interpolated with a Gaussian kernel, one axis at a
    time as a small matrix product: much faster than filtering a full-size volume.
    """
    coarse_shape = [int(math.ceil(n / c)) + 3 for n, c in zip(shape, cell, strict=True)]
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)

    def weights(n: int, c: float, m: int) -> np.ndarray:
        t = np.arange(n, dtype=np.float32) / c + 1.5  # output positions in lattice units
        w = np.exp(-0.5 * ((t[:, None] - np.arange(m)[None, :]) / 0.6) ** 2)
        return (w / np.sqrt((w**2).sum(1, keepdims=True))).astype(np.float32)  # unit variance everywhere

    wz, wy, wx = (weights(n, c, m) for n, c, m in zip(shape, cell, coarse_shape, strict=True))
    out = np.tensordot(wz, coarse, axes=(1, 0))  # (nz, cy, cx): cheap while y, x are coarse
    out = np.einsum("yc,zcx->zyx", wy, out)  # (nz, ny, cx)
    return (out.reshape(-1, coarse_shape[2]) @ wx.T).reshape(shape)  # one 2-D matmul for the big step


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _ellipsoid_rho(zz, yy, xx, centre, axes) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) for axis-aligned axes (x, y, z) mm."""
    return np.sqrt(
        ((xx - centre[0]) / axes[0]) ** 2
        + ((yy - centre[1]) / axes[1]) ** 2
        + ((zz - centre[2]) / axes[2]) ** 2
    )


def _superellipse_rho(
    y: np.ndarray, x: np.ndarray, a: float, b_ant: float, b_post: float, p: float
) -> np.ndarray:
    b = np.where(y < 0, b_ant, b_post)
    return ((np.abs(x) / a) ** p + (np.abs(y) / b) ** p) ** (1.0 / p)


# --------------------------------------------------------------------------- records
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


@dataclass
class SynthPatient:
    """One synthetic study: int16 HU, lesion labels, the liver mask and geometry."""

    patient_id: str
    hu: np.ndarray  # int16 [z, y, x]
    labels: np.ndarray  # uint8/uint16 [z, y, x], lesion k has value k
    liver: np.ndarray  # bool [z, y, x]
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # LPS (x, y, z) mm of voxel [0, 0, 0]
    lesions: list[SynthLesion] = field(default_factory=list)
    params: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- patient phantom
class _Phantom:
    """Builds one patient's noiseless HU volume structure by structure (later ones paint over earlier)."""

    def __init__(self, rng: np.random.Generator, difficulty: float, matrix: int = IN_PLANE_PX):
        self.rng = rng
        self.d = difficulty
        u = rng.uniform
        # body habitus
        self.ax = u(135, 170)  # lateral semi-axis of the body outline
        self.ay_ant = self.ax * u(0.66, 0.8)
        self.ay_post = self.ay_ant * u(0.85, 0.95)
        self.p = u(2.0, 2.5)  # superellipse exponent: >2 squarer flanks
        self.t_fat = (u(12, 40), u(10, 35), u(8, 25))  # anterior, lateral, posterior subcutaneous fat
        self.t_mus = u(7, 13)
        self.fat_hu = u(-110, -90)
        self.muscle_hu = u(45, 62)
        self.liver_hu = u(100, 122)  # portal-venous parenchyma
        self.vessel_hu = self.liver_hu + u(40, 70)
        self.aorta_hu = u(140, 200)
        self.noise_sd = u(10, 20) * (0.75 + 0.25 * difficulty)
        self.psf_px = 0.5 + 0.15 * difficulty
        # geometry: field of view follows the body, as a technologist would set it
        fov = 2 * self.ax * u(1.06, 1.16)
        px = fov / matrix
        thk = float(rng.choice(SLICE_THICKNESSES_MM, p=SLICE_THICKNESS_P))
        coverage = u(170, 240)
        nz = int(np.clip(round(coverage / thk), MIN_SLICES, MAX_SLICES))
        self.liver_h = u(130, 175)  # cranio-caudal liver height
        # which part of the body is covered: centred near the liver, top reaches the lung bases when long enough
        z_top = self.liver_h / 2 + u(-10, 40)
        z0 = z_top - (nz - 1) * thk
        if z0 > -self.liver_h / 2 + 10:  # thin-slice scans with short coverage: keep the liver centred
            z0 = -(nz - 1) * thk / 2 + u(-10, 10)
        self.grid = _Grid((nz, matrix, matrix), (thk, px, px), y_centre=u(10, 25), z0=z0)
        self.hu = np.full(self.grid.shape, -1000.0, dtype=np.float32)
        self.liver = np.zeros(self.grid.shape, dtype=bool)
        g = self.grid
        self.Y2, self.X2 = np.meshgrid(g.y, g.x, indexing="ij")
        # spine position anchors the posterior anatomy
        self.vb_r = u(17, 22)
        self.vb_y = self.ay_post - u(70, 85)

    # --- helpers
    def body_scale(self, z: np.ndarray) -> np.ndarray:
        """Outline scale per slice: slightly wider towards the pelvis."""
        return (1.0 - 0.03 * z / 100.0).astype(np.float32)

    def _layer_rho(self, inset: tuple[float, float, float]) -> np.ndarray:
        a = self.ax - inset[1]
        return _superellipse_rho(
            self.Y2, self.X2, a, self.ay_ant - inset[0], self.ay_post - inset[2], self.p
        ) * (1 + self._wobble)

    def inside(self, rho2d: np.ndarray, box) -> np.ndarray:
        (zs, ys, xs), zz, _, _ = box
        return rho2d[ys, xs][None] < self.body_scale(zz[:, 0, 0])[:, None, None]

    def paint(self, box, mask: np.ndarray, value) -> None:
        sl = box[0]
        view = self.hu[sl]
        if np.ndim(value) == 0:
            view[mask] = value
        else:
            view[mask] = np.broadcast_to(value, mask.shape)[mask]

    def full_box(self, z_lo: float = -1e9, z_hi: float = 1e9):
        g = self.grid
        return g.box(np.array([g.x[0], g.y[0], z_lo]), np.array([g.x[-1], g.y[-1], z_hi]))

    # --- anatomy
    def build(self) -> None:
        rng = self.rng
        theta = np.arctan2(self.Y2, self.X2)
        self._wobble = sum(
            rng.uniform(0, 0.02) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
        ).astype(np.float32)
        tf = self.t_fat
        self.rho_body = self._layer_rho((0, 0, 0))
        self.rho_skin = self._layer_rho((2.0, 2.0, 2.0))
        self.rho_fat = self._layer_rho(tf)
        self.rho_cav = self._layer_rho(tuple(t + self.t_mus for t in tf))
        box = self.full_box()
        self.paint(box, self.inside(self.rho_body, box), 25.0)  # skin
        self.paint(box, self.inside(self.rho_skin, box), self.fat_hu)
        self.paint(box, self.inside(self.rho_fat, box), self.muscle_hu)
        cavity = self.inside(self.rho_cav, box)
        self.paint(box, cavity, self.fat_hu + 10)  # visceral fat
        self._bowel(cavity)
        self._lungs(cavity)
        self._heart()
        self._stomach()
        self._spleen()
        self._liver()
        self._gallbladder()
        self._great_vessels()
        self._kidneys()
        self._muscles()
        self._spine()
        self._ribs()
        self._table()

    def _bowel(self, cavity: np.ndarray) -> None:
        """Bowel loops as tubes: the zero crossings of two smooth noise fields intersect in curves."""
        g, rng = self.grid, self.rng
        top = self.liver_h / 2 - 30
        box = self.full_box(z_hi=top)
        if box is None:
            return
        (zs, _, _), _, _, _ = box
        shape = self.hu[box[0]].shape
        cell = (max(22.0 / g.spacing[0], 1.5), 22.0 / g.spacing[1], 22.0 / g.spacing[2])
        n1, n2 = _smooth_noise(rng, shape, cell), _smooth_noise(rng, shape, cell)
        t = np.sqrt(n1**2 + n2**2)
        gas = _smooth_noise(rng, shape, tuple(2 * c for c in cell)) > 0.5
        cav = cavity[zs]
        lumen_r, wall_r = 0.26, 0.36
        self.paint(box, cav & (t < wall_r), self.muscle_hu - 10)  # bowel wall
        lumen = cav & (t < lumen_r)
        self.paint(box, lumen & gas, -1000.0)
        self.paint(box, lumen & ~gas, rng.uniform(5, 25))

    def _lungs(self, cavity: np.ndarray) -> None:
        """Lung bases above the diaphragm; the posterior recess reaches lower."""
        rng = self.rng
        lo = self.liver_h / 2 - 80
        box = self.full_box(z_lo=lo)
        if box is None:
            return
        (zs, _, _), zz, yy, xx = box
        # diaphragm: a dome, lowest in the posterior recesses, highest over the mediastinum
        level = (
            self.liver_h / 2
            - 20
            - 45 * np.clip((yy + 20) / self.ay_post, 0, 1) ** 1.5
            + 60 * np.exp(-((xx / 35) ** 2))
        )
        lung = cavity[zs] & (zz > level)
        shape = lung.shape
        tex = _smooth_noise(rng, shape, (2.0, 6.0, 6.0))
        specks = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.6, 0.8, 0.8))
        specks = np.clip((specks / specks.std() - 2.3) * 500, 0, 700)  # small pulmonary vessels
        self.paint(box, lung, -860 + 25 * tex + specks)

    def _heart(self) -> None:
        c = np.array([20.0, -30.0, self.liver_h / 2 + 55])
        ax = np.array([70.0, 55.0, 55.0])
        box = self.grid.box(c - ax, c + ax)
        if box is None:
            return
        rho = _ellipsoid_rho(*box[1:], c, ax)
        self.paint(box, rho < 1.0, 10.0)  # pericardium/fat boundary
        self.paint(box, rho < 0.95, 100.0)  # myocardium
        self.paint(box, rho < 0.7, self.aorta_hu - 10)  # contrast-filled chambers

    def _stomach(self) -> None:
        rng = self.rng
        c = np.array([rng.uniform(45, 65), rng.uniform(-35, -10), self.liver_h / 2 - rng.uniform(20, 50)])
        ax = np.array([rng.uniform(35, 50), rng.uniform(30, 42), rng.uniform(40, 60)])
        box = self.grid.box(c - ax, c + ax)
        if box is None:
            return
        rho = _ellipsoid_rho(*box[1:], c, ax)
        self.paint(box, rho < 1.0, 75.0)  # enhancing wall
        inner = rho < 1.0 - 5.0 / ax.min()
        self.paint(box, inner, rng.uniform(10, 35))
        if rng.random() < 0.7:  # air rises anteriorly in a supine patient: air-fluid level
            level = c[1] - ax[1] * rng.uniform(0.1, 0.6)
            self.paint(box, inner & (box[2] < level), -1000.0)

    def _spleen(self) -> None:
        rng = self.rng
        c = np.array([self.ax * 0.6, self.vb_y - 10, rng.uniform(0, 40)])
        ax = np.array([rng.uniform(20, 30), rng.uniform(40, 55), rng.uniform(45, 60)])
        box = self.grid.box(c - ax, c + ax)
        if box is None:
            return
        rho = _ellipsoid_rho(*box[1:], c, ax)
        self.paint(box, (rho < 1.0) & self.inside(self.rho_cav, box), self.liver_hu + rng.uniform(0, 15))

    def _liver(self) -> None:
        """Right lobe + left lobe ellipsoids, deformed by smooth noise, clipped by the abdominal wall."""
        rng, g = self.rng, self.grid
        a_cav = self.ax - self.t_fat[1] - self.t_mus
        h2 = self.liver_h / 2
        right_c = np.array([-a_cav * rng.uniform(0.38, 0.48), rng.uniform(-10, 5), 0.0])
        right_a = np.array([a_cav * rng.uniform(0.6, 0.7), rng.uniform(75, 95), h2])
        left_c = np.array(
            [rng.uniform(-10, 10), -self.ay_ant * rng.uniform(0.4, 0.55), h2 * rng.uniform(0.25, 0.45)]
        )
        left_a = np.array([rng.uniform(40, 55), rng.uniform(18, 28), h2 * rng.uniform(0.4, 0.55)])
        lo = np.minimum(right_c - right_a, left_c - left_a) - 10
        hi = np.maximum(right_c + right_a, left_c + left_a) + 10
        box = g.box(lo, hi)
        _, zz, yy, xx = box
        rho = np.minimum(
            _ellipsoid_rho(zz, yy, xx, right_c, right_a), _ellipsoid_rho(zz, yy, xx, left_c, left_a)
        )
        shape = rho.shape
        cell = (max(35.0 / g.spacing[0], 1.5), 35.0 / g.spacing[1], 35.0 / g.spacing[2])
        rho = rho + 0.08 * _smooth_noise(rng, shape, cell)
        liver = (rho < 1.0) & self.inside(self.rho_cav, box)
        # the liver sits anterior/right of the spine and aorta (retroperitoneal fat around them)
        retro = ((xx - 10) / (self.vb_r + 22)) ** 2 + ((yy - self.vb_y) / (self.vb_r + 28)) ** 2 < 1
        liver &= ~retro
        texture = self.liver_hu + 4.0 * _smooth_noise(rng, shape, (max(8 / g.spacing[0], 1.2), 8, 8))
        self.paint(box, liver, texture)
        self.liver[box[0]] |= liver
        self.liver_box = box
        self._hepatic_vessels(right_c, right_a, left_c)

    def _hepatic_vessels(self, right_c, right_a, left_c) -> None:
        rng = self.rng
        hilum = np.array([right_c[0] + right_a[0] * 0.55, right_c[1] + 15, -self.liver_h * 0.12])
        ivc_top = np.array([-22.0, self.vb_y - self.vb_r - 14, self.liver_h * 0.35])
        roots = [
            (hilum, (-1.0, -0.1, 0.25), rng.uniform(5, 7)),  # right portal vein
            (hilum, (1.0, -0.8, 0.35), rng.uniform(4, 5.5)),  # left portal vein
            (ivc_top, (-1.0, -0.3, -0.5), rng.uniform(4, 5.5)),  # right hepatic vein
            (ivc_top, (-0.2, -1.0, -0.4), rng.uniform(3.5, 5)),  # middle hepatic vein
            (ivc_top, (0.7, -0.9, -0.3), rng.uniform(3, 4.5)),  # left hepatic vein
        ]
        segments: list[tuple[np.ndarray, np.ndarray, float]] = []
        for start, direction, radius in roots:
            d = np.asarray(direction, dtype=float)
            self._branch(start, d / np.linalg.norm(d), radius, 4, segments)
        for a, b, r in segments:
            self._tube(a, b, r, self.vessel_hu, within_liver=True)

    def _branch(self, start, direction, radius, depth, segments) -> None:
        rng = self.rng
        end = start + direction * radius * rng.uniform(5, 9)
        segments.append((start, end, radius))
        if depth == 0 or radius < 1.4:
            return
        perp = rng.standard_normal(3)
        perp -= perp.dot(direction) * direction
        perp /= np.linalg.norm(perp)
        for sign in (1, -1):
            ang = np.deg2rad(rng.uniform(20, 45))
            new = np.cos(ang) * direction + sign * np.sin(ang) * perp
            self._branch(end, new / np.linalg.norm(new), radius * rng.uniform(0.65, 0.8), depth - 1, segments)

    def _tube(self, a, b, r, value, within_liver=False) -> None:
        g = self.grid
        pad = r + 2 * max(g.spacing)
        box = g.box(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if box is None:
            return
        _, zz, yy, xx = box
        ab = b - a
        length2 = float(ab.dot(ab)) + 1e-6
        dx, dy, dz = xx - a[0], yy - a[1], zz - a[2]
        t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / length2, 0, 1)
        d = np.sqrt((dx - t * ab[0]) ** 2 + (dy - t * ab[1]) ** 2 + (dz - t * ab[2]) ** 2)
        # soft edge about one voxel wide: thin vessels are dimmed by partial volume
        m = np.clip(0.5 + (r - d) / max(g.spacing[1], 0.5 * g.spacing[0]), 0, 1)
        if within_liver:
            m = m * self.liver[box[0]]
        view = self.hu[box[0]]
        view += m * (value - view)

    def _gallbladder(self) -> None:
        rng = self.rng
        if rng.random() < 0.2:  # cholecystectomy or contracted
            return
        c = np.array([rng.uniform(-45, -25), -self.ay_ant * rng.uniform(0.3, 0.45), -self.liver_h * 0.3])
        ax = np.array([rng.uniform(12, 18), rng.uniform(12, 18), rng.uniform(25, 40)])
        box = self.grid.box(c - ax, c + ax)
        if box is None:
            return
        rho = _ellipsoid_rho(*box[1:], c, ax)
        self.paint(box, (rho < 1.0) & self.inside(self.rho_cav, box), 45.0)  # wall
        inner = (rho < 1.0 - 2.5 / ax.min()) & self.inside(self.rho_cav, box)
        self.paint(box, inner, rng.uniform(0, 20))
        self.liver[box[0]] &= ~(rho < 1.0)

    def _great_vessels(self) -> None:
        rng, g = self.rng, self.grid
        ay = self.vb_y - self.vb_r - rng.uniform(10, 14)
        box = g.box(np.array([-45.0, ay - 20, g.z[0]]), np.array([35.0, ay + 20, g.z[-1]]))
        _, zz, yy, xx = box
        shape = self.hu[box[0]].shape
        ar = rng.uniform(10, 13)
        aorta = (xx - rng.uniform(5, 15)) ** 2 + (yy - ay) ** 2 < ar**2
        ivc = ((xx + 24) / 13) ** 2 + ((yy - (ay - 2)) / 9) ** 2 < 1
        self.paint(box, np.broadcast_to(ivc, shape), self.liver_hu + rng.uniform(10, 30))
        self.paint(box, np.broadcast_to(aorta, shape), self.aorta_hu)
        if rng.random() < 0.5:  # atherosclerotic wall calcification
            ang = rng.uniform(0, 2 * np.pi)
            ax_ = rng.uniform(5, 15) + ar * np.cos(ang)
            ay_ = ay + ar * np.sin(ang)
            calc = (xx - ax_) ** 2 + (yy - ay_) ** 2 < 4.0
            self.paint(box, np.broadcast_to(calc, shape) & (zz < rng.uniform(-60, 40)), 700.0)
        self.liver[box[0]] &= ~np.broadcast_to(aorta | ivc, shape)

    def _kidneys(self) -> None:
        """Kidneys in perirenal fat; the fat fills the renal fossa down to the posterior wall, pushing the liver away."""
        rng = self.rng
        for side, z_c in ((-1, -self.liver_h * 0.35), (1, -self.liver_h * 0.25)):
            c = np.array(
                [
                    side * (self.vb_r + rng.uniform(40, 50)),
                    self.vb_y + rng.uniform(8, 18),
                    z_c + rng.uniform(-10, 10),
                ]
            )
            ax = np.array([rng.uniform(24, 30), rng.uniform(18, 24), rng.uniform(45, 60)])
            fat_ax = ax + 8
            box = self.grid.box(c - fat_ax, c + fat_ax + np.array([0, 80, 0]))
            if box is None:
                continue
            _, zz, yy, xx = box
            rho = _ellipsoid_rho(zz, yy, xx, c, ax)
            behind = np.where(yy > c[1], 80.0, 0.0)  # the fossa extends posteriorly to the wall
            fossa = (
                ((xx - c[0]) / fat_ax[0]) ** 2
                + ((yy - c[1]) / (fat_ax[1] + behind)) ** 2
                + ((zz - c[2]) / fat_ax[2]) ** 2
                < 1
            ) & self.inside(self.rho_cav, box)
            self.paint(box, fossa, self.fat_hu + 10)
            kidney = rho < 1.0
            self.paint(box, kidney, rng.uniform(150, 190))  # cortex
            medulla = (rho < 0.75) & (rho > 0.35)
            self.paint(box, medulla, rng.uniform(110, 140))
            sinus = (rho < 0.6) & ((xx - c[0]) * side < 0)  # renal sinus fat opens medially
            self.paint(box, sinus, self.fat_hu + 20)
            self.liver[box[0]] &= ~(fossa | kidney)

    def _muscles(self) -> None:
        g = self.grid
        box = g.box(np.array([-80.0, self.vb_y - 30, g.z[0]]), np.array([80.0, self.vb_y + 80, g.z[-1]]))
        _, zz, yy, xx = box
        shape = self.hu[box[0]].shape
        py = self.vb_y + self.vb_r + 30
        para = (((np.abs(xx) - 34) / 30) ** 2 + ((yy - py) / 26) ** 2 < 1) & (self.rho_fat[box[0][1:]] < 1.0)
        self.paint(box, np.broadcast_to(para, shape), self.muscle_hu)
        # psoas grows towards the pelvis
        r = np.clip((-zz - self.liver_h * 0.2) / 6, 0, 20)
        psoas = ((np.abs(xx) - self.vb_r - 12) ** 2 + (yy - self.vb_y + 3) ** 2) < r**2
        self.paint(box, psoas, self.muscle_hu)
        self.liver[box[0]] &= ~(psoas | np.broadcast_to(para, shape))

    def _spine(self) -> None:
        rng, g = self.rng, self.grid
        y0, r = self.vb_y, self.vb_r
        box = g.box(np.array([-45.0, y0 - r - 2, g.z[0]]), np.array([45.0, y0 + r + 60, g.z[-1]]))
        _, zz, yy, xx = box
        body = ((xx / (r * 1.1)) ** 2 + ((yy - y0) / r) ** 2) < 1
        cancellous = ((xx / (r * 1.1 - 2)) ** 2 + ((yy - y0) / (r - 2)) ** 2) < 1
        canal_y = y0 + r + 9
        canal = xx**2 + (yy - canal_y) ** 2 < 8**2
        arch = (xx**2 + (yy - canal_y) ** 2 < 12.5**2) & ~canal & (yy > y0 + r - 2)
        spinous = (xx / 4) ** 2 + ((yy - canal_y - 20) / 12) ** 2 < 1
        transverse = ((np.abs(xx) - 19) / 8) ** 2 + ((yy - canal_y + 3 - 0.3 * np.abs(xx)) / 3.5) ** 2 < 1
        period = rng.uniform(30, 36)
        phase = rng.uniform(0, period)
        disc = ((zz + phase) % period) < 7  # intervertebral discs between vertebral bodies
        shape = self.hu[box[0]].shape
        full = lambda m: np.broadcast_to(m, shape)  # noqa: E731
        self.paint(box, full(body), 700.0)
        trab = 230 + 40 * _smooth_noise(rng, shape, (1.5, 2.0, 2.0))
        self.paint(box, full(cancellous), trab)
        self.paint(box, full(body) & disc, 85.0)
        self.paint(box, full(arch | spinous | transverse), 550.0)
        self.paint(box, full(canal), 25.0)
        self.liver[box[0]] &= ~full(body | arch | spinous | transverse | canal)

    def _ribs(self) -> None:
        """Ribs cross each axial slice obliquely: oval cortical rings along the body wall, above the costal margin."""
        rng, g = self.rng, self.grid
        a = self.ax - self.t_fat[1] - self.t_mus * 0.9
        angles = np.deg2rad(
            np.array([-150, -125, -100, -40, -15, 10, 35, 60, 120, 145, 170]) + rng.uniform(-8, 8)
        )
        z_min = -self.liver_h * 0.25
        for k, th in enumerate(angles):
            period, phase = rng.uniform(25, 35), rng.uniform(0, 30)
            for iz, z in enumerate(g.z):
                if z < z_min + 25 * abs(np.sin(th)) or ((z + phase) % period) > period * 0.55:
                    continue
                sc = self.body_scale(np.array([z]))[0]
                thz = th + 0.004 * z * (1 if k % 2 else -1)
                b = (
                    self.ay_ant - self.t_fat[0] if np.sin(thz) < 0 else self.ay_post - self.t_fat[2]
                ) - self.t_mus * 0.9
                cx, cy = a * np.cos(thz) * sc, b * np.sin(thz) * sc
                if cy > self.vb_y - 10 and abs(cx) < 45:
                    continue
                bx = g.box(np.array([cx - 9, cy - 9, z - 0.1]), np.array([cx + 9, cy + 9, z + 0.1]))
                if bx is None:
                    continue
                (zs, ys, xs), _, yy, xx = bx
                zs = slice(iz, iz + 1)
                bx = ((zs, ys, xs),) + bx[1:]
                t = np.array([-np.sin(thz), np.cos(thz)])  # rib runs along the wall
                u_ = (xx - cx) * t[0] + (yy - cy) * t[1]
                v_ = (xx - cx) * t[1] - (yy - cy) * t[0]
                rr = (u_ / 8.0) ** 2 + (v_ / 5.0) ** 2
                cort = np.broadcast_to(rr < 1, (1,) + rr.shape[1:])
                marrow = np.broadcast_to(rr < 0.45, (1,) + rr.shape[1:])
                self.paint(bx, cort, 750.0)
                self.paint(bx, marrow, 260.0)

    def _table(self) -> None:
        box = self.full_box()
        _, _, yy, xx = box
        y_table = self.ay_post + 12 + 0.0006 * xx**2
        band = (yy > y_table) & (yy < y_table + 4)
        pad = (yy > y_table - 10) & (yy <= y_table)
        inside = self.rho_body[None] < 1.0
        self.paint(box, np.broadcast_to(pad, self.hu.shape) & ~inside, -930.0)
        self.paint(box, np.broadcast_to(band, self.hu.shape) & ~inside, 250.0)

    # --- lesions
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
            "rot": _random_rotation(rng),
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

    def finish(self) -> np.ndarray:
        """Point-spread blur, CT-like noise (in-plane), quantisation to int16 HU."""
        g, rng = self.grid, self.rng
        img = ndimage.gaussian_filter(self.hu, (0.35, self.psf_px, self.psf_px), truncate=3.0)
        img += ct_noise(rng, g.shape, g.spacing[1], self.noise_sd)
        return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


def ct_noise(rng: np.random.Generator, shape: tuple[int, int, int], pixel_mm: float, sd: float) -> np.ndarray:
    """Gaussian noise whose in-plane power spectrum is that of filtered back-projection.

    NPS(f) ~ f * exp(-(f / f_c)^2): zero at f = 0 (the ramp filter), peaking at
    ``NPS_PEAK_LP_MM`` line pairs per mm (a soft-tissue kernel). Slices are independent.
    """
    from scipy import fft

    white = rng.standard_normal(shape, dtype=np.float32)
    fy = fft.fftfreq(shape[1], d=pixel_mm)
    fx = fft.rfftfreq(shape[2], d=pixel_mm)
    f = np.hypot(fy[:, None], fx[None, :])
    fc = NPS_PEAK_LP_MM * math.sqrt(2.0)
    amp = np.sqrt(f * np.exp(-((f / fc) ** 2))).astype(np.float32)
    spectrum = fft.rfft2(white, axes=(1, 2))  # float32 in, complex64 out
    spectrum *= amp
    noise = fft.irfft2(spectrum, s=shape[1:], axes=(1, 2)).astype(np.float32, copy=False)
    noise *= sd / (float(noise.std()) + 1e-6)
    return noise


def simulate_patient(
    patient_id: str,
    classes: list[str],
    seed: int | list[int],
    difficulty: float = 1.0,
    matrix: int = IN_PLANE_PX,
) -> SynthPatient:
    """Simulate one patient's CT with the given lesions.

    Args:
        patient_id: Identifier written to the manifest.
        classes: Class of each lesion (``metastasis``, ``cyst`` or ``haemangioma``); lesion k gets label k+1.
        seed: Seed (or seed sequence entropy) for this patient.
        difficulty: 0 easy, 1 default, 2 hard.
        matrix: In-plane rows = columns (pixel size = field of view / matrix).

    Returns:
        The volume, lesion labels, liver mask, geometry and lesion ground truth.
    """
    rng = np.random.default_rng(seed)
    ph = _Phantom(rng, difficulty, matrix)
    ph.build()
    labels, lesions = ph.add_lesions(list(classes))
    hu = ph.finish()
    g = ph.grid
    return SynthPatient(
        patient_id=patient_id,
        hu=hu,
        labels=labels,
        liver=ph.liver,
        spacing=tuple(float(s) for s in g.spacing),
        origin=(float(g.x[0]), float(g.y[0]), float(g.z[0])),
        lesions=lesions,
        params={
            "noise_sd": round(float(ph.noise_sd), 2),
            "liver_hu": round(float(ph.liver_hu), 1),
            "slice_mm": float(g.spacing[0]),
            "pixel_mm": round(float(g.spacing[1]), 3),
        },
    )


# --------------------------------------------------------------------------- cohort
def _allocate(
    rng: np.random.Generator, patients: int, lesions: int, classes: tuple[str, ...] = CLASSES
) -> list[list[str]]:
    """Lesion classes per patient: counts vary, exact class mix, classes correlated within a patient.

    The default metastasis/cyst cohort keeps its original draws (60/40), so it stays the same cohort.
    """
    counts = np.ones(patients, dtype=int)
    rest = lesions - patients
    while rest > 0:
        room = MAX_LESIONS_PER_PATIENT - counts
        w = rng.gamma(1.5, size=patients) * (room > 0)
        add = rng.multinomial(rest, w / w.sum())
        add = np.minimum(add, room)
        counts += add
        rest -= int(add.sum())
    if set(classes) != set(CLASSES):
        return allocate_classes(rng, counts, classes)
    n_met = int(round(METASTASIS_FRACTION * lesions))
    propensity = rng.normal(0, 1.0, patients)  # patients differ in how likely their lesions are metastases
    score = np.repeat(propensity, counts) + rng.normal(0, 1.0, lesions)
    is_met = np.zeros(lesions, dtype=bool)
    is_met[np.argsort(-score)[:n_met]] = True
    out, k = [], 0
    for c in counts:
        out.append(["metastasis" if m else "cyst" for m in is_met[k : k + c]])
        k += c
    return out


def _n_workers(workers: int | None, patients: int) -> int:
    """Processes for cohort generation: the free cores (at most 4), never more than the patients."""
    if workers is not None:
        return max(1, min(int(workers), patients))
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4, patients))


def _write_patient(
    folder: Path, pid: str, classes: list[str], seed: list[int], difficulty: float, matrix: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Simulate one patient, write its image and mask; returns its manifest and truth rows."""
    with _single_thread_blas():
        pat = simulate_patient(pid, classes, seed=seed, difficulty=difficulty, matrix=matrix)
        _write_nifti(pat.hu, pat.spacing, pat.origin, folder / "images" / f"{pid}.nii.gz")
        _write_nifti(pat.labels, pat.spacing, pat.origin, folder / "masks" / f"{pid}.nii.gz")
        n_vox = np.bincount(pat.labels.ravel(), minlength=len(classes) + 1)
        sums = np.bincount(pat.labels.ravel(), weights=pat.hu.ravel(), minlength=len(classes) + 1)
    rows, truth = [], []
    for les in pat.lesions:
        rows.append(
            {
                "patient_id": pid,
                "image": f"images/{pid}.nii.gz",
                "mask": f"masks/{pid}.nii.gz",
                "label": les.label,
                "lesion_class": les.lesion_class,
            }
        )
        truth.append(
            {
                "patient_id": pid,
                "label": les.label,
                "lesion_class": les.lesion_class,
                "diameter_mm": les.diameter_mm,
                "n_voxels": int(n_vox[les.label]),
                "mean_hu": round(float(sums[les.label] / n_vox[les.label]), 2),
                "design_hu": round(les.design_hu, 1),
                "necrotic": les.necrotic,
                "rim": les.rim,
                "complicated": les.complicated,
                "lobulation": round(les.lobulation, 3),
                "margin_mm": round(les.margin_mm, 2),
                **pat.params,
            }
        )
        if les.lesion_class == HAEMANGIOMA:
            truth[-1].update(fill=round(les.fill, 3), scar=les.scar)
    return rows, truth


def _single_thread_blas():
    """Small matrix products run faster without BLAS threads competing for the cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def _write_nifti(array: np.ndarray, spacing, origin, path: Path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing((spacing[2], spacing[1], spacing[0]))
    img.SetOrigin(origin)
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # LPS-aligned; NIfTI stores the RAS equivalent
    sitk.WriteImage(img, str(path), True, 1)  # light gzip: speed matters more than size here


def mean_hu_separability(mean_hu: np.ndarray, is_positive: np.ndarray) -> dict[str, float]:
    """How well a single threshold on lesion mean HU separates the classes.

    Args:
        mean_hu: Mean HU of each lesion (inside its mask).
        is_positive: True for the positive class (metastasis, expected to be denser than cysts).

    Returns:
        ``auc`` (ROC AUC of mean HU as a score), ``threshold_hu`` and ``accuracy`` of the best threshold.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(is_positive, dtype=bool)
    x = np.asarray(mean_hu, dtype=float)
    if y.all() or not y.any():
        return {"auc": float("nan"), "threshold_hu": float("nan"), "accuracy": float("nan")}
    xs = np.unique(x)
    cuts = np.concatenate([[xs[0] - 1], (xs[:-1] + xs[1:]) / 2, [xs[-1] + 1]])
    acc = np.array([np.mean((x > t) == y) for t in cuts])
    best = int(np.argmax(acc))
    return {
        "auc": float(roc_auc_score(y, x)),
        "threshold_hu": float(cuts[best]),
        "accuracy": float(acc[best]),
    }


def _check_args(
    out: Path,
    patients: int,
    lesions: int,
    seed: int,
    difficulty: float,
    overwrite: bool,
    matrix: int,
    workers: int | None = None,
) -> None:
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: use at least 1 process (or leave it unset for the free cores)")
    lo, hi = MATRIX_RANGE
    if not (lo <= matrix <= hi):
        raise UserError(
            f"--matrix {matrix}: use an in-plane matrix from {lo} to {hi} pixels (default {IN_PLANE_PX})"
        )
    if patients < 1:
        raise UserError(f"--patients {patients}: need at least 1 patient")
    if lesions < patients:
        raise UserError(
            f"--lesions {lesions}: every one of the {patients} patients needs a lesion; use --lesions >= {patients}"
        )
    if lesions > MAX_LESIONS_PER_PATIENT * patients:
        raise UserError(
            f"--lesions {lesions}: at most {MAX_LESIONS_PER_PATIENT} lesions per patient fit; "
            f"use --lesions <= {MAX_LESIONS_PER_PATIENT * patients} or more --patients"
        )
    if seed < 0:
        raise UserError(f"--seed {seed}: use a non-negative integer")
    if not (0.0 <= difficulty <= 2.0):
        raise UserError(f"--difficulty {difficulty}: use a value from 0 (easy) to 2 (hard)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; give a folder path for the synthetic cohort")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"{out}: output folder already exists and is not empty; choose another path or pass --overwrite"
            )
        if not (out / "summary.json").exists():
            # --overwrite deletes the folder: refuse unless it is a cohort we wrote
            raise UserError(
                f"{out}: --overwrite only replaces a synthetic cohort folder (with summary.json); choose another path"
            )


def generate_cohort(
    out: str | Path,
    patients: int = 63,
    lesions: int = 230,
    seed: int = 0,
    difficulty: float = 1.0,
    overwrite: bool = False,
    matrix: int = IN_PLANE_PX,
    workers: int | None = None,
    classes: str | tuple[str, ...] | list[str] | None = None,
) -> dict[str, Any]:
    """Generate a synthetic CT cohort with lesion masks and a manifest.

    Writes ``images/<pid>.nii.gz`` (int16 HU), ``masks/<pid>.nii.gz`` (labels 1..n),
    ``manifest.csv`` (one row per lesion), ``lesions_truth.csv`` (generator parameters
    and measured mean HU per lesion) and ``summary.json``. The folder is built under a
    temporary name and renamed when complete. The same seed gives the same cohort.

    Args:
        out: Output folder (must not exist or be empty, unless ``overwrite``).
        patients: Number of patients.
        lesions: Total number of lesions (at least one per patient).
        seed: Random seed.
        difficulty: 0 easy, 1 default, 2 hard (class overlap, noise, margin blur).
        overwrite: Replace an existing cohort folder.
        matrix: In-plane matrix of every volume (384: about 0.75-1.0 mm pixels; smaller is
            faster but coarser than clinical CT).
        workers: Processes that simulate patients in parallel (default: the free cores, at
            most 4). The cohort is the same for any number of workers.
        classes: Lesion classes (``--classes``, comma-separated text or a sequence) from
            metastasis, cyst and haemangioma; default metastasis and cyst.

    Returns:
        The summary written to ``summary.json``.
    """
    import pandas as pd
    from tqdm import tqdm

    from liverlesion.fileio import atomic_dir, write_csv, write_json
    from liverlesion.progress import progress_disabled

    out = Path(out)
    class_list = parse_classes(classes)
    _check_args(out, patients, lesions, seed, difficulty, overwrite, matrix, workers)
    if set(class_list) != set(CLASSES) and lesions < len(class_list):
        raise UserError(
            f"--lesions {lesions}: need at least one lesion per class ({len(class_list)} classes)"
        )
    t0 = time.perf_counter()
    alloc = _allocate(np.random.default_rng(seed), patients, lesions, class_list)
    rows: list[dict[str, Any]] = []
    truth: list[dict[str, Any]] = []
    n_workers = _n_workers(workers, patients)
    with _single_thread_blas(), atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        jobs = [
            (tmp, f"syn{i + 1:03d}", classes, [seed, i], difficulty, matrix)
            for i, classes in enumerate(alloc)
        ]
        bar = tqdm(
            total=len(jobs),
            desc="synthetic patients",
            unit="patient",
            file=sys.stderr,
            disable=progress_disabled(),
        )
        with bar:
            if n_workers == 1:
                done = []
                for job in jobs:
                    done.append(_write_patient(*job))
                    bar.update()
            else:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                # spawn, not fork: the caller may hold torch / BLAS threads
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                    futures = [pool.submit(_write_patient, *job) for job in jobs]
                    for fut in futures:
                        fut.result()  # re-raises a worker's error
                        bar.update()
                    done = [f.result() for f in futures]
        for r, t in done:  # patient order, whatever order the workers finished in
            rows += r
            truth += t
        truth_df = pd.DataFrame(truth)
        write_csv(tmp / "manifest.csv", pd.DataFrame(rows))
        write_csv(tmp / "lesions_truth.csv", truth_df)
        summary = _summarise(truth_df, patients, seed, difficulty, time.perf_counter() - t0, class_list)
        write_json(tmp / "summary.json", summary)
    _print_summary(summary, out)
    return summary


def _summarise(
    truth: Any,
    patients: int,
    seed: int,
    difficulty: float,
    seconds: float,
    classes: tuple[str, ...] = CLASSES,
) -> dict[str, Any]:
    diam = truth["diameter_mm"].to_numpy()
    sep = mean_hu_separability(
        truth["mean_hu"].to_numpy(), (truth["lesion_class"] == "metastasis").to_numpy()
    )
    per_class = {
        c: {
            "lesions": int((truth["lesion_class"] == c).sum()),
            "mean_hu_mean": round(float(truth.loc[truth["lesion_class"] == c, "mean_hu"].mean()), 1),
            "mean_hu_sd": round(float(truth.loc[truth["lesion_class"] == c, "mean_hu"].std(ddof=0)), 1),
        }
        for c in classes
    }
    from liverlesion.synth_lesions import class_counts

    mix = (
        {"metastasis": METASTASIS_FRACTION, "cyst": round(1 - METASTASIS_FRACTION, 3)}
        if set(classes) == set(CLASSES)
        else {c: round(n / len(truth), 3) for c, n in class_counts(classes, len(truth)).items()}
    )
    return {
        "note": SYNTHETIC_NOTE,
        "patients": patients,
        "lesions": int(len(truth)),
        "seed": seed,
        "difficulty": difficulty,
        "class_mix": mix,
        "classes": per_class,
        "diameter_mm": {
            "min": round(float(diam.min()), 1),
            "median": round(float(np.median(diam)), 1),
            "max": round(float(diam.max()), 1),
            "fraction_under_10mm": round(float(np.mean(diam < 10)), 3),
        },
        "mean_hu_threshold": {k: round(v, 3) for k, v in sep.items()},
        "slice_thickness_mm": sorted({float(s) for s in truth["slice_mm"]}),
        "seconds": round(seconds, 1),
    }


def _print_summary(s: dict[str, Any], out: Path) -> None:
    c = s["classes"]
    m = s["mean_hu_threshold"]
    dmm = s["diameter_mm"]
    counts = ", ".join(f"{k} {v['lesions']}" for k, v in c.items())
    hu = ", ".join(f"{k} {v['mean_hu_mean']} +/- {v['mean_hu_sd']}" for k, v in c.items())
    print(
        f"Synthetic cohort written to {out}\n"
        f"  patients: {s['patients']}, lesions: {s['lesions']} ({counts})\n"
        f"  diameter mm: median {dmm['median']}, range {dmm['min']}-{dmm['max']}, "
        f"{100 * dmm['fraction_under_10mm']:.0f}% under 10 mm\n"
        f"  mean HU: {hu}\n"
        f"  best mean-HU threshold (metastasis vs the rest) {m['threshold_hu']} HU: accuracy {m['accuracy']}, "
        f"ROC AUC {m['auc']}\n"
        f"  time: {s['seconds']} s\n"
        f"  {SYNTHETIC_NOTE}"
    )
