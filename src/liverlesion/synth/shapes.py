"""Geometry helpers of the phantom: the voxel grid in mm, smooth random fields, rotations and
(super)ellipse distances.
"""

from __future__ import annotations

import math

import numpy as np


# --------------------------------------------------------------------------- geometry helpers
class Grid:
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


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: tuple[float, ...]) -> np.ndarray:
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


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def ellipsoid_rho(zz, yy, xx, centre, axes) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) for axis-aligned axes (x, y, z) mm."""
    return np.sqrt(
        ((xx - centre[0]) / axes[0]) ** 2
        + ((yy - centre[1]) / axes[1]) ** 2
        + ((zz - centre[2]) / axes[2]) ** 2
    )


def superellipse_rho(
    y: np.ndarray, x: np.ndarray, a: float, b_ant: float, b_post: float, p: float
) -> np.ndarray:
    b = np.where(y < 0, b_ant, b_post)
    return ((np.abs(x) / a) ** p + (np.abs(y) / b) ** p) ** (1.0 / p)
