"""The synthetic patient's anatomy: scan geometry (field of view, slices) and the body, organs,
vessels, bones and table painted into a noiseless HU volume. Lesions: :mod:`.lesions`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from liverlesion.synth.shapes import Grid, ellipsoid_rho, smooth_noise, superellipse_rho

IN_PLANE_PX = 384  # default rows = columns of every volume (``matrix``)
SLICE_THICKNESSES_MM = (1.25, 2.0, 2.5, 3.0, 5.0)
SLICE_THICKNESS_P = (0.1, 0.15, 0.3, 0.2, 0.25)
MIN_SLICES, MAX_SLICES = 40, 80


class Anatomy:
    """One patient's noiseless anatomy, built structure by structure (later ones paint over earlier)."""

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
        self.grid = Grid((nz, matrix, matrix), (thk, px, px), y_centre=u(10, 25), z0=z0)
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
        return superellipse_rho(
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
        n1, n2 = smooth_noise(rng, shape, cell), smooth_noise(rng, shape, cell)
        t = np.sqrt(n1**2 + n2**2)
        gas = smooth_noise(rng, shape, tuple(2 * c for c in cell)) > 0.5
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
        tex = smooth_noise(rng, shape, (2.0, 6.0, 6.0))
        specks = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.6, 0.8, 0.8))
        specks = np.clip((specks / specks.std() - 2.3) * 500, 0, 700)  # small pulmonary vessels
        self.paint(box, lung, -860 + 25 * tex + specks)

    def _heart(self) -> None:
        c = np.array([20.0, -30.0, self.liver_h / 2 + 55])
        ax = np.array([70.0, 55.0, 55.0])
        box = self.grid.box(c - ax, c + ax)
        if box is None:
            return
        rho = ellipsoid_rho(*box[1:], c, ax)
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
        rho = ellipsoid_rho(*box[1:], c, ax)
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
        rho = ellipsoid_rho(*box[1:], c, ax)
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
            ellipsoid_rho(zz, yy, xx, right_c, right_a), ellipsoid_rho(zz, yy, xx, left_c, left_a)
        )
        shape = rho.shape
        cell = (max(35.0 / g.spacing[0], 1.5), 35.0 / g.spacing[1], 35.0 / g.spacing[2])
        rho = rho + 0.08 * smooth_noise(rng, shape, cell)
        liver = (rho < 1.0) & self.inside(self.rho_cav, box)
        # the liver sits anterior/right of the spine and aorta (retroperitoneal fat around them)
        retro = ((xx - 10) / (self.vb_r + 22)) ** 2 + ((yy - self.vb_y) / (self.vb_r + 28)) ** 2 < 1
        liver &= ~retro
        texture = self.liver_hu + 4.0 * smooth_noise(rng, shape, (max(8 / g.spacing[0], 1.2), 8, 8))
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
        rho = ellipsoid_rho(*box[1:], c, ax)
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
            rho = ellipsoid_rho(zz, yy, xx, c, ax)
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
        trab = 230 + 40 * smooth_noise(rng, shape, (1.5, 2.0, 2.0))
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
