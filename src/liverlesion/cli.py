"""The `liverlesion` command line.

Thin: each command parses its arguments and calls one library function.
Heavy modules are imported inside the commands so ``--help`` stays fast.
Every :class:`~liverlesion.errors.UserError` becomes one line on stderr and
exit code 2, without a traceback.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from liverlesion import DISCLAIMER, __version__
from liverlesion.cli_common import (
    DEPRECATED_OUT,
    FROM_CONFIG,
    NOTES,
    BackboneOpt,
    ConfigOpt,
    DeviceOpt,
    EpochsOpt,
    OverwriteOpt,
    PresetOpt,
    SetOpt,
    ThreadsOpt,
    TrainBatchOpt,
    WeightsOpt,
    app,
    config_from,
    default_training_threads,
    out_dir,
    out_file,
    out_opt,
    output,
    training_overrides,
)
from liverlesion.errors import UserError


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"liverlesion {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """liverlesion: research use, not for diagnosis."""


@app.command()
def synth(
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], out_opt("Output folder for volumes, masks and manifest.csv.")] = None,
    patients: Annotated[int, typer.Option(help="Number of patients.")] = 63,
    lesions: Annotated[int, typer.Option(help="Total number of lesions.")] = 230,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    difficulty: Annotated[float, typer.Option(help="0 = easy, 1 = default, 2 = hard.")] = 1.0,
    matrix: Annotated[
        int, typer.Option(help="In-plane matrix (384: 0.75-1.0 mm pixels; smaller is faster, coarser).")
    ] = 384,
    workers: Annotated[
        Optional[int],
        typer.Option(
            help="Parallel processes (same cohort for any number).", show_default="the free cores, at most 4"
        ),
    ] = None,
    classes: Annotated[
        str, typer.Option(help="Lesion classes, comma-separated, from metastasis, cyst, haemangioma.")
    ] = "metastasis,cyst",
    overwrite: OverwriteOpt = False,
) -> None:
    """Generate a synthetic CT cohort (metastases vs cysts, optionally haemangiomas) with a manifest."""
    from liverlesion.synth import generate_cohort

    out, name = output(out_opt, out, "output folder")
    out_dir(out, name)
    generate_cohort(
        out,
        patients=patients,
        lesions=lesions,
        seed=seed,
        difficulty=difficulty,
        overwrite=overwrite,
        matrix=matrix,
        workers=workers,
        classes=classes,
    )


@app.command()
def inspect(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[
        Optional[Path], out_opt("Also write the lesion table to this CSV.", "none: print only")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Geometry tolerance (mm) between image and mask.")] = 1e-3,
    series: Annotated[
        Optional[str],
        typer.Option(help="SeriesInstanceUID when a folder holds several.", show_default="the only series"),
    ] = None,
) -> None:
    """Compute and print the lesion table and a summary for a manifest."""
    from liverlesion.inspection import inspect_manifest

    out_file(out, "--out")
    inspect_manifest(manifest, out=out, tolerance=tolerance, series=series)


@app.command()
def patches(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], out_opt("Output folder for patch arrays and contact sheet.")] = None,
    model: Annotated[
        Optional[Path],
        typer.Option(
            "--model",
            help="Cut with this checkpoint's patch settings (what it was trained on, what predict uses); "
            "not with --config/--preset/--set.",
            show_default="none: the config's settings",
        ),
    ] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    tolerance: Annotated[float, typer.Option(help="Geometry tolerance (mm) between image and mask.")] = 1e-3,
    series: Annotated[
        Optional[str],
        typer.Option(
            help="SeriesInstanceUID for rows whose series column is empty.", show_default="the only series"
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Recompute the patches even when an up-to-date cache exists.",
            show_default="off",
        ),
    ] = False,
) -> None:
    """Cut lesion-centred patches (cached) and draw a PNG contact sheet."""
    from liverlesion.patch_cache import build_patches

    out, name = output(out_opt, out, "output folder")
    out_dir(out, name)
    if model is not None:
        given = [n for n, v in (("--config", config), ("--preset", preset), ("--set", set_)) if v]
        if given:
            raise UserError(
                f"--model {model} with {' and '.join(given)}: the checkpoint fixes the patch settings; "
                f"drop {' and '.join(given)}, or drop --model"
            )
        patch_cfg = _checkpoint_patch_config(model)
    else:
        patch_cfg = config_from(config, preset, set_).patch
    folder = build_patches(manifest, out, patch_cfg, tolerance=tolerance, series=series, overwrite=overwrite)
    typer.echo(f"patches: {folder} (index.csv, contact_sheet.png)")


def _checkpoint_patch_config(path: Path):
    """The PatchConfig a checkpoint was trained with (its export's sidecar when up to date: no torch)."""
    from liverlesion.config import config_from_dict
    from liverlesion.onnx_backend import fresh_export
    from liverlesion.runs import model_files

    path = model_files(path)[0]  # a cv run folder: its folds share the patch settings
    found, info = fresh_export(path)
    if found is None:
        from liverlesion.model import load_checkpoint

        info = load_checkpoint(path)[1]
    return config_from_dict(info["config"]).patch


@app.command()
def weights(
    backbone: Annotated[str, typer.Option(help="timm backbone name.")] = "inception_v3",
) -> None:
    """Show which pretrained weights are available and where they are cached."""
    from liverlesion.weights import describe_weights

    typer.echo(describe_weights(backbone))


@app.command()
def train(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], out_opt("Run folder.")] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    weights: WeightsOpt = None,
    backbone: BackboneOpt = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    batch_size: TrainBatchOpt = None,
    resume: Annotated[bool, typer.Option(help="Resume an interrupted run in the run folder.")] = False,
) -> None:
    """Train one model on the whole manifest (inner validation split for early stopping)."""
    out, name = output(out_opt, out, "run folder")
    out_dir(out, name)
    extra = training_overrides(device, threads, batch_size)
    cfg = config_from(
        config,
        preset,
        set_,
        resume_run=out if resume else None,
        **{"model.weights": weights, "model.backbone": backbone, "train.epochs": epochs, **extra},
    )
    from liverlesion.cv import train_single

    default_training_threads(cfg, threads)
    train_single(manifest, out, cfg, resume=resume)


