"""The `liverlesion` command line.

Thin: each command parses its arguments and calls one library function.
Heavy modules are imported inside the commands so ``--help`` stays fast.
Every :class:`~liverlesion.errors.UserError` becomes one line on stderr and
exit code 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from liverlesion import DISCLAIMER, __version__
from liverlesion.errors import UserError

app = typer.Typer(
    name="liverlesion",
    help=f"Focal liver lesion classification on abdominal CT ({DISCLAIMER}).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
import_app = typer.Typer(help="Import public datasets into a liverlesion manifest.", no_args_is_help=True)
app.add_typer(import_app, name="import")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML config file (see config.py).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Preset: quick | paper | default.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a setting, e.g. --set train.epochs=5 (repeatable)."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]


def _config(config: Path | None, preset: str | None, sets: list[str] | None, **extra):
    from liverlesion.config import load_config

    overrides = list(sets or [])
    for key, value in extra.items():
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(config, preset, overrides)


def _out_dir(path: Path | None, name: str = "OUT") -> None:
    """Refuse an output folder that exists as a file (or lies under one) before any work."""
    if path is not None:
        from liverlesion.fileio import check_output_dir

        check_output_dir(path, name)


def _out_file(path: Path | None, name: str) -> None:
    """Refuse an output file that is a folder (or lies under a file) before any work."""
    if path is not None:
        from liverlesion.fileio import check_output_file

        check_output_file(path, name)


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
    out: Annotated[Path, typer.Argument(help="Output folder for volumes, masks and manifest.csv.")],
    patients: Annotated[int, typer.Option(help="Number of patients.")] = 63,
    lesions: Annotated[int, typer.Option(help="Total number of lesions.")] = 230,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    difficulty: Annotated[float, typer.Option(help="0 = easy, 1 = default, 2 = hard.")] = 1.0,
    matrix: Annotated[
        int, typer.Option(help="In-plane matrix (384: 0.75-1.0 mm pixels; smaller is faster, coarser).")
    ] = 384,
    workers: Annotated[
        Optional[int], typer.Option(help="Parallel processes (default: free cores, at most 4).")
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Generate a synthetic CT cohort (metastases vs cysts) with a manifest."""
    from liverlesion.synth import generate_cohort

    _out_dir(out)
    generate_cohort(
        out,
        patients=patients,
        lesions=lesions,
        seed=seed,
        difficulty=difficulty,
        overwrite=overwrite,
        matrix=matrix,
        workers=workers,
    )


@app.command()
def inspect(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the lesion table to this CSV.")] = None,
    tolerance: Annotated[float, typer.Option(help="Geometry tolerance (mm) between image and mask.")] = 1e-3,
    series: Annotated[
        Optional[str], typer.Option(help="SeriesInstanceUID when a folder holds several.")
    ] = None,
) -> None:
    """Compute and print the lesion table and a summary for a manifest."""
    from liverlesion.lesions import inspect_manifest

    _out_file(out, "--out")
    inspect_manifest(manifest, out=out, tolerance=tolerance, series=series)


@import_app.command("ircadb")
def import_ircadb(
    src: Annotated[
        Path, typer.Argument(help="3D-IRCADb-01 folder (holding 3Dircadb1.N) or one 3Dircadb1.N.")
    ],
    out: Annotated[Path, typer.Argument(help="Output folder for NIfTI files and manifest.csv.")],
    overwrite: OverwriteOpt = False,
) -> None:
    """Import 3D-IRCADb-01 (tumours -> metastasis, cysts -> cyst)."""
    from liverlesion.datasets.ircadb import import_ircadb as _imp
    from liverlesion.datasets.ircadb import import_summary

    _out_dir(out)
    manifest = _imp(src, out, overwrite=overwrite)
    typer.echo(import_summary(manifest.parent))


