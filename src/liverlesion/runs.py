"""The run-folder layout: the only code that knows where the files of a run live.

A run folder is written by ``liverlesion cv`` (or ``train`` / ``baselines``) and read by
``evaluate``, ``report``, ``gradcam`` and ``external``::

    RUN/
      config.yaml            resolved config                     (cv, train, baselines)
      splits.json            patient-level folds, written once   (cv, baselines)
      run.json               run info: classes, patch_dir, versions, hardware
      patches/               the patch cache of the run (its layout: patch_cache.py)
      predictions.csv        out-of-fold test predictions         (predictions.py contract)
      val_predictions.csv    inner-validation predictions
      fold_K/model.pt        the fold's checkpoint
      fold_K/{test,val}_predictions.csv   the fold's predictions (resume)
      fold_K/checkpoints/    Lightning checkpoints (resume; removed once the fold is done)
      fold_K/logs/csv*/metrics.csv        Lightning CSV logs (loss curves)
      baselines/NAME/{predictions,val_predictions}.csv, baselines/summary.json
      metrics.json           written by evaluate
      plots/*.png            drawn by evaluate (Grad-CAM gallery) and report (the rest)
      report.html            written by report

Everything here is a plain path function: nothing reads or writes a file except
:func:`read_run_info`, which reads ``run.json``, and :func:`model_files`, which reads
``splits.json`` to tell an unfinished run from a finished one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from liverlesion.errors import UserError

CONFIG = "config.yaml"
SPLITS = "splits.json"
RUN_INFO = "run.json"
PATCHES = "patches"
PREDICTIONS = "predictions.csv"
VAL_PREDICTIONS = "val_predictions.csv"
METRICS = "metrics.json"
REPORT = "report.html"
PLOTS = "plots"
MODEL = "model.pt"
BASELINES = "baselines"
GRADCAM_GALLERY = "gradcam_gallery.png"


# The run folder's own entries, by the kind each must be.
_FILE_SLOTS = (CONFIG, SPLITS, RUN_INFO, PREDICTIONS, VAL_PREDICTIONS, METRICS, REPORT)
_FOLDER_SLOTS = (PATCHES, PLOTS, BASELINES)


def check_run_slots(run_dir: str | Path) -> None:
    """Refuse a run folder whose own entries are of the wrong kind: a folder named ``config.yaml`` or
    ``predictions.csv``, a file named ``baselines`` or ``plots``.

    Each reader would otherwise pass over it as absent (defaults used, "not found: run cv first") or
    fail on it later; called by ``evaluate``, ``report``, ``baselines`` and ``--resume`` before any work.
    """
    run_dir = Path(run_dir)
    for name in _FILE_SLOTS:
        if (run_dir / name).is_dir():
            raise UserError(
                f"{run_dir / name}: a folder where the run's {name} file belongs; move it out of the run folder "
                "and re-run (the command that writes it will write it again)"
            )
    for name in _FOLDER_SLOTS:
        p = run_dir / name
        if p.exists() and not p.is_dir():
            raise UserError(
                f"{p}: a file where the run's {name}/ folder belongs; move it out of the run folder and re-run"
            )


def config_path(run_dir: str | Path) -> Path:
    """``RUN/config.yaml``: the resolved config of the run."""
    return Path(run_dir) / CONFIG


def splits_path(run_dir: str | Path) -> Path:
    """``RUN/splits.json``: the patient-level folds."""
    return Path(run_dir) / SPLITS


def run_info_path(run_dir: str | Path) -> Path:
    """``RUN/run.json``: classes, patch cache, versions and hardware of the run."""
    return Path(run_dir) / RUN_INFO


def patches_dir(run_dir: str | Path) -> Path:
    """``RUN/patches``: where ``cv`` and ``baselines`` build the run's patch cache."""
    return Path(run_dir) / PATCHES


def predictions_path(run_dir: str | Path) -> Path:
    """``RUN/predictions.csv``: the out-of-fold test predictions."""
    return Path(run_dir) / PREDICTIONS


def val_predictions_path(run_dir: str | Path) -> Path:
    """``RUN/val_predictions.csv``: the inner-validation predictions."""
    return Path(run_dir) / VAL_PREDICTIONS


