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


def _keep_argument_help() -> None:
    """Typer 0.20 sets an argument's help before calling click's ``Argument.__init__``, which (click >=
    8.2) resets it to None: positional arguments then show no description. Set it again afterwards."""
    from typer.core import TyperArgument

    init = TyperArgument.__init__
    if getattr(init, "_keeps_help", False):
        return

    def __init__(self, *args, help=None, **kwargs):  # noqa: A002 (typer's keyword)
        init(self, *args, help=help, **kwargs)
        if help is not None and getattr(self, "help", None) is None:
            self.help = help

    __init__._keeps_help = True
    TyperArgument.__init__ = __init__


_keep_argument_help()

# -h as well as --help, on every command (as nnU-Net, TotalSegmentator and pyradiomics).
_CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="liverlesion",
    help=f"Focal liver lesion classification on abdominal CT ({DISCLAIMER}).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=_CONTEXT,
    suggest_commands=False,  # click already says "Did you mean ...?"; typer's own would repeat it
)
import_app = typer.Typer(
    help="Import public datasets into a liverlesion manifest.",
    no_args_is_help=True,
    context_settings=_CONTEXT,
    suggest_commands=False,
)
app.add_typer(import_app, name="import")

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", help="YAML config file (see config.py).", show_default="none")
]
PresetOpt = Annotated[
    Optional[str],
    typer.Option("--preset", help="Preset: quick | paper | default.", show_default="none: built-in defaults"),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", help="Override a setting, e.g. --set train.epochs=5 (repeatable).", show_default="none"
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing output folder.", show_default="off")
]
FROM_CONFIG = "from the config"

WeightsOpt = Annotated[
    Optional[str], typer.Option("--weights", help="imagenet | none | PATH.", show_default=FROM_CONFIG)
]
BackboneOpt = Annotated[Optional[str], typer.Option(help="timm backbone name.", show_default=FROM_CONFIG)]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Maximum epochs.", show_default=FROM_CONFIG)]
TrainBatchOpt = Annotated[
    Optional[int], typer.Option("--batch-size", help="Training batch size.", show_default=FROM_CONFIG)
]
# Inference and training resources (predict, serve, cv, train).
DeviceOpt = Annotated[
    str, typer.Option("--device", help="cpu | cuda | cuda:N | auto (CUDA when present, else CPU).")
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", help="CPU threads.", show_default="the free cores: affinity minus load, >= 1"),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="onnx (onnxruntime, CPU; needs the model.onnx that `liverlesion export` writes next to each "
        "checkpoint) | torch | auto (onnx when on the CPU and every checkpoint has an up-to-date export).",
    ),
]

# The output convention: -o/--out on every command that writes (as nnU-Net, TotalSegmentator and
# pyradiomics). OUT as a positional argument (the old spelling) still works, with a note.
_DEPRECATED_OUT = "Deprecated spelling of -o/--out (still accepted)."
_notes: list[str] = []


def _out_opt(help: str, default: str | None = None):  # noqa: A002 (typer's word)
    # No default means required (unless the deprecated positional OUT is given; see _output).
    return typer.Option("-o", "--out", help=help, show_default=default or "required")


def _output(
    out: Path | None, positional: Path | None, what: str, default: Path | None = None
) -> tuple[Path, str]:
    """The output path and how to name it in messages; refuses it missing or given twice."""
    if out is not None and positional is not None:
        raise UserError(f"-o/--out {out} and positional OUT {positional}: give the {what} once, as -o/--out")
    if positional is not None:
        _notes.append(
            f"note: OUT as a positional argument is deprecated; write -o {positional} (it works the same)"
        )
        return positional, "OUT"
    if out is None:
        if default is None:
            raise UserError(f"missing -o/--out: give the {what}, e.g. -o results/")
        return default, "--out"
    return out, "--out"


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


def _resources(device: str, threads: int | None, batch_size: int | None) -> tuple[str, int | None]:
    """Check --device, --threads and --batch-size before any work; the device normalised."""
    from liverlesion.runtime import check_device, check_positive_int

    check_positive_int(threads, "--threads", "CPU threads")
    check_positive_int(batch_size, "--batch-size", "patches per batch")
    return check_device(device), threads


def _training_overrides(device: str, threads: int | None, batch_size: int | None) -> dict:
    """--device / --threads / --batch-size as train.* settings (cuda:N: that GPU only)."""
    import os

    device, threads = _resources(device, threads, batch_size)
    extra: dict = {"train.batch_size": batch_size, "train.max_threads": threads}
    if device == "cpu":
        extra["train.accelerator"] = "cpu"
    elif device.startswith("cuda"):
        extra["train.accelerator"] = "gpu"
        extra["train.devices"] = 1
        if ":" in device:  # before torch is imported: the process sees that GPU only
            os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
    return extra


