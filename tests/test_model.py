"""Model contract (shapes over backbones, the paper's head, Grad-CAM layers) and checkpoints."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from liverlesion.checkpoint import CHECKPOINT_VERSION, checkpoint_hash, save_checkpoint
from liverlesion.config import Config, ModelConfig
from liverlesion.errors import UserError
from liverlesion.model import LesionNet, build_model, load_checkpoint

torch.set_num_threads(1)


def _none(backbone: str, **kw) -> ModelConfig:
    # the image-only network (global pooling, the paper's); model.pool=lesion: test_model_pool.py
    return ModelConfig(backbone=backbone, weights="none", **{"pool": "global", **kw})


@pytest.fixture(scope="module")
def inception() -> LesionNet:
    model, how = build_model(_none("inception_v3", features_from="last"), num_classes=2, in_chans=3)
    assert how == "random init"
    return model.eval()


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory):
    """A saved resnet18 checkpoint (1 channel, 3 classes) and the model it came from."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = _none("resnet18")
    cfg.patch.size_px = 48
    model, _ = build_model(cfg.model, num_classes=3, in_chans=1)
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "fold_0" / "model.pt"
    save_checkpoint(
        path,
        model,
        cfg,
        ["benign", "cyst", "metastasis"],
        in_chans=1,
        temperature=1.7,
        threshold=0.42,
        fold=0,
        n_train=12,
    )
    return path, model, cfg


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [80, 299])
def test_inception_v3_shapes(inception: LesionNet, size: int) -> None:
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert inception.features(x).shape == (2, 2048)
        assert inception(x).shape == (2, 2)


@pytest.mark.parametrize(
    "backbone,in_chans,size,n_features",
    [
        ("resnet18", 1, 64, 512),
        ("resnet18", 3, 64, 512),
        ("efficientnet_b0", 3, 64, 1280),
        ("efficientnet_b0", 1, 64, 1280),
    ],
)
def test_other_backbones_shapes(backbone: str, in_chans: int, size: int, n_features: int) -> None:
    model, _ = build_model(_none(backbone, features_from="last"), num_classes=3, in_chans=in_chans)
    model.eval()
    x = torch.rand(2, in_chans, size, size)
    with torch.no_grad():
        assert model.features(x).shape == (2, n_features)
        assert model(x).shape == (2, 3)
    assert model.input_mean.shape == (1, in_chans, 1, 1)


@pytest.mark.parametrize(
    "backbone,size,stage,n_features",
    [
        ("inception_v3", 160, "Mixed_6e", 768),
        ("resnet18", 64, "layer3", 256),
        ("inception_v3", 96, "Mixed_5d", 288),
    ],
)
def test_features_from_an_inner_stage(backbone: str, size: int, stage: str, n_features: int) -> None:
    """``mid`` / a stage name: the head reads that block's pooled map; blocks above it are frozen."""
    torch.manual_seed(0)
    which = "mid" if stage in ("Mixed_6e", "layer3") else stage
    model, _ = build_model(_none(backbone, features_from=which), num_classes=2, in_chans=3)
    model.eval()
    assert model.num_features == n_features and model.head[0].in_features == n_features
    names = [n for n, _ in model.blocks()]
    assert names[-1] == stage
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        h = (x - model.input_mean) / model.input_std
        for n, m in model.backbone.named_children():
            h = m(h)
            if n == stage:
                break
        assert torch.allclose(model.feature_map(x), h, atol=1e-6)
        assert model.features(x).shape == (2, n_features)
        assert model(x).shape == (2, 2)
    above = dict(model.backbone.named_children())
    frozen = [n for n in above if n not in names and any(True for _ in above[n].parameters())]
    assert frozen and all(not p.requires_grad for n in frozen for p in above[n].parameters())
    # nothing above the cut takes part in a forward pass: no gradient reaches it
    model.train()
    model(x).sum().backward()
    assert all(p.grad is None for n in frozen for p in above[n].parameters())


def test_features_from_bad_stage_names_the_choices() -> None:
    with pytest.raises(UserError, match=r"features_from=Mixed_9z: not a stage.*Mixed_6e"):
        build_model(_none("inception_v3", features_from="Mixed_9z"), num_classes=2, in_chans=3)