def metrics_path(run_dir: str | Path) -> Path:
    """``RUN/metrics.json``: written by ``evaluate``."""
    return Path(run_dir) / METRICS


def report_path(run_dir: str | Path) -> Path:
    """``RUN/report.html``: written by ``report``."""
    return Path(run_dir) / REPORT


def plots_dir(run_dir: str | Path) -> Path:
    """``RUN/plots``: the PNGs of the report."""
    return Path(run_dir) / PLOTS


def plot_path(run_dir: str | Path, name: str) -> Path:
    """``RUN/plots/NAME``."""
    return plots_dir(run_dir) / name


def gradcam_gallery_path(run_dir: str | Path) -> Path:
    """``RUN/plots/gradcam_gallery.png``: drawn by ``evaluate`` (fold models), shown by ``report``."""
    return plot_path(run_dir, GRADCAM_GALLERY)


def fold_dir(run_dir: str | Path, fold: int | str) -> Path:
    """``RUN/fold_K``."""
    return Path(run_dir) / f"fold_{fold}"


def model_path(run_dir: str | Path, fold: int | str) -> Path:
    """``RUN/fold_K/model.pt``: the fold's checkpoint."""
    return fold_model_path(fold_dir(run_dir, fold))


def fold_model_path(fold_folder: str | Path) -> Path:
    """``model.pt`` inside a fold folder (or inside the output folder of ``liverlesion train``)."""
    return Path(fold_folder) / MODEL


def model_files(path: str | Path, name: str = "--model") -> list[Path]:
    """The checkpoints a ``--model`` path stands for: a ``model.pt``, a folder holding one (``train``'s
    output, or one fold), or a ``cv`` run folder: its fold models in fold order, used as an ensemble.

    Raises:
        UserError: Nothing usable there (:func:`not_a_model_file`).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        if fold_model_path(path).is_file():
            return [fold_model_path(path)]
        folds = _fold_models(path)
        if folds:
            _check_all_folds(path, folds, name)
            return folds
    from liverlesion.errors import UserError  # local: this module is plain path functions

    raise UserError(not_a_model_file(path, name))


def _check_all_folds(run_dir: Path, folds: list[Path], name: str) -> None:
    """An unfinished cv run (fewer fold models than its ``splits.json`` folds) is not a silent smaller ensemble."""
    try:
        expected = [int(s["fold"]) for s in json.loads(splits_path(run_dir).read_text())["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable splits.json: the fold models found are all there is to go by
    missing = [k for k in expected if fold_model_path(fold_dir(run_dir, k)) not in folds]
    if missing:
        from liverlesion.errors import UserError  # local: this module is plain path functions

        raise UserError(
            f"{name} {run_dir}: {len(expected) - len(missing)} of its {len(expected)} fold models exist "
            f"(no fold_{', fold_'.join(map(str, missing))}/model.pt): the run is unfinished; finish it with "
            "`liverlesion cv ... --resume`, or give the fold models to use, one --model each"
        )


def _fold_models(run_dir: Path) -> list[Path]:
    """``fold_K/model.pt`` files of a cv run folder, in fold order."""
    folds = [p for p in run_dir.glob("fold_*/model.pt") if p.parent.name[5:].isdigit() and p.is_file()]
    return sorted(folds, key=lambda p: int(p.parent.name[5:]))


def not_a_model_file(path: str | Path, name: str = "--model") -> str:
    """The one-line error for a model path that is not a file: what is there, and which file to give."""
    path = Path(path)
    if not path.is_dir():
        return f"{name} {path}: file not found; give the path of a model.pt written by train or cv"
    if fold_model_path(path).is_file():
        return f"{name} {path}: is a folder; give the model.pt inside it: {fold_model_path(path)}"
    folds = _fold_models(path)
    if folds:
        return (
            f"{name} {path}: is a cv run folder; give one of its {len(folds)} fold models, e.g. {folds[0]} "
            "(predict, serve and export also take the folder itself: all its folds)"
        )
    return f"{name} {path}: is a folder without a model.pt; give the model.pt written by train or cv"


def fold_predictions_path(fold_folder: str | Path, name: str) -> Path:
    """``fold_K/NAME_predictions.csv`` (``test`` or ``val``) inside a fold folder."""
    return Path(fold_folder) / f"{name}_predictions.csv"


def checkpoints_dir(fold_folder: str | Path) -> Path:
    """``fold_K/checkpoints``: Lightning's checkpoints inside a fold folder."""
    return Path(fold_folder) / "checkpoints"