@app.command()
def cv(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], out_opt("Run folder.")] = None,
    folds: Annotated[
        Optional[int], typer.Option(help="Number of patient-level folds.", show_default=FROM_CONFIG)
    ] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    weights: WeightsOpt = None,
    backbone: BackboneOpt = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    batch_size: TrainBatchOpt = None,
    resume: Annotated[bool, typer.Option(help="Skip finished folds and resume the interrupted one.")] = False,
    baselines: Annotated[bool, typer.Option(help="Also run the baselines on the same folds.")] = True,
) -> None:
    """Patient-level cross-validation: out-of-fold predictions.csv, then evaluation."""
    out, name = output(out_opt, out, "run folder")
    out_dir(out, name)
    extra = training_overrides(device, threads, batch_size)
    cfg = config_from(
        config,
        preset,
        set_,
        resume_run=out if resume else None,
        **{
            "model.weights": weights,
            "model.backbone": backbone,
            "train.epochs": epochs,
            "cv.folds": folds,
            **extra,
        },
    )
    from liverlesion.cv import run_cv
    from liverlesion.manifest import read_manifest
    from liverlesion.splits import check_folds

    # Before any work (the patch cache is written first): enough patients for the folds?
    df = read_manifest(manifest)
    from liverlesion.run_checks import class_names_from

    class_names_from(df)  # one class only: its own message comes first
    check_folds(
        int(df["patient_id"].astype(str).nunique()),
        cfg.cv.folds,
        cfg.train.val_fraction,
        "--folds" if folds is not None else "cv.folds",
        classes=list(df["lesion_class"].astype(str)),
    )
    default_training_threads(cfg, threads)
    run_cv(manifest, out, cfg, resume=resume, baselines=baselines)


@app.command()
def demo(
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], out_opt("Output folder.", "liverlesion-demo")] = None,
    preset: Annotated[str, typer.Option(help="quick (CPU, minutes) | paper (GPU, full protocol).")] = "quick",
    weights: Annotated[
        Optional[str],
        typer.Option("--weights", help="imagenet | none | PATH.", show_default="the preset's"),
    ] = None,
    overwrite: OverwriteOpt = False,
    set_: SetOpt = None,
) -> None:
    """Synthetic cohort -> patient-level CV with the paper's network -> metrics."""
    from liverlesion.demo import run_demo

    out, name = output(out_opt, out, "output folder", default=Path("liverlesion-demo"))
    out_dir(out, name)
    run_demo(out, preset=preset, weights=weights, overwrite=overwrite, overrides=set_)


