"""`liverlesion demo`: the main job, end to end, on the synthetic cohort.

synthetic cohort (63 patients, 230 lesions, as in the paper) -> patient-level
5-fold CV with the paper's network -> metrics with patient-bootstrap CIs,
baselines side by side, report.html.

Presets: ``quick`` (default; about 10 minutes on 2 CPU cores: 80 px input, few
epochs) and ``paper`` (299 px, up to 60 epochs; meant for a GPU).
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
    out = Path(out)
    extra = [f"model.weights={weights}"] if weights else []
    # settings first: a bad --set must not delete the folder that --overwrite would replace
    cfg = load_config(preset=preset, overrides=extra + list(overrides or []) or None)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another output folder")
    print(f"liverlesion demo ({DISCLAIMER}); preset '{preset}', output {out}")

    cohort = out / "cohort"
    if (cohort / "manifest.csv").exists():
        print(f"Step 1/3: reusing synthetic cohort at {cohort}")
    else:
        print("Step 1/3: generating the synthetic cohort (63 patients, 230 lesions)")
        generate_cohort(cohort, patients=63, lesions=230, seed=0)

    run = out / "cv"
    resume = run.exists()
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
    print(f"  elapsed: {time.time() - t0:.0f} s; {DISCLAIMER}")
    return run