def logs_dir(fold_folder: str | Path) -> Path:
    """``fold_K/logs``: Lightning's loggers inside a fold folder."""
    return Path(fold_folder) / "logs"


def loss_log_files(run_dir: str | Path) -> list[Path]:
    """Every fold's Lightning CSV log, ``RUN/fold_*/logs/csv*/metrics.csv`` (unsorted)."""
    return list(Path(run_dir).glob("fold_*/logs/csv*/metrics.csv"))


def loss_logs(run_dir: str | Path) -> dict[str, Any]:
    """Per fold and training stage, in the order they ran, Lightning's CSV log as a DataFrame.

    Keys are ``"fold_K stage"`` (stage: ``probe``, ``finetune``; ``train`` for ``end_to_end``);
    a log that cannot be parsed is left out.
    """
    import pandas as pd  # local: heavy

    order = {"probe": 0, "train": 1, "finetune": 2}  # the order the stages ran in

    def stage(f: Path) -> str:
        return f.parent.name.removeprefix("csv").strip("_") or "train"

    logs = {}
    for f in sorted(loss_log_files(run_dir), key=lambda f: (f.parents[2].name, order.get(stage(f), 3))):
        try:
            logs[f"{f.parents[2].name} {stage(f)}"] = pd.read_csv(f)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError):
            continue
    return logs


def baselines_dir(run_dir: str | Path) -> Path:
    """``RUN/baselines``: one folder per baseline."""
    return Path(run_dir) / BASELINES


def baseline_predictions(run_dir: str | Path) -> list[Path]:
    """``RUN/baselines/*/predictions.csv``, sorted by baseline name."""
    return sorted(baselines_dir(run_dir).glob(f"*/{PREDICTIONS}"))


def baseline_summary_path(run_dir: str | Path) -> Path:
    """``RUN/baselines/summary.json``."""
    return baselines_dir(run_dir) / "summary.json"


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` as a dict (empty when absent); a broken file is a :class:`UserError`."""
    path = run_info_path(run_dir)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError: not UTF-8 text at all
        raise UserError(f"{path}: not valid JSON ({e}); re-run `liverlesion cv` or repair the file") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; re-run `liverlesion cv`")
    for key, ok, what in _RUN_INFO_TYPES:
        if key in data and data[key] is not None and not ok(data[key]):
            raise UserError(
                f"{path}: {key} is {data[key]!r}, expected {what}; the file is damaged or was edited: re-run "
                "`liverlesion cv`, or repair or delete that entry"
            )
    return data


# run.json entries that evaluate and report use, and what each must be.
_RUN_INFO_TYPES = (
    (
        "class_names",
        lambda v: isinstance(v, list)
        and len(v) >= 2
        and len(set(v)) == len(v)
        and all(isinstance(c, str) and c for c in v),
        'a list of at least two distinct class names, e.g. ["cyst", "metastasis"]',
    ),
    ("patch_dir", lambda v: isinstance(v, str), "the patch folder's path as text"),
    ("hardware", lambda v: isinstance(v, dict), "an object"),
    (
        "train_seconds",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "a number of seconds",
    ),
)


def run_patch_dir(run_dir: str | Path, metrics: dict[str, Any]) -> Path | None:
    """The run's patch cache: ``patch_dir`` of ``run.json`` (or ``metrics.json``), found again if moved.

    A relative path is taken from the run folder; when the recorded folder is gone (the run
    folder was moved), ``RUN/patches/<name>`` is tried. None when no patch cache is recorded.
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    p = info.get("patch_dir") or metrics.get("run", {}).get("patch_dir")
    if not p:
        return None
    p = Path(p)
    if not p.is_absolute():
        p = run_dir / p
    if not p.is_dir():  # the run folder was moved: look for the cache inside it
        moved = patches_dir(run_dir) / p.name
        p = moved if moved.is_dir() else p
    return p
