"""Accuracy on real CT texture: synthetic lesions inserted into a real portal-venous liver.

The synthetic cohorts of ``bench_accuracy.py`` are phantoms: their noise, point-spread and
parenchyma are modelled. The cohorts main is scored on between rounds put lesions into real CT.
This benchmark gets closer to that without any data we may not ship: it reads one real study of
3D-IRCADb-01 from ``../shared`` (never copied into the repository), and for each simulated
"patient" paints new lesions (the generator's own metastasis / cyst models, ``LesionPainter``) into
that study's real liver, away from its own tumours, cysts and vessels.

Insertion is in the image domain, as in lesion-insertion studies: the lesion's noise-free contrast
against the smoothed local parenchyma is blurred by a point-spread function and *added* to the real
image, so the scanner's own noise, its spatial correlation and the real parenchyma stay in and
around every lesion. The cohort is written to ``--out`` (temporary, derived from CC BY-NC-ND data:
never commit it), then ``liverlesion cv --preset quick`` runs once per variant with every baseline
on the same folds.

What it can and cannot say: all "patients" share one liver and one scanner, so it measures texture
realism, not patient-to-patient variation. The lesions' own appearance is still the generator's.

Usage:
    python benchmarks/bench_real_texture.py [--ircadb ../shared/data/3Dircadb1/3Dircadb1.1]
        [--patients 63 --lesions 230] [--difficulties 1 2] [--seeds 0] [--variants fusion lpft]
        [--out /tmp/bench_real_texture]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from bench_accuracy import VARIANTS, run_grid
from scipy import ndimage

DEFAULT_IRCADB = Path(__file__).resolve().parents[1].parent / "shared/data/3Dircadb1/3Dircadb1.1"
# structures the new lesions keep clear of (the study's own lesions and its vessels)
AVOID = ("livertumor", "liverkyst", "portalvein", "venoussystem", "artery")
AVOID_MARGIN_MM = 4.0
CROP_MARGIN_MM = 15.0
PSF_SIGMA_MM = 0.45  # blur of the inserted contrast: about a portal-venous CT's in-plane resolution
LOCAL_MEAN_SIGMA_MM = 2.0  # scale of the "parenchyma without noise" the lesion replaces


def read_study(src: Path):
    """The real study (HU, float32), its liver mask and the mask of what lesions must avoid; cropped."""
    from liverlesion.datasets.ircadb import _read_mask
    from liverlesion.datasets.ircadb_layout import discover_patients
    from liverlesion.io import read_volume

    (patient,) = discover_patients(src)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rt-"))
    try:
        image = read_volume(patient.image.folder("", tmp), kind="image", name=patient.image.describe())
        name = patient.image.describe()
        structures = patient.masks.structures()
        liver = _read_mask(patient.masks, "liver", image, name, tmp)
        avoid = np.zeros_like(liver)
        for s in structures:
            if s.startswith(AVOID):
                avoid |= _read_mask(patient.masks, s, image, name, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sz, sy, sx = image.spacing
    avoid = ndimage.binary_dilation(
        avoid, structure=np.ones((3, 3, 3), bool), iterations=max(1, round(AVOID_MARGIN_MM / sy))
    )
    zz, yy, xx = np.nonzero(liver)
    m = [round(CROP_MARGIN_MM / s) for s in (sz, sy, sx)]
    box = tuple(
        slice(max(int(a.min()) - mi, 0), min(int(a.max()) + mi + 1, n))
        for a, mi, n in zip((zz, yy, xx), m, liver.shape, strict=True)
    )
    hu = image.array[box].astype(np.float32)
    return hu, liver[box], (liver & ~avoid)[box], tuple(float(s) for s in image.spacing)


class RealLiver:
    """Just what ``LesionPainter`` reads (grid, rng, d, hu, liver, liver_box, liver_hu) over a real liver."""

    def __init__(self, smooth_hu: np.ndarray, allowed: np.ndarray, spacing, liver_hu: float, rng, d: float):
        from liverlesion.synth.shapes import Grid

        self.grid = Grid(allowed.shape, spacing, y_centre=0.0, z0=0.0)
        self.rng, self.d = rng, d
        self.hu = smooth_hu.copy()
        self.liver = allowed
        self.liver_hu = liver_hu
        self.liver_box = (tuple(slice(0, n) for n in allowed.shape),)


def make_cohort(
    src: Path,
    out: Path,
    patients: int,
    lesions: int,
    seed: int,
    difficulty: float,
    classes: tuple[str, ...] | None = None,
) -> Path:
    """Write ``out/manifest.csv`` with ``patients`` studies of the real liver and new lesions.

    ``classes``: the lesion classes (``liverlesion synth --classes``); None is metastasis and cyst.
    """
    from liverlesion.fileio import write_csv
    from liverlesion.synth.cohort import CLASSES, _write_nifti, allocate_lesions, manifest_row
    from liverlesion.synth.lesions import LesionPainter

    class Painter(RealLiver, LesionPainter):
        pass

    hu, liver, allowed, spacing = read_study(src)
    liver_hu = float(np.median(hu[liver]))
    sig = [LOCAL_MEAN_SIGMA_MM / s for s in spacing]
    smooth = ndimage.gaussian_filter(hu, sig)
    rng = np.random.default_rng(seed)
    per_patient = allocate_lesions(rng, patients, lesions, tuple(classes or CLASSES))
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, classes in enumerate(per_patient):
        pid = f"rt{i:03d}"
        ph = Painter(smooth, allowed, spacing, liver_hu, np.random.default_rng([seed, i]), difficulty)
        labels, truth = ph.add_lesions(list(classes))
        contrast = ndimage.gaussian_filter(ph.hu - smooth, [PSF_SIGMA_MM / s for s in spacing])
        img = np.clip(np.rint(hu + contrast), -1024, 3071).astype(np.int16)
        origin = (float(ph.grid.x[0]), float(ph.grid.y[0]), float(ph.grid.z[0]))
        _write_nifti(img, spacing, origin, out / "images" / f"{pid}.nii.gz")
        _write_nifti(labels, spacing, origin, out / "masks" / f"{pid}.nii.gz")
        rows += [manifest_row(pid, les) for les in truth]
    write_csv(out / "manifest.csv", pd.DataFrame(rows))  # atomic: written last, so its presence means done
    print(
        json.dumps(
            {
                "cohort": str(out),
                "patients": patients,
                "lesions": len(rows),
                "liver_hu_median": round(liver_hu, 1),
                "spacing_zyx_mm": [round(s, 3) for s in spacing],
                "noise_sd_hu": round(float(np.std((hu - smooth)[liver])), 1),
            }
        )
    )
    return out / "manifest.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ircadb", type=Path, default=DEFAULT_IRCADB, help="one 3Dircadb1.N patient folder")
    ap.add_argument("--difficulties", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["fusion", "lpft"], choices=list(VARIANTS))
    ap.add_argument("--patients", type=int, default=63)
    ap.add_argument("--lesions", type=int, default=230)
    ap.add_argument("--classes", default=None, help="comma-separated (liverlesion synth --classes)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_real_texture"))
    args = ap.parse_args()
    if not args.ircadb.is_dir():
        sys.exit(
            f"{args.ircadb}: not found; pass --ircadb with one 3Dircadb1.N patient folder (3D-IRCADb-01)"
        )

    def make(folder: Path, seed: int, d: float) -> None:
        classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else None
        make_cohort(args.ircadb, folder, args.patients, args.lesions, seed, d, classes)

    run_grid(args, make, label="real-texture ")


if __name__ == "__main__":
    main()