def test_features_from_round_trips_and_old_checkpoints_read_last(tmp_path) -> None:
    cfg = Config()
    cfg.model = _none("resnet18", features_from="mid")
    model, _ = build_model(cfg.model, num_classes=2, in_chans=1)
    path = save_checkpoint(tmp_path / "model.pt", model.eval(), cfg, ["cyst", "metastasis"], in_chans=1)
    back, meta = load_checkpoint(path)
    assert meta["features_from"] == "layer3" and back.num_features == 256
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():  # atol 1e-5: kernels may sum in another order under load
        assert torch.allclose(back(x), model(x), atol=1e-5)
    # a checkpoint written before the setting existed holds the last stage's head
    cfg.model = _none("resnet18", features_from="last")
    old_model, _ = build_model(cfg.model, num_classes=2, in_chans=1)
    obj = torch.load(save_checkpoint(tmp_path / "old.pt", old_model, cfg, ["a", "b"], 1), weights_only=False)
    del obj["features_from"], obj["config"]["model"]["features_from"]
    torch.save(obj, tmp_path / "old.pt")
    old, meta = load_checkpoint(tmp_path / "old.pt")
    assert old.features_from == "last" and old.num_features == 512


def test_head_is_the_papers(inception: LesionNet) -> None:
    kinds = [type(m) for m in inception.head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Linear]
    fc1, _, drop, fc2, _, out = inception.head
    assert (fc1.in_features, fc1.out_features) == (2048, 512)
    assert drop.p == pytest.approx(0.4)
    assert (fc2.in_features, fc2.out_features) == (512, 512)
    assert (out.in_features, out.out_features) == (512, 2)


def test_head_follows_config() -> None:
    model, _ = build_model(_none("resnet18", head_hidden=64, dropout=0.1), num_classes=4, in_chans=3)
    assert model.head[0].out_features == 64 and model.head[2].p == pytest.approx(0.1)
    assert model.head[-1].out_features == 4


def test_inception_normalises_to_minus_one_one(inception: LesionNet) -> None:
    # [0, 1] input -> [-1, 1] inside the module, like Google's TF Inception
    assert torch.allclose(inception.input_mean.flatten(), torch.full((3,), 0.5))
    assert torch.allclose(inception.input_std.flatten(), torch.full((3,), 0.5))
    seen = []
    h = inception.backbone.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        inception(torch.stack([torch.zeros(3, 80, 80), torch.ones(3, 80, 80)]))
    h.remove()
    assert seen[0][0].max().item() == pytest.approx(-1.0) and seen[0][1].min().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "backbone,features_from,expected",
    [("resnet18", "last", "layer4"), ("resnet18", "mid", "layer3"), ("efficientnet_b0", "mid", "bn2")],
)
def test_cam_layers_are_4d(backbone: str, features_from: str, expected: str) -> None:
    model, _ = build_model(_none(backbone, features_from=features_from), num_classes=2, in_chans=3)
    model.eval()
    (layer,) = model.cam_target_layers()
    assert layer is model.backbone.get_submodule(expected)
    acts = []
    h = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    h.remove()
    assert acts and acts[0].ndim == 4


def test_inception_cam_layer_has_a_map_of_at_least_5x5(inception: LesionNet) -> None:
    """At 160 px Mixed_7c is 3x3, so Grad-CAM explains Mixed_6e (8x8); at 80 px nothing qualifies."""
    (layer,) = inception.cam_target_layers((160, 160))
    assert layer is inception.backbone.Mixed_6e
    assert inception.cam_target_layers((299, 299))[0] is inception.backbone.Mixed_7c
    shapes = []
    (small,) = inception.cam_target_layers((80, 80))
    h = small.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        inception(torch.rand(1, 3, 80, 80))
    h.remove()
    assert min(shapes[0][2:]) >= 5


def test_inception_cam_layer_is_mixed_7c(inception: LesionNet) -> None:
    (layer,) = inception.cam_target_layers((299, 299))
    assert layer is inception.backbone.Mixed_7c
    acts = []
    h = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.no_grad():
        inception(torch.rand(1, 3, 80, 80))
    h.remove()
    assert acts[0].ndim == 4 and acts[0].shape[1] == 2048


def test_cam_fallback_finds_last_4d_child() -> None:
    model, _ = build_model(_none("resnet18", features_from="last"), num_classes=2, in_chans=3)
    model.backbone.feature_info = []  # force the generic search
    (layer,) = model.cam_target_layers()
    assert layer is model.backbone.layer4


