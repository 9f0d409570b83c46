"""`liverlesion demo`: the main job, end to end, on the synthetic cohort.

synthetic cohort (63 patients, 230 lesions, as in the paper) -> patient-level
5-fold CV with the paper's network -> metrics with patient-bootstrap CIs,
baselines side by side, report.html.

Presets: ``quick`` (default; about 10 minutes on 2 CPU cores, by host: 160 px input, three 2.5-D
stacks per lesion, the lpft recipe with one cached view per lesion stack per fine-tuning epoch,
radiomics late fusion) and ``paper`` (299 px, end to end, up to 60 epochs; meant for a GPU).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from liverlesion import DISCLAIMER, runs
from liverlesion.config import load_config
from liverlesion.cv import run_cv
from liverlesion.errors import UserError
from liverlesion.fileio import check_output_dir
from liverlesion.run_checks import check_resume, check_run_settings, nothing_to_resume

DEMO_PATIENTS, DEMO_LESIONS = 63, 230  # the paper's biobank size


def _fmt(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    lo, hi = m.get("ci_low"), m.get("ci_high")
    if lo is None or hi is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{lo:.3f}-{hi:.3f}]"


def run_demo(
    out: str | Path = "liverlesion-demo",
    preset: str = "quick",
    weights: str | None = None,
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> Path:
    """Run the demo; re-running resumes (finished folds are reused) unless ``overwrite``.

    ``overrides`` are ``section.key=value`` settings on top of the preset (``--set``), e.g.
    ``train.deterministic=true`` for a run that repeats byte for byte.

    Returns:
        The CV run folder (holding predictions.csv, metrics.json, report.html).
    """
    from liverlesion.synth import generate_cohort  # local: heavy (scipy)

    t0 = time.time()
    out = check_output_dir(out, "--out")
    extra = [f"model.weights={weights}"] if weights else []
    # settings first: a bad --set must not delete the folder that --overwrite would replace, and
    # nothing is generated for settings the run would refuse (folds, backbone, stage, weights)
    cfg = load_config(preset=preset, overrides=extra + list(overrides or []) or None)
    check_run_settings(cfg, DEMO_PATIENTS)
    demo_parts = {"cohort", "cv"}
    if out.is_dir() and not overwrite and any(p.name not in demo_parts for p in out.iterdir()):
        raise UserError(
            f"--out {out}: folder holds files that are not a demo's (a demo folder holds only cohort/ and cv/); "
            "give a new folder, or pass --overwrite to replace it"
        )
    if out.exists() and overwrite:
        shutil.rmtree(out)
    run = out / "cv"
    resume = not nothing_to_resume(run)  # a re-run resumes (an empty cv/ starts anew)
    if resume:  # its finished folds were trained with the first run's settings
        check_resume(
            run,
            cfg,
            fix="pass --overwrite to run the demo again with these settings, or run it without them",
        )
    print(f"liverlesion demo ({DISCLAIMER}); preset '{preset}', output {out}")

    cohort = out / "cohort"
    if (cohort / "manifest.csv").exists():
        print(f"Step 1/3: reusing synthetic cohort at {cohort}")
    else:
        print(f"Step 1/3: generating the synthetic cohort ({DEMO_PATIENTS} patients, {DEMO_LESIONS} lesions)")
        generate_cohort(cohort, patients=DEMO_PATIENTS, lesions=DEMO_LESIONS, seed=0)

    print(
        f"Step 2/3: {cfg.cv.folds}-fold patient-level cross-validation ({cfg.model.backbone}, "
        f"{cfg.patch.size_px} px){' - resuming' if resume else ''}"
    )
    run_cv(cohort / "manifest.csv", run, cfg, resume=resume, baselines=True, evaluate=True)

    print("Step 3/3: summary")
    metrics = json.loads(runs.metrics_path(run).read_text())
    info = json.loads(runs.run_info_path(run).read_text())
    pooled = metrics["network"]["metrics"]
    print(f"  init: {info.get('init')}")
    for name in ("accuracy", "f1", "sensitivity", "specificity", "roc_auc"):
        print(f"  {name:<12} {_fmt(pooled.get(name))}")
    print(f"  report: {runs.report_path(run)}")
    print(
        f"  next: liverlesion predict --model {run} --image CT --mask MASK -o OUT  (the {cfg.cv.folds} fold models)"
    )
    print(f"  elapsed: {time.time() - t0:.0f} s; {DISCLAIMER}")
    return run