@app.command()
def patches(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[Path, typer.Argument(help="Output folder for patch arrays and contact sheet.")],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    tolerance: Annotated[float, typer.Option(help="Geometry tolerance (mm) between image and mask.")] = 1e-3,
    series: Annotated[
        Optional[str], typer.Option(help="SeriesInstanceUID for rows whose series column is empty.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Recompute the patches even when an up-to-date cache exists.")
    ] = False,
) -> None:
    """Cut lesion-centred patches (cached) and draw a PNG contact sheet."""
    from liverlesion.patches import build_patches

    _out_dir(out)
    cfg = _config(config, preset, set_)
    folder = build_patches(manifest, out, cfg.patch, tolerance=tolerance, series=series, overwrite=overwrite)
    typer.echo(f"patches: {folder} (index.csv, contact_sheet.png)")


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
    out: Annotated[Path, typer.Argument(help="Run folder.")],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="imagenet | none | PATH.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="timm backbone name.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume an interrupted run in OUT.")] = False,
) -> None:
    """Train one model on the whole manifest (inner validation split for early stopping)."""
    from liverlesion.train import train_single

    _out_dir(out)
    cfg = _config(
        config, preset, set_, **{"model.weights": weights, "model.backbone": backbone, "train.epochs": epochs}
    )
    train_single(manifest, out, cfg, resume=resume)


@app.command()
def cv(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[Path, typer.Argument(help="Run folder.")],
    folds: Annotated[Optional[int], typer.Option(help="Number of patient-level folds.")] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="imagenet | none | PATH.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="timm backbone name.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs.")] = None,
    resume: Annotated[bool, typer.Option(help="Skip finished folds and resume the interrupted one.")] = False,
    baselines: Annotated[bool, typer.Option(help="Also run the baselines on the same folds.")] = True,
) -> None:
    """Patient-level cross-validation: out-of-fold predictions.csv, then evaluation."""
    from liverlesion.train import run_cv

    _out_dir(out)
    cfg = _config(
        config,
        preset,
        set_,
        **{"model.weights": weights, "model.backbone": backbone, "train.epochs": epochs, "cv.folds": folds},
    )
    from liverlesion.manifest import read_manifest
    from liverlesion.splits import check_folds

    # Before any work (the patch cache is written first): enough patients for the folds?
    df = read_manifest(manifest)
    from liverlesion.train import class_names_from

    class_names_from(df)  # one class only: its own message comes first
    check_folds(
        int(df["patient_id"].astype(str).nunique()),
        cfg.cv.folds,
        cfg.train.val_fraction,
        "--folds" if folds is not None else "cv.folds",
        classes=list(df["lesion_class"].astype(str)),
    )
    run_cv(manifest, out, cfg, resume=resume, baselines=baselines)


