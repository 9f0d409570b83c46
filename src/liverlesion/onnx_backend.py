"""onnxruntime as the CPU inference backend of ``predict`` and ``serve``, without importing torch.

``liverlesion export --model run/fold_0/model.pt --format onnx`` writes ``run/fold_0/model.onnx`` and
its sidecar ``model.onnx.json`` next to the checkpoint. The export is *up to date* when its sidecar
names the checkpoint's current sha256, carries the full config (``export_version`` >= 2) and the
graph exists. Then :class:`OnnxNet` stands in for the network: the graph already holds the
checkpoint's test-time views and returns their mean ``logits``; the slice-sample mean, the
temperature, the ensemble mean and the decision stay in :mod:`liverlesion.inference` and
:mod:`liverlesion.decision`, as for the torch network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

MIN_EXPORT_VERSION = 2  # version 1 sidecars lack the config and the graph its "logits" output


def export_path(ckpt: str | Path) -> Path:
    """Where ``export`` puts a checkpoint's ONNX graph by default: ``model.pt`` -> ``model.onnx``."""
    return Path(ckpt).with_suffix(".onnx")


def sidecar_path(exported: str | Path) -> Path:
    """The metadata file next to an exported model: ``model.onnx`` -> ``model.onnx.json``."""
    p = Path(exported)
    return p.with_name(p.name + ".json")


def file_hash(path: str | Path) -> str:
    """First 12 hex digits of the file's sha256 (``model.checkpoint_hash`` calls this; no torch needed)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def fresh_export(ckpt: str | Path, sha256: str | None = None) -> tuple[Path | None, dict[str, Any] | str]:
    """The checkpoint's up-to-date ONNX export and its metadata, or ``(None, why not)``.

    Args:
        ckpt: The ``model.pt``.
        sha256: Its :func:`file_hash` when already known.
    """
    onnx_file = export_path(ckpt)
    side = sidecar_path(onnx_file)
    if not onnx_file.is_file() or not side.is_file():
        return None, f"no export at {onnx_file} (make one: liverlesion export --model {ckpt} --format onnx)"
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        return None, f"{side}: unreadable ({e})"
    if not isinstance(info, dict) or info.get("format") != "onnx":
        return None, f"{side}: not an ONNX export's metadata"
    if int(info.get("export_version") or 1) < MIN_EXPORT_VERSION:
        return None, f"{onnx_file}: made by an older liverlesion export; export again"
    sha256 = sha256 or file_hash(ckpt)
    if info.get("checkpoint_sha256_12") != sha256:
        return None, f"{onnx_file}: exported from another version of {Path(ckpt).name}; export again"
    return onnx_file, info


def checkpoint_view(info: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint fields ``predict.Classifier`` reads, from an export's metadata."""
    return {
        "config": info["config"],
        "class_names": list(info["class_names"]),
        "in_chans": int(info["in_chans"]),
        "pool": info.get("pool") or "global",  # exports from before the setting pool globally
        "positive_class": info.get("positive_class"),
        "temperature": info.get("temperature"),
        "threshold": info.get("threshold"),
        "liverlesion_version": info.get("checkpoint_liverlesion_version"),
        "fold": info.get("fold"),
        "created": info.get("created"),
        "training_domain": info.get("training_domain"),
    }


class OnnxNet:
    """An exported graph called like a network by :func:`liverlesion.inference.lesion_logits`.

    Takes ``[0, 1]`` patches ``(B, C, H, W)`` (and fusion features ``(B, F)``) as numpy arrays and
    returns the mean logits over the graph's test-time views, ``(B, K)`` float64.
    """

    takes_numpy = True

    def __init__(self, path: str | Path, info: dict[str, Any], threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about unused initialisers are not the user's business
        # Basic graph optimisations: a session starts in a third of the time of ORT_ENABLE_ALL (0.3 vs
        # 1.2 s for inception_v3), which matters for a one-lesion CLI run; inference is as fast within noise.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.tta = str(info.get("tta", "none"))
        self.fusion_features: list[str] = list(info.get("fusion_features") or [])
        self.threads = int(threads)

    def __call__(self, x: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        feeds = {"image": np.ascontiguousarray(x, dtype=np.float32)}
        if self.fusion_features:
            feeds["features"] = np.ascontiguousarray(extra, dtype=np.float32)
        return np.asarray(self.session.run(["logits"], feeds)[0], dtype=np.float64)

    def __repr__(self) -> str:
        return f"OnnxNet({str(self.path)!r}, tta={self.tta!r}, threads={self.threads})"
