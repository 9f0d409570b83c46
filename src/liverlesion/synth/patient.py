"""One synthetic patient: the phantom (anatomy + lesions + scanner) and its result record."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from liverlesion.synth.anatomy import IN_PLANE_PX, Anatomy
from liverlesion.synth.lesions import LesionPainter, SynthLesion
from liverlesion.synth.noise import blur_noise_quantise


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


class Phantom(Anatomy, LesionPainter):
    """Builds one patient's HU volume: :meth:`build` the anatomy, :meth:`add_lesions`, then :meth:`finish`."""

    def finish(self) -> np.ndarray:
        """Point-spread blur, CT-like noise (in-plane), quantisation to int16 HU."""
        return blur_noise_quantise(self.hu, self.rng, self.grid.spacing[1], self.psf_px, self.noise_sd)


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
    ph = Phantom(rng, difficulty, matrix)
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
