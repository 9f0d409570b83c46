"""Ensemble members: the checkpoints a :class:`~liverlesion.classifier.Classifier` is made of.

``load_members`` reads one or more ``model.pt`` files (or their up-to-date onnx exports, without
importing torch) after checking every option; ``check_members`` refuses an ensemble whose members
disagree on classes, input channels or patch settings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liverlesion.errors import UserError
from liverlesion.model_input import checkpoint_pool
from liverlesion.onnx_backend import OnnxNet, checkpoint_view, file_hash, fresh_export
from liverlesion.runs import model_files
from liverlesion.runtime import (
    apply_torch_threads,
    check_backend,
    check_device,
    check_positive_int,
    cuda_maybe_present,
    resolve_threads,
    resolve_torch_device,
)

__all__ = ["Member", "check_members", "load_members"]


@dataclass
class Member:
    """One loaded checkpoint of an ensemble: its network (torch or onnx), fields and file hash."""

    path: Path
    model: Any  # torch.nn.Module (LesionNet), or onnx_backend.OnnxNet (its exported graph)
    ckpt: dict  # the checkpoint without weights (onnx: the same fields, from the export's sidecar)
    sha256: str
    torch_model: Any = None  # with onnx: the LesionNet, loaded only when Grad-CAM needs it

    @property
    def backend(self) -> str:
        return "onnx" if getattr(self.model, "takes_numpy", False) else "torch"

    def network(self, device: str = "cpu"):
        """The torch LesionNet (for Grad-CAM); with the onnx backend loaded now, once."""
        if self.backend == "torch":
            return self.model
        if self.torch_model is None:
            from liverlesion.model import load_checkpoint  # local: heavy (torch), only when Grad-CAM needs it

            self.torch_model = load_checkpoint(self.path)[0].eval().to(device)
        return self.torch_model

    @property
    def pool(self) -> str:
        """How the member pools its features (``global`` | ``lesion``: it also takes the lesion mask)."""
        return checkpoint_pool(self.ckpt)

    @property
    def temperature(self) -> float:
        t = self.ckpt.get("temperature")
        return float(t) if t is not None and math.isfinite(float(t)) and float(t) > 0 else 1.0

    @property
    def threshold(self) -> float | None:
        t = self.ckpt.get("threshold")
        return None if t is None or not math.isfinite(float(t)) else float(t)

    def describe(self) -> dict[str, Any]:
        """Plain values for results.json (no weights, no patient data)."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "liverlesion_version": self.ckpt.get("liverlesion_version"),
            "fold": self.ckpt.get("fold"),
            "backbone": (self.ckpt.get("config") or {}).get("model", {}).get("backbone"),
            "temperature": self.temperature,
            "threshold": self.threshold,
            "positive_class": self.ckpt.get("positive_class"),
            "created": self.ckpt.get("created"),
            "pool": self.pool,
            "backend": self.backend,
            "onnx": str(self.model.path) if self.backend == "onnx" else None,
        }


def check_members(members: list[Member]) -> None:
    """Ensemble members must agree on everything that shapes their input and output.

    Raises:
        UserError: Two members differ in class names, positive class, input channels or patch settings.
    """
    first = members[0]

    def key(m: Member) -> dict[str, Any]:
        return {
            "class names": [str(c) for c in m.ckpt.get("class_names", [])],
            "positive class": m.ckpt.get("positive_class"),
            "input channels": int(m.ckpt.get("in_chans", -1)),
            "patch settings": (m.ckpt.get("config") or {}).get("patch"),
        }

    ref = key(first)
    for m in members[1:]:
        k = key(m)
        for what, value in k.items():
            if value != ref[what]:
                if what == "patch settings":
                    diff = sorted(
                        name
                        for name in set(value or {}) | set(ref[what] or {})
                        if (value or {}).get(name) != (ref[what] or {}).get(name)
                    )
                    shown = ", ".join(
                        f"{n}: {(ref[what] or {}).get(n)!r} vs {(value or {}).get(n)!r}" for n in diff
                    )
                else:
                    shown = f"{ref[what]!r} vs {value!r}"
                raise UserError(
                    f"--model {first.path} and --model {m.path} differ in {what} ({shown}); an ensemble needs "
                    "checkpoints trained with the same classes and patch settings: pass checkpoints of one run"
                )


def load_members(
    ckpt: str | os.PathLike | Sequence[str | os.PathLike],
    device: str = "auto",
    backend: str = "auto",
    threads: int | None = None,
    batch_size: int | None = None,
) -> tuple[list[Member], str, int | None, int]:
    """Load one checkpoint, or several as an ensemble (see :meth:`Classifier.load
    <liverlesion.classifier.Classifier.load>` for the arguments).

    Returns:
        The members, the device they run on, the CPU threads asked for and the batch size.

    Raises:
        UserError: As :meth:`Classifier.load <liverlesion.classifier.Classifier.load>`.
    """

    given = [Path(ckpt)] if isinstance(ckpt, str | os.PathLike) else [Path(p) for p in ckpt]
    paths = [f for p in given for f in model_files(p)]  # a cv run folder: its fold models
    if not paths:
        raise UserError(
            "--model: no checkpoint given; pass --model PATH/model.pt (repeat it for an ensemble)"
        )
    device = check_device(device)
    backend = check_backend(backend)
    check_positive_int(threads, "--threads", "CPU threads")
    batch_size = check_positive_int(batch_size, "--batch-size", "patches per forward call") or 64
    if backend == "onnx" and device.startswith("cuda"):
        raise UserError(
            f"--backend onnx with --device {device}: the onnx backend runs on the CPU; "
            "use --backend torch for CUDA, or --device cpu"
        )
    on_cpu = device == "cpu" or (device == "auto" and (backend == "onnx" or not cuda_maybe_present()))
    if backend != "torch" and on_cpu:
        hashes = [file_hash(p) for p in paths]
        found = [fresh_export(p, h) for p, h in zip(paths, hashes, strict=True)]
        missing = [why for f, why in found if f is None]
        if not missing:
            n = resolve_threads(threads)
            members = [
                Member(path=p, model=OnnxNet(f, info, threads=n), ckpt=checkpoint_view(info), sha256=h)
                for p, h, (f, info) in zip(paths, hashes, found, strict=True)
            ]
            check_members(members)
            return members, "cpu", n, batch_size
        if backend == "onnx":
            raise UserError(f"--backend onnx: {missing[0]}; or use --backend torch")

    from liverlesion.checkpoint import checkpoint_hash  # local: heavy (torch)
    from liverlesion.model import load_checkpoint  # local: heavy (torch)

    device = resolve_torch_device(device)
    if threads is not None:
        apply_torch_threads(threads)
    members = []
    for p in paths:
        model, data = load_checkpoint(p)
        model.eval().to(device)
        members.append(Member(path=p, model=model, ckpt=data, sha256=checkpoint_hash(p)))
    check_members(members)
    return members, device, threads, batch_size
