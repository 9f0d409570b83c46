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

The package's modules, one job each: :mod:`~liverlesion.synth.anatomy` (scan geometry and the
body), :mod:`~liverlesion.synth.lesions` (class list, lesion records, shape and appearance),
:mod:`~liverlesion.synth.noise` (point-spread blur and CT noise), :mod:`~liverlesion.synth.shapes`
(geometry helpers), :mod:`~liverlesion.synth.patient` (one patient) and
:mod:`~liverlesion.synth.cohort` (the cohort writer).
"""

from liverlesion.synth.anatomy import IN_PLANE_PX
from liverlesion.synth.cohort import (
    CLASSES,
    MATRIX_RANGE,
    MAX_LESIONS_PER_PATIENT,
    METASTASIS_FRACTION,
    SYNTHETIC_NOTE,
    allocate_lesions,
    generate_cohort,
    mean_hu_separability,
)
from liverlesion.synth.lesions import (
    BLOOD_POOL_HU,
    DEFAULT_CLASSES,
    HAEMANGIOMA,
    KNOWN_CLASSES,
    SynthLesion,
    class_counts,
    parse_classes,
)
from liverlesion.synth.noise import NPS_PEAK_LP_MM, ct_noise
from liverlesion.synth.patient import SynthPatient, simulate_patient

__all__ = [
    "generate_cohort",
    "simulate_patient",
    "allocate_lesions",
    "mean_hu_separability",
    "ct_noise",
    "parse_classes",
    "class_counts",
    "SynthLesion",
    "SynthPatient",
    "CLASSES",
    "DEFAULT_CLASSES",
    "KNOWN_CLASSES",
    "HAEMANGIOMA",
    "BLOOD_POOL_HU",
    "IN_PLANE_PX",
    "MATRIX_RANGE",
    "MAX_LESIONS_PER_PATIENT",
    "METASTASIS_FRACTION",
    "NPS_PEAK_LP_MM",
    "SYNTHETIC_NOTE",
]
