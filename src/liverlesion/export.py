"""Export a checkpoint to ONNX or TorchScript for deployment outside liverlesion.

The exported graph takes a float32 tensor ``image`` of shape ``(N, in_chans, size, size)`` with
values windowed to ``[0, 1]`` (exactly what ``patches.py`` writes; the backbone's mean / std
normalisation is inside the graph); a model that pools inside the lesion (``pool: lesion`` in the
metadata) takes ``in_chans + 1`` channels, the last one the patch's lesion mask (1 inside, 0
outside; :func:`liverlesion.model_input.model_input` builds it) and returns ``probabilities`` of shape ``(N, classes)``:
``softmax(logits / temperature)`` with the checkpoint's calibration temperature, classes in the
order of ``class_names``. The batch size is dynamic; the patch size is fixed to the checkpoint's
``patch.size_px``. Metadata (class names, patch settings, threshold, disclaimer, provenance) is
written to a sidecar ``<out>.json`` and, for ONNX, also into the model's ``metadata_props``; for
TorchScript into the archive's extra file ``liverlesion.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from liverlesion import DISCLAIMER, __version__
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_path, write_json
from liverlesion.inference import tta_flips
from liverlesion.model import checkpoint_hash, load_checkpoint
from liverlesion.model_input import checkpoint_pool, input_chans, model_input, takes_mask

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
# 2: ONNX graphs also output "logits"; the sidecar holds the full config (onnx_backend reads it).
EXPORT_VERSION = 2


class ProbabilityModel(nn.Module):
    """Wraps a LesionNet so it outputs calibrated class probabilities, as ``inference`` computes them.

    The logits are averaged over the checkpoint's test-time views (``model.tta``) inside the graph,
    then divided by the temperature. A fusion model takes a second input, ``features`` ``(N, F)``:
    the radiomics-style features named in the metadata (``fusion_features``; NaN = missing).
    """

    def __init__(
        self, model: nn.Module, temperature: float = 1.0, tta: str = "none", with_logits: bool = False
    ):
        super().__init__()
        self.model = model
        self.flips = tta_flips(tta)
        self.with_logits = with_logits
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, image: Tensor, features: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``softmax(mean_views(logits) / temperature)`` for ``[0, 1]`` patches ``(N, C, H, W)``.

        With ``with_logits`` also the view-mean logits, before the temperature: ``predict``'s
        onnxruntime backend averages them over a lesion's slice samples first, as
        :func:`liverlesion.inference.lesion_logits` does, then applies the temperature itself.
        """
        views = [image if not d else torch.flip(image, dims=d) for d in self.flips]
        logits = sum(self.model(v, features) for v in views) / len(views)
        probs = torch.softmax(logits / self.temperature, dim=1)
        return (probs, logits) if self.with_logits else probs


def export_metadata(
    meta: dict[str, Any], ckpt_path: Path, fmt: str, size: int, in_chans: int
) -> dict[str, Any]:
    """The metadata written next to (and into) an exported model."""
    cfg = meta.get("config", {})
    pool = checkpoint_pool(meta)
    rng = "[0, 1]: HU windowed with patch.window_center / window_width (see patch)"
    if takes_mask(pool):
        rng += f"; channel {in_chans} (the last): the lesion mask, 1 inside and 0 outside"
    return {
        "disclaimer": DISCLAIMER,
        "format": fmt,
        "input": {
            "name": "image",
            "shape": ["N", input_chans(in_chans, pool), size, size],
            "dtype": "float32",
            "range": rng,
        },
        "output": {
            "name": "probabilities",
            "shape": ["N", len(meta["class_names"])],
            "meaning": "softmax(logits / temperature), columns in class_names order",
        },
        "class_names": list(meta["class_names"]),
        "temperature": float(meta.get("temperature", 1.0)),
        "threshold": meta.get("threshold"),
        "positive_class": meta.get("positive_class"),
        "patch": cfg.get("patch", {}),
        "backbone": cfg.get("model", {}).get("backbone"),
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256_12": checkpoint_hash(ckpt_path),
        "checkpoint_liverlesion_version": meta.get("liverlesion_version"),
        "exported_by_liverlesion": __version__,
        "torch": torch.__version__,
        # What predict's onnxruntime backend needs to stand in for the checkpoint (see onnx_backend).
        "export_version": EXPORT_VERSION,
        "config": cfg,
        "in_chans": int(in_chans),
        "pool": pool,
        "fold": meta.get("fold"),
        "created": meta.get("created"),
        "training_domain": meta.get("training_domain"),  # predict's domain-shift check on this backend
    }


def export_checkpoints(model: str | Path, format: str, out: str | Path | None = None) -> list[Path]:
    """``liverlesion export``: one checkpoint, or each fold of a ``cv`` run folder, checked first.

    Args:
        model: A ``model.pt``, a folder holding one, or a cv run folder (:func:`liverlesion.runs.model_files`).
        format: ``onnx`` or ``torchscript``.
        out: The output file, for one checkpoint only; default next to each checkpoint
            (``model.onnx``, where ``predict`` finds it, or ``model.ts.pt``).

    Returns:
        The exported files.
    """
    from liverlesion.fileio import check_output_file
    from liverlesion.onnx_backend import export_path
    from liverlesion.runs import model_files

    fmt = str(format).strip().lower()
    if fmt not in FORMATS:
        raise UserError(f"--format {format!r} is unknown; choose one of: {', '.join(FORMATS)}")
    if out is not None:
        check_output_file(out, "--out")
    ckpts = model_files(model)
    if len(ckpts) > 1 and out is not None:
        raise UserError(
            f"--model {model}: a cv run folder of {len(ckpts)} fold models; each export is written next to its "
            "checkpoint (where predict finds it): leave out -o, or give one fold's model.pt"
        )
    dests = [
        Path(out) if out is not None else export_path(c) if fmt == "onnx" else c.with_suffix(".ts.pt")
        for c in ckpts
    ]
    if out is None:
        for dest in dests:
            check_output_file(dest, "--out")
    return [export_model(c, fmt, dest) for c, dest in zip(ckpts, dests, strict=True)]


