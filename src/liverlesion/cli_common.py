"""What every ``liverlesion`` command shares: the Typer apps, the option declarations and the checks
that run before any work (output paths, --device / --threads / --batch-size, config overrides).

The commands live in ``cli.py`` (data and training), ``cli_import.py`` (``liverlesion import ...``)
and ``cli_predict.py`` (predict, export, serve); ``cli.main`` is the entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from liverlesion import DISCLAIMER
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
CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="liverlesion",
    help=f"Focal liver lesion classification on abdominal CT ({DISCLAIMER}).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
    suggest_commands=False,  # click already says "Did you mean ...?"; typer's own would repeat it
)
import_app = typer.Typer(
    help="Import public datasets into a liverlesion manifest.",
    no_args_is_help=True,
    context_settings=CONTEXT,
    suggest_commands=False,
)
app.add_typer(import_app, name="import")

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", help="YAML config file (see config.py).", show_default="none")
]
PresetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--preset",
        help="Preset: quick | paper | default (the same as no preset).",
        show_default="none: the built-in defaults",
    ),
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
DEPRECATED_OUT = "Deprecated spelling of -o/--out (still accepted)."
NOTES: list[str] = []


def out_opt(help: str, default: str | None = None, typed_required: bool = False):  # noqa: A002 (typer's word)
    # No default means required (unless the deprecated positional OUT is given; see output). An option
    # typer itself requires (no positional OUT to fall back on) shows typer's own [required] mark only.
    return typer.Option(
        "-o", "--out", help=help, show_default=False if typed_required else default or "required"
    )


def output(
    out: Path | None, positional: Path | None, what: str, default: Path | None = None
) -> tuple[Path, str]:
    """The output path and how to name it in messages; refuses it missing or given twice."""
    if out is not None and positional is not None:
        raise UserError(f"-o/--out {out} and positional OUT {positional}: give the {what} once, as -o/--out")
    if positional is not None:
        NOTES.append(
            f"note: OUT as a positional argument is deprecated; write -o {positional} (it works the same)"
        )
        return positional, "OUT"
    if out is None:
        if default is None:
            raise UserError(f"missing -o/--out: give the {what}, e.g. -o results/")
        return default, "--out"
    return out, "--out"


def config_from(
    config: Path | None, preset: str | None, sets: list[str] | None, resume_run: Path | None = None, **extra
):
    """The resolved config of a command; ``resume_run``: a run folder being resumed, whose own settings
    (its config.yaml) are the base when neither --config nor --preset is given."""
    from liverlesion.config import load_config

    overrides = list(sets or [])
    for key, value in extra.items():
        if value is not None:
            overrides.append(f"{key}={value}")
    base = None
    if resume_run is not None and config is None and preset is None:
        from liverlesion import runs
        from liverlesion.config import load_run_config

        saved = runs.config_path(resume_run)
        if saved.is_file():
            base = load_run_config(saved)
            print(f"--resume: the run's own settings, from {saved}", file=sys.stderr)
    return load_config(config, preset, overrides, base=base)


def out_dir(path: Path | None, name: str = "OUT") -> None:
    """Refuse an output folder that exists as a file (or lies under one) before any work."""
    if path is not None:
        from liverlesion.fileio import check_output_dir

        check_output_dir(path, name)


def out_file(path: Path | None, name: str) -> None:
    """Refuse an output file that is a folder (or lies under a file) before any work."""
    if path is not None:
        from liverlesion.fileio import check_output_file

        check_output_file(path, name)


def resources(device: str, threads: int | None, batch_size: int | None) -> tuple[str, int | None]:
    """Check --device, --threads and --batch-size before any work; the device normalised."""
    from liverlesion.runtime import check_device, check_positive_int

    check_positive_int(threads, "--threads", "CPU threads")
    check_positive_int(batch_size, "--batch-size", "patches per batch")
    return check_device(device), threads


def training_overrides(device: str, threads: int | None, batch_size: int | None) -> dict:
    """--device / --threads / --batch-size as train.* settings (cuda:N: that GPU only)."""
    import os

    device, threads = resources(device, threads, batch_size)
    extra: dict = {"train.batch_size": batch_size, "train.max_threads": threads}
    if device == "cpu":
        extra["train.accelerator"] = "cpu"
    elif device.startswith("cuda"):
        extra["train.accelerator"] = "gpu"
        extra["train.devices"] = 1
        if ":" in device:  # before torch is imported: the process sees that GPU only
            os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
    return extra


def default_training_threads(cfg, threads: int | None) -> None:
    """Neither --threads nor train.max_threads: torch uses the free cores, not every core."""
    if threads is None and cfg.train.max_threads == 0:
        import torch

        from liverlesion.runtime import free_cores

        torch.set_num_threads(free_cores())