@app.command()
def demo(
    out: Annotated[Path, typer.Argument(help="Output folder.")] = Path("liverlesion-demo"),
    preset: Annotated[str, typer.Option(help="quick (CPU, minutes) | paper (GPU, full protocol).")] = "quick",
    weights: Annotated[Optional[str], typer.Option("--weights", help="imagenet | none | PATH.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Synthetic cohort -> patient-level CV with the paper's network -> metrics."""
    from liverlesion.demo import run_demo

    _out_dir(out)
    run_demo(out, preset=preset, weights=weights, overwrite=overwrite)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run folder holding predictions.csv.")],
    positive_class: Annotated[
        Optional[str], typer.Option(help="Positive class (default: metastasis).")
    ] = None,
    n_bootstrap: Annotated[Optional[int], typer.Option(help="Bootstrap resamples.")] = None,
    gradcam: Annotated[bool, typer.Option(help="Draw the Grad-CAM gallery (needs fold models).")] = True,
) -> None:
    """Metrics with patient-bootstrap CIs, calibration, plots and report.html."""
    from liverlesion.evaluate import evaluate_run

    evaluate_run(run_dir, positive_class=positive_class, n_bootstrap=n_bootstrap, gradcam=gradcam)


@app.command()
def baselines(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the mean-HU and radiomics-style baselines with patient-level CV."""
    from liverlesion.baselines import run_baselines_cli

    _out_dir(out)
    cfg = _config(config, preset, set_)
    run_baselines_cli(manifest, out, cfg)


@app.command()
def predict(
    model: Annotated[list[Path], typer.Option("--model", help="Checkpoint(s); several = ensemble.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    image: Annotated[Optional[Path], typer.Option("--image", help="DICOM folder/zip or NIfTI.")] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Lesion mask aligned with --image.")] = None,
    label: Annotated[
        Optional[int], typer.Option("--label", help="Lesion label in the mask (default: all).")
    ] = None,
    point: Annotated[Optional[str], typer.Option("--point", help="Click x,y,z in LPS mm.")] = None,
    diameter: Annotated[
        Optional[float], typer.Option("--diameter", help="Lesion diameter in mm (with --point).")
    ] = None,
    manifest: Annotated[
        Optional[Path], typer.Option("--manifest", help="Batch of studies as a manifest CSV.")
    ] = None,
    series: Annotated[
        Optional[str], typer.Option(help="SeriesInstanceUID when a folder holds several.")
    ] = None,
    patient_id: Annotated[
        Optional[str],
        typer.Option("--patient-id", help="Patient id for the lesion ids with --image (default: case)."),
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Geometry tolerance (mm) between image and mask.")] = 1e-3,
    min_size_mm: Annotated[
        float, typer.Option(help="Smaller lesions are flagged 'too small to characterise'.")
    ] = 5.0,
    dicom_sr: Annotated[
        bool, typer.Option("--dicom-sr", help="Also write a DICOM Structured Report.")
    ] = False,
    gradcam: Annotated[bool, typer.Option(help="Draw Grad-CAM overlays.")] = True,
    overwrite: OverwriteOpt = False,
) -> None:
    """Classify lesions in a new study with one or more checkpoints."""
    from liverlesion.predict import predict_cli

    _out_dir(out, "--out")
    predict_cli(
        models=model,
        out=out,
        image=image,
        mask=mask,
        label=label,
        point=point,
        diameter=diameter,
        manifest=manifest,
        series=series,
        patient_id=patient_id,
        tolerance=tolerance,
        min_size_mm=min_size_mm,
        dicom_sr=dicom_sr,
        gradcam=gradcam,
        overwrite=overwrite,
    )


@app.command()
def export(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint to export.")],
    format: Annotated[str, typer.Option("--format", help="onnx | torchscript.")],
    out: Annotated[Path, typer.Argument(help="Output file.")],
) -> None:
    """Export a checkpoint to ONNX or TorchScript."""
    from liverlesion.export import export_model

    _out_file(out, "OUT")
    path = export_model(model, format, out)
    typer.echo(f"wrote {path} and {path.name}.json (input: [0, 1] patches; output: class probabilities)")


@app.command()
def serve(
    model: Annotated[list[Path], typer.Option("--model", help="Checkpoint(s); several = ensemble.")],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (no authentication: keep 127.0.0.1).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8765,
    max_upload_mb: Annotated[
        float,
        typer.Option("--max-upload-mb", help="Largest accepted upload (MiB); bigger ones get HTTP 413."),
    ] = 2048.0,
    max_concurrent: Annotated[
        int,
        typer.Option(
            "--max-concurrent", help="Prediction requests in flight at once; more get HTTP 503 (retry)."
        ),
    ] = 64,
) -> None:
    """Serve a local browser UI (and JSON API) to classify a lesion."""
    import math

    from liverlesion.serve import serve as run_server

    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise UserError(f"--max-upload-mb {max_upload_mb:g}: must be a positive number of MiB (default 2048)")
    run_server(
        model,
        host=host,
        port=port,
        max_upload_bytes=int(max_upload_mb * 1024**2),
        max_concurrent=max_concurrent,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one-line messages."""
    try:
        app(args=argv, standalone_mode=False)
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
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:  # click usage errors already printed
        return int(e.code or 0)
    except Exception as e:  # click's own usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            typer.echo("liverlesion: aborted", err=True)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