def export_model(ckpt_path: str | Path, format: str, out: str | Path) -> Path:
    """Export a checkpoint to ONNX (opset 17, dynamic batch) or TorchScript (traced).

    Args:
        ckpt_path: ``model.pt`` written by train / cv.
        format: ``onnx`` or ``torchscript``.
        out: Output file; a sidecar ``<out>.json`` with the metadata is written next to it.

    Returns:
        The path of the exported model.
    """
    fmt = str(format).strip().lower()
    if fmt not in FORMATS:
        raise UserError(f"--format {format!r} is unknown; choose one of: {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(
            f"output {out}: is a folder; give a file name such as {out / ('model.' + _suffix(fmt))}"
        )
    if out.suffix.lower() != "." + _suffix(fmt):  # e.g. -o manifest.csv would replace the manifest
        raise UserError(
            f"output {out}: {'an ONNX' if fmt == 'onnx' else 'a TorchScript'} export is written to a "
            f".{_suffix(fmt)} file; "
            f"give a name such as {out.with_name(out.stem.split('.')[0] + '.' + _suffix(fmt))}"
        )
    if out.exists() and Path(ckpt_path).expanduser().exists() and out.samefile(Path(ckpt_path).expanduser()):
        # a TorchScript export is a .pt file too: -o model.pt used to replace the checkpoint with it
        raise UserError(
            f"output {out}: is the checkpoint being exported (--model); the export would replace it: "
            f"give another name, e.g. {out.with_name(out.name.split('.')[0] + '.ts.pt')}"
        )
    model, meta = load_checkpoint(ckpt_path)
    size = int(meta["config"].get("patch", {}).get("size_px", 0))
    if size < 1:
        raise UserError(
            f"checkpoint {ckpt_path}: config patch.size_px={size} is not a patch size; the file is damaged"
        )
    in_chans = int(meta["in_chans"])
    tta = str(meta["config"].get("model", {}).get("tta", "none"))
    wrapper = ProbabilityModel(
        model, float(meta.get("temperature", 1.0)), tta, with_logits=fmt == "onnx"
    ).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, in_chans, size, size, generator=g).numpy()
    mask = (torch.rand(1, size, size, generator=g) > 0.5).numpy()
    dummy: tuple[Tensor, ...] = (torch.from_numpy(model_input(image, mask, model.pool, in_chans)),)
    if model.fusion_features:
        dummy = (*dummy, torch.zeros(1, len(model.fusion_features)))
    info = export_metadata(meta, Path(ckpt_path), fmt, size, in_chans)
    info["tta"] = tta
    info["fusion_features"] = list(model.fusion_features)
    if model.fusion_features:  # the graph's second input: without it here, the metadata names only the image
        info["features_input"] = {
            "name": "features",
            "shape": ["N", len(model.fusion_features)],
            "dtype": "float32",
            "meaning": "the radiomics-style features named in fusion_features, in that order, as measured "
            "(the model standardises them); NaN = missing",
        }
    with atomic_path(out) as tmp:
        if fmt == "onnx":
            _export_onnx(wrapper, dummy, tmp, info)
        else:
            _export_torchscript(wrapper, dummy, tmp, info)
    write_json(out.with_name(out.name + ".json"), info)
    return out


def _suffix(fmt: str) -> str:
    return "onnx" if fmt == "onnx" else "pt"


def _export_onnx(wrapper: nn.Module, dummy: tuple[Tensor, ...], tmp: Path, info: dict[str, Any]) -> None:
    try:
        import onnx
    except ImportError as e:
        raise UserError("--format onnx needs the onnx package: pip install 'liverlesion[export]'") from e
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes about timm's shape asserts
        # the TorchScript-based exporter handles timm backbones reliably and needs no onnxscript
        torch.onnx.export(
            wrapper,
            dummy,
            str(tmp),
            input_names=["image", "features"][: len(dummy)],
            output_names=["probabilities", "logits"],
            dynamic_axes={
                "image": {0: "batch"},
                "features": {0: "batch"},
                "probabilities": {0: "batch"},
                "logits": {0: "batch"},
            },
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(tmp))
    del proto.metadata_props[:]
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    features = ", 'features' (see fusion_features)" if info.get("features_input") else ""
    proto.doc_string = (
        f"liverlesion export ({info['disclaimer']}); input 'image' [0, 1]{features}; "
        "outputs 'probabilities', 'logits' (before the temperature)"
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))


def _export_torchscript(
    wrapper: nn.Module, dummy: tuple[Tensor, ...], tmp: Path, info: dict[str, Any]
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit deprecation notice and tracer notes
        traced = torch.jit.trace(wrapper, dummy, check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={"liverlesion.json": json.dumps(info, indent=2)})