# --------------------------------------------------------------------------- build errors


def test_unknown_backbone_suggests_names() -> None:
    with pytest.raises(UserError, match=r"'inceptionv3' is not a timm model.*inception_v3.*list_models"):
        build_model(_none("inceptionv3"), num_classes=2)


def test_unknown_pretrained_tag() -> None:
    with pytest.raises(UserError, match=r"no pretrained tag 'nope'.*inception_v3.tf_in1k"):
        build_model(_none("inception_v3.nope"), num_classes=2)


def test_bad_build_arguments() -> None:
    with pytest.raises(UserError, match="at least 2"):
        build_model(_none("resnet18"), num_classes=1)
    with pytest.raises(UserError, match="model.dropout=1.5"):
        build_model(_none("resnet18", dropout=1.5), num_classes=2)


def test_weights_path_missing(tmp_path) -> None:
    with pytest.raises(UserError, match=r"--weights .*nope.pth: file not found"):
        build_model(_none("resnet18"), num_classes=2, weights=str(tmp_path / "nope.pth"))


# --------------------------------------------------------------------------- init from files


def test_init_from_plain_state_dict_with_prefix_and_classifier(tmp_path) -> None:
    import timm

    torch.manual_seed(1)
    src = timm.create_model("resnet18", pretrained=False, num_classes=10)
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}  # DataParallel-style prefix + fc
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    model, how = build_model(_none("resnet18"), num_classes=2, in_chans=1, weights=str(path))
    assert how == f"checkpoint {path}"
    # first conv adapted to 1 channel the way timm does it (sum over RGB)
    assert torch.allclose(model.backbone.conv1.weight, src.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_init_from_compiled_lightning_state_dict(tmp_path) -> None:
    import timm

    torch.manual_seed(2)
    src = timm.create_model("resnet18", pretrained=False, num_classes=0)
    # torch.compile (timm.clean_state_dict strips it) around a Lightning-style "model." wrapper (ours)
    sd = {f"_orig_mod.model.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "compiled.pth"
    torch.save(sd, path)
    model, _ = build_model(_none("resnet18"), num_classes=2, weights=str(path))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_init_from_state_dict_of_other_backbone(tmp_path) -> None:
    import timm

    path = tmp_path / "eff.pth"
    torch.save(timm.create_model("efficientnet_b0", pretrained=False).state_dict(), path)
    with pytest.raises(UserError, match=r"does not fit backbone resnet18.*missing"):
        build_model(_none("resnet18"), num_classes=2, weights=str(path))


def test_init_from_liverlesion_checkpoint(resnet_ckpt) -> None:
    path, src, _ = resnet_ckpt
    model, how = build_model(_none("resnet18"), num_classes=2, in_chans=1, weights=str(path))
    assert how.startswith(f"checkpoint {path}")
    assert torch.equal(model.backbone.conv1.weight, src.backbone.conv1.weight)
    assert model.head[-1].out_features == 2  # the head is new


def test_init_from_checkpoint_of_other_backbone(resnet_ckpt) -> None:
    path, _, _ = resnet_ckpt
    with pytest.raises(UserError, match="checkpoint backbone is resnet18"):
        build_model(_none("efficientnet_b0"), num_classes=2, weights=str(path))


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_exact(resnet_ckpt) -> None:
    path, model, cfg = resnet_ckpt
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["format"] == "liverlesion.checkpoint" and meta["format_version"] == CHECKPOINT_VERSION
    assert meta["class_names"] == ["benign", "cyst", "metastasis"]
    assert meta["in_chans"] == 1 and meta["fold"] == 0 and meta["n_train"] == 12
    assert meta["temperature"] == pytest.approx(1.7) and meta["threshold"] == pytest.approx(0.42)
    assert meta["positive_class"] == "metastasis"
    assert meta["config"]["patch"]["size_px"] == 48 and meta["config"]["model"]["backbone"] == "resnet18"
    assert {"python", "torch", "timm", "lightning", "SimpleITK", "liverlesion"} <= set(meta["versions"])
    assert "state_dict" not in meta and meta["created"]


def test_checkpoint_is_weights_only_loadable(resnet_ckpt) -> None:
    path, _, _ = resnet_ckpt
    obj = torch.load(path, weights_only=True)  # plain types only
    assert obj["in_chans"] == 1


def test_checkpoint_round_trip_keeps_tf_pooling_patch(tmp_path, inception: LesionNet) -> None:
    from liverlesion.tf_inception import TF_POOLING_PATCH, TFInceptionEMaxPool

    model = copy.deepcopy(inception)
    model.apply_backbone_patch(TF_POOLING_PATCH)
    model.eval()
    path = save_checkpoint(tmp_path / "m.pt", model, Config(), ["cyst", "metastasis"], in_chans=3)
    loaded, meta = load_checkpoint(path)
    assert meta["backbone_patch"] == TF_POOLING_PATCH
    assert isinstance(loaded.backbone.Mixed_7c, TFInceptionEMaxPool)
    x = torch.rand(1, 3, 80, 80)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        # and the patch matters: the unpatched network gives other outputs
        assert not torch.allclose(inception(x), model(x))


def test_checkpoint_hash(resnet_ckpt, tmp_path) -> None:
    path, _, _ = resnet_ckpt
    h = checkpoint_hash(path)
    assert len(h) == 12 and int(h, 16) >= 0
    other = tmp_path / "copy.pt"
    other.write_bytes(path.read_bytes() + b"x")
    assert checkpoint_hash(other) != h


def test_save_is_atomic_on_error(tmp_path, resnet_ckpt) -> None:
    _, model, cfg = resnet_ckpt
    dest = tmp_path / "model.pt"
    with pytest.raises(TypeError, match="cannot be stored safely"):
        save_checkpoint(dest, model, cfg, ["a", "b", "c"], in_chans=1, bad=object())
    assert list(tmp_path.iterdir()) == []


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(UserError, match=r"checkpoint .*nope.pt: file not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="is a folder"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("patient,label\n", r"a text file \(e\.g\. a CSV, YAML or JSON file\), not the model\.pt"),
        ("hello", r"a text file .*, not the model\.pt"),
        ("", r"model\.pt: the file is empty \(0 bytes"),
    ],
)
def test_load_not_a_torch_file(tmp_path, text: str, says: str) -> None:
    p = tmp_path / "model.pt"
    p.write_text(text)
    with pytest.raises(UserError, match=says):
        load_checkpoint(p)


def test_load_onnx_export_says_to_give_its_model_pt(tmp_path) -> None:
    """An ONNX file in the checkpoint slot was "not a PyTorch file or corrupt ...; copy it again"."""
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x08\x07\x12\x07pytorch")  # the start of an ONNX protobuf
    with pytest.raises(UserError, match=r"model.onnx: an ONNX export, not a PyTorch file; give the model.pt"):
        load_checkpoint(p)


def test_load_truncated(resnet_ckpt, tmp_path) -> None:
    path, _, _ = resnet_ckpt
    p = tmp_path / "model.pt"
    p.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(p)


def test_load_old_style_pickle(tmp_path) -> None:
    p = tmp_path / "model.pt"
    with p.open("wb") as f:
        pickle.dump({"a": 1}, f)  # legacy non-zip pickle of something else
    # torch's pickle-protocol UserWarning printed two more lines on stderr above the one-line error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="checkpoint"):
            load_checkpoint(p)
    assert not caught, [str(w.message) for w in caught]


def test_load_plain_state_dict(tmp_path) -> None:
    p = tmp_path / "weights.pth"
    torch.save(nn.Linear(2, 2).state_dict(), p)
    with pytest.raises(UserError, match="plain state_dict.*--weights PATH"):
        load_checkpoint(p)


def test_load_lightning_checkpoint(tmp_path) -> None:
    p = tmp_path / "last.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.6", "epoch": 1, "global_step": 5, "state_dict": {}}, p)
    with pytest.raises(UserError, match="Lightning training checkpoint.*model.pt"):
        load_checkpoint(p)


