"""The checkpoint file contract: ``model.pt`` written by ``train`` / ``cv`` (see docs/ARCHITECTURE.md).

A checkpoint is a ``torch.save`` of plain values only (dict / list / str / number / bool / None /
tensor), so it loads with ``torch.load(weights_only=True)``: no code runs when a file is opened.
:func:`save_checkpoint` writes one atomically; :func:`read_checkpoint` opens one and checks its
format, version and fields with one-line errors; :func:`safe_torch_load` is the one ``torch.load``
for user files (checkpoints and ``--weights`` files). Rebuilding the network from a checkpoint is
:func:`liverlesion.model.load_checkpoint`.
"""

from __future__ import annotations

import codecs
import contextlib
import datetime as _dt
import math
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from liverlesion import __version__
from liverlesion.config import Config
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_path
from liverlesion.io.archive import is_torch_archive
from liverlesion.onnx_backend import file_hash
from liverlesion.runs import not_a_model_file
from liverlesion.versions import library_versions

if TYPE_CHECKING:
    from liverlesion.model import LesionNet

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "MIN_CHECKPOINT_VERSION",
    "checkpoint_hash",
    "foreign_kind",
    "read_checkpoint",
    "safe_torch_load",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "liverlesion.checkpoint"
CHECKPOINT_VERSION = 1  # bump when the layout changes; load_checkpoint reads MIN..CURRENT
MIN_CHECKPOINT_VERSION = 1


def safe_torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for the ways a file can be wrong."""
    if Path(path).suffix.lower() == ".onnx":  # export writes model.onnx next to model.pt: easily mixed up
        raise UserError(
            f"{what} {path}: an ONNX export, not a PyTorch file; give the model.pt it was exported from "
            "(predict and serve find the model.onnx next to it themselves, with --backend onnx or auto)"
        )
    with contextlib.suppress(OSError):  # a missing file is torch.load's to report
        if Path(path).stat().st_size == 0:  # torch says only 'EOFError: '
            raise UserError(
                f"{what} {path}: the file is empty (0 bytes; a copy or save that never finished); copy it again"
            )
    try:
        with warnings.catch_warnings():
            # torch warns (several lines) about the pickle protocol of a foreign file before refusing it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # liverlesion and Lightning always write zip archives; anything else is garbage or foreign
        if "Weights only load failed" in str(e) and zipfile.is_zipfile(path):
            kind = _sniff_pickle(path)
            raise UserError(
                f"{what} {path}: {kind}; it holds Python objects other than tensors and plain values, which "
                f"liverlesion will not unpickle (that could run code)"
            ) from e
        _refuse_other_kind(path, what, e)
        raise UserError(
            f"{what} {path}: not a PyTorch file or corrupt (not the zip archive torch.save writes); copy it again"
        ) from e
    except Exception as e:  # the unpickler fails in many ways on garbage (KeyError, EOFError, ...)
        _refuse_other_kind(path, what, e)
        raise UserError(
            f"{what} {path}: not a PyTorch file, truncated or corrupt ({_first_line(e)}); copy it again"
        ) from e


def _other_kind(path: Path) -> str | None:
    """What kind of file ``path`` is, when it is recognisably another input of this tool (an image,
    a DICOM file, a CSV / YAML / JSON text), else None (garbage or a damaged checkpoint)."""
    import gzip

    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        if head[:2] == b"\x1f\x8b":  # gzip: a .nii.gz (the only gzip this tool reads)
            with gzip.open(path, "rb") as f:
                head = f.read(4096)
    except (OSError, EOFError):
        return None
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    if len(head) >= 348 and sizes & {348, 540}:  # the NIfTI-1 / NIfTI-2 header size
        return "a NIfTI image"
    if head[128:132] == b"DICM":
        return "a DICOM file"
    if head.startswith(b"NRRD000"):
        return "a NRRD image"
    if head.startswith((b"ObjectType", b"NDims")):
        return "a MetaImage"
    if head and b"\x00" not in head:
        try:  # incremental: the 4096 bytes may end inside a character
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            return None
        return "a text file (e.g. a CSV, YAML or JSON file)"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
                return "a TorchScript export (`liverlesion export --format torchscript`; load it with torch.jit.load)"
            if not is_torch_archive(z):
                return "a zip archive without torch.save's contents (e.g. a zipped DICOM series)"
    except (zipfile.BadZipFile, OSError, ValueError):
        pass
    return None


def _refuse_other_kind(path: Path, what: str, cause: BaseException) -> None:
    """Say so when a file that failed to load as a checkpoint is another kind of input (e.g. the CT
    given as --model): 'corrupt ... copy it again' would be the wrong advice."""
    kind = _other_kind(Path(path))
    if kind is not None:
        wanted = (
            "a checkpoint or state_dict (model.pt / .pth / .safetensors)"
            if what == "--weights"
            else "the model.pt written by train or cv"
        )
        raise UserError(
            f"{what} {path}: {kind}, not {wanted}; check which file went to which option"
        ) from cause


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


def _sniff_pickle(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            data = b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    except (zipfile.BadZipFile, OSError):
        return "not a liverlesion checkpoint"
    if b"pytorch-lightning_version" in data:
        return "a PyTorch Lightning training checkpoint, not a liverlesion model; use fold_K/model.pt from the run folder"
    if CHECKPOINT_FORMAT.encode() in data:
        return "a liverlesion checkpoint with unexpected contents (tampered or made by a modified version)"
    return "not a liverlesion checkpoint"


def _plain(value: Any) -> Any:
    """Convert to types ``torch.load(weights_only=True)`` accepts (dict/list/str/number/bool/None/tensor)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if torch.is_tensor(value):
        return value.detach().cpu()
    # exact builtin types: subclasses such as torch's TorchVersion (a str) are not allowed by weights_only
    for t in (bool, int, float, str):
        if isinstance(value, t):
            return t(value)
    if value is None:
        return None
    raise TypeError(f"checkpoint field of type {type(value).__name__} cannot be stored safely")