@app.command()
def evaluate(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="Run folder holding predictions.csv, or the output of `predict --manifest` on a labelled "
            "manifest (folder or its results.csv) for external validation."
        ),
    ],
    positive_class: Annotated[
        Optional[str], typer.Option(help="Positive class.", show_default="the run's eval.positive_class")
    ] = None,
    n_bootstrap: Annotated[
        Optional[int], typer.Option(help="Bootstrap resamples.", show_default="the run's config")
    ] = None,
    gradcam: Annotated[bool, typer.Option(help="Draw the Grad-CAM gallery (needs fold models).")] = True,
) -> None:
    """Metrics with patient-bootstrap CIs, calibration, plots and report.html."""
    from liverlesion.evaluate import evaluate_run

    evaluate_run(run_dir, positive_class=positive_class, n_bootstrap=n_bootstrap, gradcam=gradcam)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Evaluated run folder (holding metrics.json).")],
) -> None:
    """Redraw report.html and its plots from the run's files, recomputing nothing."""
    from liverlesion.report import render_report

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder; give the run folder that `liverlesion cv` wrote")
    path = render_report(run_dir)
    print(f"Wrote {path} ({DISCLAIMER})")


@app.command()
def baselines(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], out_opt("Output folder.")] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the mean-HU, radiomics-style and frozen ImageNet-feature baselines with patient-level CV."""
    from liverlesion.baselines import run_baselines_cli

    out, name = output(out_opt, out, "output folder")
    out_dir(out, name)
    cfg = config_from(config, preset, set_)
    run_baselines_cli(manifest, out, cfg)


# the import group and the inference commands register after the ones above (the --help order)
from liverlesion import cli_import, cli_predict  # noqa: E402, F401

_POINT_FORM = (
    "a point is one argument, x,y,z separated by commas and no spaces (e.g. --point=-69.2,-18.3,36.3)"
)


def _split_point(e, argv: list[str] | None) -> str | None:
    """What to say when a point was written as separate numbers (``--point 12 18 36``, or ``-69.2``,
    LPS x on the patient's right, which click takes for an option); None for any other usage error."""
    import click

    args = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    number = re.compile(r"^-?\d+(\.\d*)?([eE][-+]?\d+)?$")
    if isinstance(e, click.exceptions.NoSuchOption) and re.match(r"^-\d", e.option_name or ""):
        token = next((a for a in args if a.startswith(e.option_name)), e.option_name)
        return f"{token!r} is a negative number where an option was expected; {_POINT_FORM}"
    if isinstance(e, click.exceptions.UsageError) and "--point" in args:
        i = args.index("--point")
        extra = [a for a in args[i + 2 : i + 4] if number.match(a)]
        if extra and "unexpected extra argument" in str(e.message):
            return f"--point {' '.join(args[i + 1 : i + 2 + len(extra)])}: {_POINT_FORM}"
    return None


def _os_error(e: OSError) -> str | None:
    """One line for the operating-system errors a user can act on (a full disk, no permission)."""
    import errno

    where = f": {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (
            f"no space left on the disk{where}; free some space or write to another folder (-o/--out), "
            "then run the command again"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.strerror or 'permission denied'}{where}; check its permissions or use a folder you can write to"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one-line messages."""
    NOTES.clear()
    try:
        app(args=argv, standalone_mode=False)
        for note in NOTES:  # after the work, so an error stays the only line on stderr
            typer.echo(f"liverlesion: {note}", err=True)
    except UserError as e:
        typer.echo(f"liverlesion: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        typer.echo("liverlesion: interrupted", err=True)
        return 130
    except MemoryError:
        typer.echo(
            "liverlesion: error: out of memory; the input is too large for this machine: crop or downsample it, "
            "or use a machine with more memory",
            err=True,
        )
        return 1
    except OSError as e:
        message = _os_error(e)
        if message is None:
            raise
        typer.echo(f"liverlesion: error: {message}", err=True)
        return 1
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:  # click usage errors already printed
        return int(e.code or 0)
    except Exception as e:  # click's own usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            hint = _split_point(e, argv)
            if hint:
                typer.echo(f"liverlesion: error: {hint}", err=True)
            else:
                e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            typer.echo("liverlesion: aborted", err=True)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
