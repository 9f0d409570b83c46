"""ONNX / TorchScript export: outputs match PyTorch, metadata travels with the model."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from liverlesion import DISCLAIMER
from liverlesion.checkpoint import checkpoint_hash, save_checkpoint
from liverlesion.config import Config, ModelConfig
from liverlesion.errors import UserError
from liverlesion.export import export_model
from liverlesion.model import build_model

torch.set_num_threads(1)

CLASSES = ["benign", "cyst", "metastasis"]


def _checkpoint(tmp_path, backbone, size, in_chans, temperature=None, patch=None):
    """Save a random-init checkpoint; temperature None: scaled so probabilities are not saturated."""
    torch.manual_seed(0)
    cfg = Config()
    # image-only input (global pooling); the lesion-mask channel's export: test_model_pool.py
    cfg.model = ModelConfig(backbone=backbone, weights="none", pool="global")
    cfg.patch.size_px = size
    model, _ = build_model(cfg.model, num_classes=len(CLASSES), in_chans=in_chans)
    model.apply_backbone_patch(patch)
    model.eval()
    if temperature is None:
        with torch.no_grad():
            logits = model(torch.rand(4, in_chans, size, size))
        temperature = float((logits - logits.mean(dim=1, keepdim=True)).abs().max()) + 1e-3
    path = save_checkpoint(
        tmp_path / "model.pt", model, cfg, CLASSES, in_chans, temperature=temperature, threshold=0.3
    )
    return path, model, temperature


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    path, model, _ = _checkpoint(tmp_path_factory.mktemp("r18"), "resnet18", 64, 2, temperature=2.5)
    return path, model


def _expected(model, x: torch.Tensor, temperature: float) -> np.ndarray:
    """What liverlesion.inference computes: logits averaged over the flip TTA views, then T."""
    from liverlesion.inference import apply_temperature, lesion_logits

    logits = lesion_logits(model, [a[None] for a in x.numpy()], tta="flips")
    return apply_temperature(logits, temperature).astype(np.float32)


def _onnx_run(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    return sess.run(["probabilities"], {"image": x.numpy()})[0]


def test_onnx_matches_pytorch(resnet, tmp_path) -> None:
    import onnx

    ckpt, model = resnet
    out = export_model(ckpt, "onnx", tmp_path / "exp" / "model.onnx")
    assert out == tmp_path / "exp" / "model.onnx"
    x = torch.rand(3, 2, 64, 64)  # batch 3 although exported with batch 1: dynamic axis
    got = _onnx_run(out, x)
    assert got.shape == (3, 3)
    assert np.abs(got - _expected(model, x, 2.5)).max() <= 1e-4
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["class_names"]) == CLASSES
    assert props["disclaimer"] == DISCLAIMER
    assert json.loads(props["patch"])["size_px"] == 64
    assert json.loads(props["temperature"]) == pytest.approx(2.5)
    side = json.loads((tmp_path / "exp" / "model.onnx.json").read_text())
    assert side["class_names"] == CLASSES and side["input"]["shape"] == ["N", 2, 64, 64]
    assert side["checkpoint_sha256_12"] == checkpoint_hash(ckpt) and side["threshold"] == pytest.approx(0.3)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_torchscript_matches_pytorch(resnet, tmp_path) -> None:
    ckpt, model = resnet
    out = export_model(ckpt, "torchscript", tmp_path / "model.ts.pt")
    extra = {"liverlesion.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notice
        loaded = torch.jit.load(str(out), _extra_files=extra)
    x = torch.rand(2, 2, 64, 64)
    with torch.no_grad():
        got = loaded(x).numpy()
    assert np.abs(got - _expected(model, x, 2.5)).max() <= 1e-4
    meta = json.loads(extra["liverlesion.json"])
    assert meta["class_names"] == CLASSES and meta["disclaimer"] == DISCLAIMER
    assert (tmp_path / "model.ts.pt.json").is_file()
    # the export given back where a checkpoint goes: named for what it is, not "corrupt, copy it again"
    from liverlesion.predict import Classifier

    with pytest.raises(UserError) as e:
        Classifier.load(out)
    msg = str(e.value)
    assert (
        "a TorchScript export (`liverlesion export --format torchscript`" in msg
        and "copy it again" not in msg
    )
    assert "not the model.pt written by train or cv" in msg and "\n" not in msg


def test_inception_with_tf_pooling_onnx(tmp_path) -> None:
    from liverlesion.tf_inception import TF_POOLING_PATCH

    ckpt, model, temp = _checkpoint(tmp_path, "inception_v3", 80, 3, patch=TF_POOLING_PATCH)
    out = export_model(ckpt, "onnx", tmp_path / "incep.onnx")
    x = torch.rand(2, 3, 80, 80)
    expected = _expected(model, x, temp)
    assert expected.max() < 0.999  # not saturated, so the comparison means something
    assert np.abs(_onnx_run(out, x) - expected).max() <= 1e-4
    # the exported graph keeps the TF pooling: the stock network gives other probabilities
    stock = copy.deepcopy(model)
    for name, block in stock.backbone.named_children():
        if name.startswith("Mixed") and hasattr(block, "tf_pool"):
            block.__class__ = block.__class__.__bases__[1]
    assert np.abs(_expected(stock, x, temp) - expected).max() > 1e-3


def test_unknown_format(resnet, tmp_path) -> None:
    ckpt, _ = resnet
    with pytest.raises(UserError, match=r"--format 'tflite' is unknown; choose one of: onnx, torchscript"):
        export_model(ckpt, "tflite", tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_out_is_a_folder(resnet, tmp_path) -> None:
    ckpt, _ = resnet
    with pytest.raises(UserError, match="is a folder"):
        export_model(ckpt, "onnx", tmp_path)


@pytest.mark.parametrize(
    "fmt, name, hint",
    [
        ("onnx", "manifest.csv", "manifest.onnx"),
        ("onnx", "model", "model.onnx"),
        ("torchscript", "m.onnx", "m.pt"),
    ],
)
def test_out_with_the_wrong_suffix_is_refused_and_left_alone(resnet, tmp_path, fmt, name, hint) -> None:
    # -o manifest.csv used to replace the user's manifest with an ONNX graph
    ckpt, _ = resnet
    out = tmp_path / name
    out.write_text("patient_id,image\n")
    with pytest.raises(UserError, match=rf"{name}: .* export is written to a \.(onnx|pt) file; .*{hint}"):
        export_model(ckpt, fmt, out)
    assert out.read_text() == "patient_id,image\n" and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_out_that_is_the_checkpoint_is_refused_and_left_alone(resnet, tmp_path) -> None:
    # -o model.pt with --format torchscript used to replace the checkpoint with its TorchScript export
    import shutil

    ckpt, _ = resnet
    shutil.copy(ckpt, tmp_path / "model.pt")
    before = (tmp_path / "model.pt").read_bytes()
    with pytest.raises(UserError, match=r"model\.pt: is the checkpoint being exported .*/model\.ts\.pt"):
        export_model(tmp_path / "model.pt", "torchscript", tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(UserError, match="file not found"):
        export_model(tmp_path / "nope.pt", "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export(resnet, tmp_path, capsys) -> None:
    from liverlesion.cli import main

    ckpt, _ = resnet
    out = tmp_path / "cli.onnx"
    assert main(["export", "--model", str(ckpt), "--format", "onnx", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["export", "--model", str(ckpt), "--format", "keras", str(out)]) == 2
    assert "--format 'keras' is unknown" in capsys.readouterr().err


def test_fusion_export_metadata_names_the_features_input(tmp_path) -> None:
    """A fusion model's graph takes a second input, ``features``: the metadata describes it (name, shape,
    order), not only the image, so a consumer of the .onnx / .json knows what to feed."""
    import onnx
    import onnxruntime as ort

    from helpers import make_tiny_checkpoint, torch_threads

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)), np.array([0, 1] * 10)
    with torch_threads(1):
        ckpt = make_tiny_checkpoint(tmp_path / "model.pt", 0, fusion=(x, y))
        out = export_model(ckpt, "onnx", tmp_path / "model.onnx")
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    graph_inputs = [
        i.name for i in ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()
    ]
    assert graph_inputs == ["image", "features"]
    assert side["features_input"]["name"] == "features"
    assert side["features_input"]["shape"] == ["N", 4]
    assert side["fusion_features"] == ["f0", "f1", "f2", "f3"]
    assert "fusion_features" in side["features_input"]["meaning"]
    proto = onnx.load(str(out))
    assert "'features'" in proto.doc_string
    assert json.loads({p.key: p.value for p in proto.metadata_props}["features_input"])["shape"] == ["N", 4]


def test_image_only_export_has_no_features_input(resnet, tmp_path) -> None:
    ckpt, _ = resnet
    export_model(ckpt, "onnx", tmp_path / "model.onnx")
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    assert "features_input" not in side and side["fusion_features"] == []


def test_cli_export_of_a_fusion_model_names_both_inputs(tmp_path, capsys) -> None:
    """The line export prints says what the graph takes: a fusion model (the default) also takes its
    radiomics-style features, not only the patches; and it carries the disclaimer."""
    from helpers import make_tiny_checkpoint, torch_threads
    from liverlesion.cli import main

    rng = np.random.default_rng(0)
    with torch_threads(1):
        ckpt = make_tiny_checkpoint(
            tmp_path / "model.pt", 0, fusion=(rng.normal(size=(20, 4)), np.array([0, 1] * 10))
        )
        assert main(["export", "--model", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "[0, 1] patches and 4 radiomics-style features" in out
    assert DISCLAIMER in out
