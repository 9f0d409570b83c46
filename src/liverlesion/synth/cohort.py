"""Write a synthetic cohort: allocate lesion classes to patients, simulate them (in worker
processes), write images, masks, manifest and ground truth atomically, and summarise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion import DISCLAIMER
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_dir, write_csv, write_json
from liverlesion.progress import progress_disabled
from liverlesion.synth.anatomy import IN_PLANE_PX, MIN_SLICES
from liverlesion.synth.lesions import (
    DEFAULT_CLASSES,
    HAEMANGIOMA,
    SynthLesion,
    allocate_classes,
    class_counts,
    parse_classes,
)
from liverlesion.synth.patient import simulate_patient

CLASSES = DEFAULT_CLASSES  # the default class list (``generate_cohort(classes=...)`` sets another)
METASTASIS_FRACTION = 0.6  # class mix of the cohort (metastasis : cyst = 60 : 40)
MAX_LESIONS_PER_PATIENT = 12  # more would not fit non-overlapping in a liver
MATRIX_RANGE = (64, 1024)
SYNTHETIC_NOTE = f"SYNTHETIC DATA (no real patient); {DISCLAIMER}"
#: Fewest bytes a patient's image and mask take per voxel on disk (int16 CT noise compresses to about
#: 1.25): with the fewest slices, a lower bound on the cohort's size.
MIN_BYTES_PER_VOXEL = 1.0


def allocate_lesions(
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
        rows.append(manifest_row(pid, les))
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


def manifest_row(pid: str, lesion: SynthLesion) -> dict[str, Any]:
    """One lesion's manifest row, with the cohort's file layout (``images/PID.nii.gz``, ``masks/PID.nii.gz``)."""
    return {
        "patient_id": pid,
        "image": f"images/{pid}.nii.gz",
        "mask": f"masks/{pid}.nii.gz",
        "label": lesion.label,
        "lesion_class": lesion.lesion_class,
    }


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
    _check_disk_space(out, patients, matrix)


def _check_disk_space(out: Path, patients: int, matrix: int) -> None:
    """Refuse a cohort that cannot fit on the output's disk, before hours of simulation end in 'no space
    left' (a huge --patients also spent minutes allocating lesions first, without a line of output)."""
    import shutil

    need = patients * MIN_SLICES * matrix * matrix * MIN_BYTES_PER_VOXEL
    folder = out.expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # not a folder we can ask: the output checks say why
        return
    if need > free:
        raise UserError(
            f"--patients {patients} at --matrix {matrix}: the cohort needs at least {need / 1e9:.3g} GB but "
            f"{folder} has {free / 1e9:.3g} GB free; use fewer --patients or a smaller --matrix, or write to a "
            "larger disk (-o/--out)"
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

    out = Path(out)
    class_list = parse_classes(classes)
    _check_args(out, patients, lesions, seed, difficulty, overwrite, matrix, workers)
    if set(class_list) != set(CLASSES) and lesions < len(class_list):
        raise UserError(
            f"--lesions {lesions}: need at least one lesion per class ({len(class_list)} classes)"
        )
    t0 = time.perf_counter()
    alloc = allocate_lesions(np.random.default_rng(seed), patients, lesions, class_list)
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
