"""The scanner's imprint on the phantom: point-spread blur and CT-like noise (filtered back-projection
noise power spectrum), then quantisation to int16 HU.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

NPS_PEAK_LP_MM = 0.3  # noise power spectrum peak of a soft-tissue kernel, line pairs per mm


def blur_noise_quantise(
    hu: np.ndarray, rng: np.random.Generator, pixel_mm: float, psf_px: float, noise_sd: float
) -> np.ndarray:
    """Point-spread blur, CT-like noise (in-plane), quantisation to int16 HU."""
    img = ndimage.gaussian_filter(hu, (0.35, psf_px, psf_px), truncate=3.0)
    img += ct_noise(rng, hu.shape, pixel_mm, noise_sd)
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