def _default_training_threads(cfg, threads: int | None) -> None:
    """Neither --threads nor train.max_threads: torch uses the free cores, not every core."""
    if threads is None and cfg.train.max_threads == 0:
        import torch

        from liverlesion.runtime import free_cores

        torch.set_num_threads(free_cores())


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
        Optional[Path], typer.Argument(metavar="[OUT]", help=_DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], _out_opt("Output folder for volumes, masks and manifest.csv.")] = None,
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

    out, name = _output(out_opt, out, "output folder")
    _out_dir(out, name)
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
        Optional[Path], _out_opt("Also write the lesion table to this CSV.", "none: print only")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Geometry tolerance (mm) between image and mask.")] = 1e-3,
    series: Annotated[
        Optional[str],
        typer.Option(help="SeriesInstanceUID when a folder holds several.", show_default="the only series"),
    ] = None,
) -> None:
    """Compute and print the lesion table and a summary for a manifest."""
    from liverlesion.inspection import inspect_manifest

    _out_file(out, "--out")
    inspect_manifest(manifest, out=out, tolerance=tolerance, series=series)


@import_app.command("ircadb")
def import_ircadb(
    src: Annotated[
        Path, typer.Argument(help="3D-IRCADb-01 folder (holding 3Dircadb1.N) or one 3Dircadb1.N.")
    ],
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=_DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], _out_opt("Output folder for NIfTI files and manifest.csv.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Import 3D-IRCADb-01 (tumours -> metastasis, cysts -> cyst)."""
    from liverlesion.datasets.ircadb import import_ircadb as _imp
    from liverlesion.datasets.ircadb import import_summary

    out, name = _output(out_opt, out, "output folder")
    _out_dir(out, name)
    manifest = _imp(src, out, overwrite=overwrite)
    typer.echo(import_summary(manifest.parent))


ClassMapOpt = Annotated[
    list[str],
    typer.Option(
        "--class-map",
        help="Label value (or its dataset.json name) = lesion class, e.g. 2=metastasis; repeatable or "
        "comma-separated. Each connected component of a mapped value is a lesion.",
        show_default="required",
    ),
]
ImportToleranceOpt = Annotated[
    float, typer.Option("--tolerance", help="Geometry tolerance (mm) between each CT and its label map.")
]


@import_app.command("msd")
def import_msd(
    src: Annotated[
        Path,
        typer.Argument(help="Decathlon task folder, e.g. Task03_Liver (dataset.json, imagesTr/, labelsTr/)."),
    ],
    class_map: ClassMapOpt,
    out: Annotated[Path, _out_opt("Output folder for lesion masks and manifest.csv.")],
    tolerance: ImportToleranceOpt = 1e-3,
    overwrite: OverwriteOpt = False,
) -> None:
    """Import a Medical Segmentation Decathlon task (e.g. Task03_Liver: --class-map 2=metastasis)."""
    from liverlesion.datasets.labelmap import import_summary
    from liverlesion.datasets.msd import import_msd as _imp

    _out_dir(out, "--out")
    manifest = _imp(src, out, class_map, overwrite=overwrite, tolerance=tolerance)
    typer.echo(import_summary(manifest.parent))


@import_app.command("folder")
def import_folder(
    src: Annotated[
        Path,
        typer.Argument(
            help="nnU-Net raw dataset (dataset.json, imagesTr/, labelsTr/) or a folder with images/ + labels/."
        ),
    ],
    class_map: ClassMapOpt,
    out: Annotated[Path, _out_opt("Output folder for lesion masks and manifest.csv.")],
    tolerance: ImportToleranceOpt = 1e-3,
    overwrite: OverwriteOpt = False,
) -> None:
    """Import CT + label-map pairs (nnU-Net raw layout, or images/ + labels/ matched by case name)."""
    from liverlesion.datasets.folder import import_folder as _imp
    from liverlesion.datasets.labelmap import import_summary

    _out_dir(out, "--out")
    manifest = _imp(src, out, class_map, overwrite=overwrite, tolerance=tolerance)
    typer.echo(import_summary(manifest.parent))


@import_app.command("tcia-crlm")
def import_tcia_crlm(
    src: Annotated[
        Path,
        typer.Argument(
            help="TCIA Colorectal-Liver-Metastases download (manifest-*, collection or CRLM-CT-NNNN)."
        ),
    ],
    out: Annotated[Path, _out_opt("Output folder for manifest.csv and the import report.")],
    overwrite: OverwriteOpt = False,
) -> None:
    """Import TCIA Colorectal-Liver-Metastases (tumour segments -> metastasis; CT and SEG used in place)."""
    from liverlesion.datasets.tcia_crlm import import_summary as _summary
    from liverlesion.datasets.tcia_crlm import import_tcia_crlm as _imp

    _out_dir(out, "--out")
    manifest = _imp(src, out, overwrite=overwrite)
    typer.echo(_summary(manifest.parent))


@app.command()
def patches(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=_DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], _out_opt("Output folder for patch arrays and contact sheet.")] = None,
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

    out, name = _output(out_opt, out, "output folder")
    _out_dir(out, name)
    if model is not None:
        given = [n for n, v in (("--config", config), ("--preset", preset), ("--set", set_)) if v]
        if given:
            raise UserError(
                f"--model {model} with {' and '.join(given)}: the checkpoint fixes the patch settings; "
                f"drop {' and '.join(given)}, or drop --model"
            )
        patch_cfg = _checkpoint_patch_config(model)
    else:
        patch_cfg = _config(config, preset, set_).patch
    folder = build_patches(manifest, out, patch_cfg, tolerance=tolerance, series=series, overwrite=overwrite)
    typer.echo(f"patches: {folder} (index.csv, contact_sheet.png)")