class _Opaque:  # stands in for an arbitrary pickled Python object
    pass


def test_load_refuses_arbitrary_objects(tmp_path) -> None:
    p = tmp_path / "last.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.6", "hyper_parameters": _Opaque()}, p)
    with pytest.raises(UserError, match="Lightning.*will not unpickle"):
        load_checkpoint(p)


def _rewrite(path, tmp_path, **changes):
    obj = torch.load(path, weights_only=True)
    obj.update(changes)
    out = tmp_path / "edited.pt"
    torch.save(obj, out)
    return out


def test_load_newer_format(resnet_ckpt, tmp_path) -> None:
    path, _, _ = resnet_ckpt
    p = _rewrite(path, tmp_path, format_version=CHECKPOINT_VERSION + 1, liverlesion_version="9.0.0")
    with pytest.raises(UserError, match=r"made by liverlesion 9.0.0 is newer.*upgrade"):
        load_checkpoint(p)


def test_load_older_unsupported_format(resnet_ckpt, tmp_path) -> None:
    path, _, _ = resnet_ckpt
    p = _rewrite(path, tmp_path, format_version=0, liverlesion_version="0.0.1")
    with pytest.raises(UserError, match="no longer supported"):
        load_checkpoint(p)


def test_load_state_dict_mismatch(resnet_ckpt, tmp_path) -> None:
    path, model, _ = resnet_ckpt
    sd = dict(torch.load(path, weights_only=True)["state_dict"])
    sd.pop("head.5.weight")
    sd["extra.weight"] = torch.zeros(1)
    p = _rewrite(path, tmp_path, state_dict=sd)
    with pytest.raises(UserError, match=r"1 missing keys \(e.g. head.5.weight\); 1 unexpected keys"):
        load_checkpoint(p)