def _versions() -> dict[str, str]:
    return {**library_versions(), "liverlesion": __version__}


def save_checkpoint(
    path: str | Path,
    model: LesionNet,
    config: Config,
    class_names: list[str],
    in_chans: int,
    **extra: Any,
) -> Path:
    """Write a self-describing checkpoint atomically (see docs/ARCHITECTURE.md).

    Args:
        path: Destination (``model.pt``).
        model: The trained model.
        config: Resolved config; stored as a dict.
        class_names: Class names in logit order.
        in_chans: Image channels the model takes (a ``pool="lesion"`` model also takes the mask channel).
        **extra: ``temperature`` (default 1.0), ``threshold`` (default 0.5), ``positive_class``
            (default ``config.eval.positive_class`` if it is a class), ``fold`` (default None) and any
            other plain values to store.
    """
    assert in_chans == model.in_chans, (in_chans, model.in_chans)
    assert len(class_names) == model.num_classes, (class_names, model.num_classes)
    positive = config.eval.positive_class if config.eval.positive_class in class_names else None
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "liverlesion_version": __version__,
        "config": _plain(config.to_dict()),
        "class_names": [str(c) for c in class_names],
        "in_chans": int(in_chans),
        "backbone_patch": model.backbone_patch,
        "fusion_features": list(model.fusion_features),
        "features_from": model.features_from,
        "pool": model.pool,  # global | lesion (input: in_chans image channels + 1 lesion-mask channel)
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "versions": _plain(_versions()),
        "temperature": 1.0,
        "threshold": 0.5,
        "positive_class": positive,
        "fold": None,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    for key, value in extra.items():
        payload[key] = _plain(value)
    payload["temperature"] = float(payload["temperature"])
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Open a checkpoint and check its format, version and fields (weights not yet fitted to a network).

    Returns:
        The checkpoint dict, ``state_dict`` included.

    Raises:
        UserError: missing / corrupt / foreign file, unsupported format version, missing fields,
            fields of the wrong kind or NaN / inf weights.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(not_a_model_file(path, "checkpoint"))
    obj = safe_torch_load(path, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path}: {foreign_kind(obj)}")
    version = obj.get("format_version")
    made_by = obj.get("liverlesion_version", "?")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise UserError(
            f"checkpoint {path}: format version {version} made by liverlesion {made_by} is newer than this "
            f"liverlesion {__version__} reads (<= {CHECKPOINT_VERSION}); upgrade: pip install -U liverlesion"
        )
    if version < MIN_CHECKPOINT_VERSION:
        raise UserError(
            f"checkpoint {path}: format version {version} (liverlesion {made_by}) is no longer supported; "
            f"retrain, or load it with liverlesion {made_by}"
        )
    missing = [k for k in ("config", "class_names", "in_chans", "state_dict") if k not in obj]
    if missing:
        raise UserError(
            f"checkpoint {path}: incomplete, no {', '.join(missing)}; the file is damaged, copy it again"
        )
    problem = _field_problem(obj)
    if problem:
        raise UserError(f"checkpoint {path}: {problem}")
    return obj