def _checkpoint_patch_config(path: Path):
    """The PatchConfig a checkpoint was trained with (its export's sidecar when up to date: no torch)."""
    from liverlesion.config import config_from_dict
    from liverlesion.onnx_backend import fresh_export

    if not Path(path).is_file():
        raise UserError(f"--model {path}: file not found; give the path of a model.pt written by train or cv")
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
        Optional[Path], typer.Argument(metavar="[OUT]", help=_DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], _out_opt("Run folder.")] = None,
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
    out, name = _output(out_opt, out, "run folder")
    _out_dir(out, name)
    extra = _training_overrides(device, threads, batch_size)
    cfg = _config(
        config,
        preset,
        set_,
        **{"model.weights": weights, "model.backbone": backbone, "train.epochs": epochs, **extra},
    )
    from liverlesion.cv import train_single

    _default_training_threads(cfg, threads)
    train_single(manifest, out, cfg, resume=resume)


@app.command()
def cv(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=_DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], _out_opt("Run folder.")] = None,
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
    out, name = _output(out_opt, out, "run folder")
    _out_dir(out, name)
    extra = _training_overrides(device, threads, batch_size)
    cfg = _config(
        config,
        preset,
        set_,
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
    from liverlesion.cv import class_names_from

    class_names_from(df)  # one class only: its own message comes first
    check_folds(
        int(df["patient_id"].astype(str).nunique()),
        cfg.cv.folds,
        cfg.train.val_fraction,
        "--folds" if folds is not None else "cv.folds",
        classes=list(df["lesion_class"].astype(str)),
    )
    _default_training_threads(cfg, threads)
    run_cv(manifest, out, cfg, resume=resume, baselines=baselines)


@app.command()
def demo(
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=_DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], _out_opt("Output folder.", "liverlesion-demo")] = None,
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

    out, name = _output(out_opt, out, "output folder", default=Path("liverlesion-demo"))
    _out_dir(out, name)
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
        Optional[str], typer.Option(help="Positive class.", show_default="metastasis")
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
        Optional[Path], typer.Argument(metavar="[OUT]", help=_DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], _out_opt("Output folder.")] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the mean-HU and radiomics-style baselines with patient-level CV."""
    from liverlesion.baselines import run_baselines_cli

    out, name = _output(out_opt, out, "output folder")
    _out_dir(out, name)
    cfg = _config(config, preset, set_)
    run_baselines_cli(manifest, out, cfg)


IMAGE_FORMATS = (
    "DICOM series folder, .zip of one DICOM series, single (multi-frame) DICOM file, "
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd)"
)


@app.command()
def predict(
    model: Annotated[list[Path], typer.Option("--model", help="Checkpoint(s); several = ensemble.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")],
    image: Annotated[
        Optional[Path], typer.Option("--image", help=f"The CT: {IMAGE_FORMATS}.", show_default="none")
    ] = None,
    mask: Annotated[
        Optional[Path],
        typer.Option(
            "--mask",
            help="Lesion mask aligned with --image (same formats), or a DICOM SEG file referencing it.",
            show_default="none",
        ),
    ] = None,
    label: Annotated[
        Optional[str],
        typer.Option(
            "--label",
            help="Lesion label in the mask; for a DICOM SEG a segment number or label (Tumor* patterns too).",
            show_default="every label",
        ),
    ] = None,
    point: Annotated[
        Optional[str], typer.Option("--point", help="Click x,y,z in LPS mm.", show_default="none")
    ] = None,
    diameter: Annotated[
        Optional[float],
        typer.Option("--diameter", help="Lesion diameter in mm (with --point).", show_default="none"),
    ] = None,
    manifest: Annotated[
        Optional[Path],
        typer.Option("--manifest", help="Batch of studies as a manifest CSV.", show_default="none"),
    ] = None,
    series: Annotated[
        Optional[str],
        typer.Option(help="SeriesInstanceUID when a folder holds several.", show_default="the only series"),
    ] = None,
    patient_id: Annotated[
        Optional[str],
        typer.Option("--patient-id", help="Patient id for the lesion ids with --image.", show_default="case"),
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Geometry tolerance (mm) between image and mask.")] = 1e-3,
    min_size_mm: Annotated[
        float, typer.Option(help="Smaller lesions are flagged 'too small to characterise'.")
    ] = 5.0,
    dicom_sr: Annotated[
        bool, typer.Option("--dicom-sr", help="Also write a DICOM Structured Report.", show_default="off")
    ] = False,
    dicom_seg: Annotated[
        bool,
        typer.Option(
            "--dicom-seg", help="Also write the lesion masks used as a DICOM SEG.", show_default="off"
        ),
    ] = False,
    gradcam: Annotated[
        Optional[bool],
        typer.Option(
            "--gradcam/--no-gradcam",
            help="Draw Grad-CAM overlays (they need torch: with the onnx backend, --gradcam loads it).",
            show_default="on with the torch backend, off with onnx",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    threads: ThreadsOpt = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="Patches per forward call.", show_default="64")
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Classify lesions in a new study with one or more checkpoints."""
    from liverlesion.runtime import check_backend

    _resources(device, threads, batch_size)
    check_backend(backend)
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
        dicom_seg=dicom_seg,
        gradcam=gradcam,
        overwrite=overwrite,
        device=device,
        backend=backend,
        threads=threads,
        batch_size=batch_size,
    )