def test_load_config_for_other_classes(resnet_ckpt, tmp_path) -> None:
    path, _, _ = resnet_ckpt
    p = _rewrite(path, tmp_path, class_names=["a", "b"], positive_class=None)  # head has 3 outputs
    with pytest.raises(UserError, match="do not match the stored config"):
        load_checkpoint(p)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"config": "hello"}, "config is a str"),  # was a ValueError traceback from config_from_dict
        ({"state_dict": [1, 2]}, "state_dict is a list"),  # was an AttributeError traceback
        ({"class_names": "cyst"}, "class_names='cyst'"),  # was a head-size mismatch, blaming the weights
        ({"in_chans": "1"}, "in_chans='1'"),
        # the decision values were silently replaced (temperature 1, argmax) or used (nothing >= 2)
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"threshold": 2.0}, "threshold=2.0"),
        ({"positive_class": "zebra"}, "positive_class='zebra'"),
    ],
)
def test_load_refuses_fields_of_the_wrong_kind(resnet_ckpt, tmp_path, changes, expected) -> None:
    path, _, _ = resnet_ckpt
    p = _rewrite(path, tmp_path, **changes)
    with pytest.raises(UserError, match=r"checkpoint .*edited.pt: ") as e:
        load_checkpoint(p)
    assert expected in str(e.value) and "use the original model.pt" in str(e.value)


def test_load_refuses_nan_weights(resnet_ckpt, tmp_path) -> None:
    """A diverged run's NaN weights gave every lesion NaN probabilities and, silently, the negative class."""
    path, _, _ = resnet_ckpt
    sd = dict(torch.load(path, weights_only=True)["state_dict"])
    sd["head.5.bias"] = torch.full_like(sd["head.5.bias"], float("nan"))
    with pytest.raises(
        UserError, match=r"edited.pt: 1 weight tensor\(s\) hold NaN or inf \(e.g. head.5.bias\)"
    ):
        load_checkpoint(_rewrite(path, tmp_path, state_dict=sd))


def test_load_unknown_config_key(resnet_ckpt, tmp_path) -> None:
    path, _, cfg = resnet_ckpt
    conf = cfg.to_dict()
    conf["model"]["future_option"] = 1
    p = _rewrite(path, tmp_path, config=conf)
    with pytest.raises(
        UserError, match=r"checkpoint .*edited.pt: config key 'model.future_option' is unknown"
    ):
        load_checkpoint(p)


def test_fold_batchnorm_gives_the_same_numbers_and_leaves_the_model_alone():
    """The lpft cache pass runs a BatchNorm-folded copy: same outputs, fewer layers, original untouched."""
    import timm
    from timm.layers import BatchNormAct2d

    from liverlesion.model import fold_batchnorm

    torch.manual_seed(0)
    net = timm.create_model("inception_v3", pretrained=False, num_classes=0).eval()
    for m in net.modules():  # statistics as after training, not the identity of a fresh BatchNorm
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    n_bn = sum(isinstance(m, BatchNormAct2d) for m in net.modules())
    assert n_bn > 50 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        ref, out = net(x), folded(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