def _field_problem(obj: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's fields (types, decision values, finite weights), or None."""
    edited = "the file is damaged or was edited, use the original model.pt"
    names = obj["class_names"]
    if not isinstance(obj["config"], dict):
        return f"config is a {type(obj['config']).__name__}, not a mapping of settings; {edited}"
    if not isinstance(names, list) or len(set(map(str, names))) != len(names) or len(names) < 2:
        return f"class_names={names!r}: not a list of two or more distinct class names; {edited}"
    if type(obj["in_chans"]) is not int or obj["in_chans"] < 1:
        return f"in_chans={obj['in_chans']!r}: not a positive whole number; {edited}"
    if not isinstance(obj["state_dict"], dict):
        return f"state_dict is a {type(obj['state_dict']).__name__}, not a mapping of tensors; {edited}"
    temperature, threshold, positive = obj.get("temperature"), obj.get("threshold"), obj.get("positive_class")
    if temperature is not None and not (
        _is_number(temperature) and math.isfinite(temperature) and temperature > 0
    ):
        return f"temperature={temperature!r}: not a finite number > 0; {edited}"
    if threshold is not None and not (_is_number(threshold) and 0 <= threshold <= 1):
        return f"threshold={threshold!r}: not a probability in [0, 1]; {edited}"
    if positive is not None and positive not in names:
        return f"positive_class={positive!r} is not one of its class_names {names}; {edited}"
    # A diverged training run saves NaN weights: every lesion then got NaN probabilities, and a class.
    bad = [
        k
        for k, v in obj["state_dict"].items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())
    ]
    if bad:
        return (
            f"{len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}): the training run diverged; retrain "
            "(e.g. with a lower learning rate), or use a model from another run"
        )
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def foreign_kind(obj: Any) -> str:
    """What a file that is not a liverlesion checkpoint is, and what to use instead (one line)."""
    if isinstance(obj, dict):
        if "pytorch-lightning_version" in obj or ("state_dict" in obj and "global_step" in obj):
            return "a PyTorch Lightning training checkpoint, not a liverlesion model; use fold_K/model.pt from the run folder"
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return (
                "a plain state_dict, not a liverlesion checkpoint (no config or class names); use it to "
                "initialise training with --weights PATH, and predict with the model.pt that train / cv write"
            )
    return "not a liverlesion checkpoint; give the model.pt written by train / cv"


def checkpoint_hash(path: str | Path) -> str:
    """First 12 hex digits of the file's sha256 (provenance in reports and exports)."""
    return file_hash(path)