@app.command()
def export(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint to export.")],
    format: Annotated[str, typer.Option("--format", help="onnx | torchscript.")] = "onnx",
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=_DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[
        Optional[Path],
        _out_opt(
            "Output file (predict --backend auto/onnx uses model.onnx next to model.pt).",
            "next to the checkpoint: model.onnx | model.ts.pt",
        ),
    ] = None,
) -> None:
    """Export a checkpoint to ONNX or TorchScript."""
    from liverlesion.onnx_backend import export_path

    fmt = str(format).strip().lower()
    default = export_path(model) if fmt == "onnx" else Path(model).with_suffix(".ts.pt")
    out, name = _output(out_opt, out, "output file", default=default)
    _out_file(out, name)
    from liverlesion.export import export_model

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
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    threads: ThreadsOpt = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="Patches per forward call.", show_default="64")
    ] = None,
    max_concurrent: Annotated[
        int,
        typer.Option(
            "--max-concurrent", help="Prediction requests in flight at once; more get HTTP 503 (retry)."
        ),
    ] = 64,
    max_studies: Annotated[
        int,
        typer.Option(
            "--max-studies", help="Viewer studies kept loaded at once (least recently used closed first)."
        ),
    ] = 4,
    study_ttl_min: Annotated[
        float, typer.Option("--study-ttl-min", help="Minutes a viewer study stays loaded after its last use.")
    ] = 30.0,
) -> None:
    """Serve a local browser viewer (and JSON API) to classify lesions."""
    import math

    from liverlesion.runtime import check_backend, resolve_threads

    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise UserError(f"--max-upload-mb {max_upload_mb:g}: must be a positive number of MiB (default 2048)")
    _resources(device, threads, batch_size)
    check_backend(backend)
    from liverlesion.serve import serve as run_server

    run_server(
        model,
        host=host,
        port=port,
        max_upload_bytes=int(max_upload_mb * 1024**2),
        device=device,
        backend=backend,
        threads=resolve_threads(threads),
        batch_size=batch_size,
        max_concurrent=max_concurrent,
        max_studies=max_studies,
        study_ttl_s=study_ttl_min * 60.0,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one-line messages."""
    _notes.clear()
    try:
        app(args=argv, standalone_mode=False)
        for note in _notes:  # after the work, so an error stays the only line on stderr
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
