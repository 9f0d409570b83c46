"""model.pool=lesion: the feature map averaged inside the lesion mask, carried as one extra input channel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_ct_with_two_lesions, make_tiny_checkpoint, torch_threads
from liverlesion.checkpoint import save_checkpoint
from liverlesion.config import Config, ModelConfig, load_config
from liverlesion.errors import UserError
from liverlesion.inference import lesion_logits, tta_views
from liverlesion.model import LesionNet, area_downsample, build_model, lesion_pool, load_checkpoint
from liverlesion.model_input import model_input


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _net(pool: str = "lesion", backbone: str = "resnet10t", **kw) -> LesionNet:
    torch.manual_seed(0)
    model, _ = build_model(
        ModelConfig(backbone=backbone, weights="none", fusion="none", pool=pool, **kw),
        num_classes=2,
        in_chans=3,
    )
    return model.eval()


def _inputs(n: int, size: int = 48, seed: int = 0, pool: str = "lesion") -> list[np.ndarray]:
    """Random patches with a rectangular lesion each (the first one without any lesion)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.zeros((1, size, size), np.uint8)
        if i:
            mask[0, 5 + i : 25 + i, 8 : 20 + 2 * i] = 1
        out.append(model_input(rng.random((1, 3, size, size), dtype=np.float32), mask, pool))
    return out


# --------------------------------------------------------------------------- the pooling itself


def test_lesion_pool_is_the_mean_over_mask_pixels() -> None:
    f = torch.randn(2, 5, 6, 7)
    mask = torch.zeros(2, 1, 6, 7)
    mask[0, 0, 1:4, 2:6] = 1
    mask[1, 0, 5, 0] = 1
    got = lesion_pool(f, mask)
    for i in range(2):
        inside = mask[i, 0].bool()
        torch.testing.assert_close(got[i], f[i][:, inside].mean(dim=1))
    # a mask at twice the map's resolution, aligned with its cells: each cell's share is its area
    big = mask.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(lesion_pool(f, big), got)


def test_empty_mask_falls_back_to_the_global_mean_per_sample() -> None:
    f = torch.randn(2, 4, 5, 5)
    mask = torch.zeros(2, 1, 20, 20)
    mask[1, 0, :4, :4] = 1
    got = lesion_pool(f, mask)
    torch.testing.assert_close(got[0], f[0].mean(dim=(1, 2)))  # no lesion in view: global
    torch.testing.assert_close(got[1], f[1, :, 0, 0])  # the lesion fills cell (0, 0) only
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(("src", "dst"), [((160, 160), (3, 3)), ((48, 40), (5, 7)), ((8, 8), (8, 8))])
def test_area_downsample_is_adaptive_avg_pool2d(src, dst) -> None:
    m = torch.rand(2, 1, *src)
    torch.testing.assert_close(area_downsample(m, dst), F.adaptive_avg_pool2d(m, dst))


def test_mask_never_reaches_the_backbone_and_weights_the_pooling() -> None:
    model = _net()
    x = torch.from_numpy(np.concatenate(_inputs(3)))
    other = x.clone()
    other[:, -1] = 1.0 - other[:, -1]  # another mask, the same image
    with torch.no_grad():
        fmap = model.feature_map(x)
        torch.testing.assert_close(model.feature_map(other), fmap)  # the mask is not an image channel
        torch.testing.assert_close(model.features(x), lesion_pool(fmap, x[:, -1:]))
        assert not torch.allclose(model.features(x[1:]), model.features(other[1:]))
        # no lesion in view: the global average, as pool=global computes it
        torch.testing.assert_close(model.features(x[:1]), fmap[:1].mean(dim=(2, 3)))
    with pytest.raises(UserError, match="1 lesion-mask channel"):
        model(x[:, :3])


def test_tta_views_carry_their_own_flipped_mask() -> None:
    x = torch.from_numpy(np.concatenate(_inputs(3)))
    for dims, view in zip([(), (3,), (2,), (2, 3)], tta_views(x, "flips"), strict=True):
        mask = x[:, -1] if not dims else torch.flip(x[:, -1], dims=[d - 1 for d in dims])
        torch.testing.assert_close(view[:, -1], mask)
        assert not dims or not torch.equal(view[1:, -1], x[1:, -1])


# --------------------------------------------------------------------------- inputs, config, checkpoints


def test_model_input_appends_the_mask_and_checks_it() -> None:
    image = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    mask = np.zeros((1, 16, 16), np.uint8)
    mask[0, 4:8, 4:8] = 7  # any label value is "inside"
    np.testing.assert_array_equal(model_input(image, mask, "global"), image)  # global: the image alone
    x = model_input(image, mask, "lesion")
    assert x.shape == (1, 4, 16, 16) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, :3], image)
    assert set(np.unique(x[0, 3])) == {0.0, 1.0} and x[0, 3].sum() == 16
    grey = model_input(image[:, :1], mask, "lesion", in_chans=3)  # 2-D mode: grey repeated, then the mask
    assert grey.shape == (1, 4, 16, 16)
    with pytest.raises(UserError, match="needs the patch's lesion mask"):
        model_input(image, None, "lesion")
    with pytest.raises(UserError, match=r"lesion mask of shape \(1, 8, 8\) does not fit"):
        model_input(image, mask[:, :8, :8], "lesion")
    with pytest.raises(UserError, match=r"expected \(S, 5, H, W\)"):
        model_input(image, mask, "lesion", in_chans=5)


def test_config_pool_choices() -> None:
    assert Config().model.pool == "lesion"  # the lesion's features (benchmarks/README.md)
    assert load_config(preset="quick").model.pool == "lesion"
    assert load_config(preset="paper").model.pool == "global"  # the paper's global average pooling
    assert load_config(overrides=["model.pool=LESION"]).model.pool == "lesion"
    with pytest.raises(UserError, match=r"^config model.pool='mean': unknown; choose one of global, lesion$"):
        load_config(overrides=["model.pool=mean"])


def test_checkpoint_stores_pool_and_old_checkpoints_load_as_global(tmp_path) -> None:
    cfg = Config()
    cfg.model = ModelConfig(backbone="resnet10t", weights="none", fusion="none", pool="lesion")
    model = _net()
    path = save_checkpoint(tmp_path / "model.pt", model, cfg, ["cyst", "metastasis"], 3)
    back, meta = load_checkpoint(path)
    assert meta["pool"] == "lesion" and back.pool == "lesion" and back.input_chans == 4
    x = torch.from_numpy(np.concatenate(_inputs(3)))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    # a checkpoint from before the setting (no "pool" anywhere) pools globally
    glob = _net("global")
    cfg.model.pool = "global"
    obj = torch.load(save_checkpoint(tmp_path / "old.pt", glob, cfg, ["a", "b"], 3), weights_only=False)
    del obj["pool"], obj["config"]["model"]["pool"]
    torch.save(obj, tmp_path / "old.pt")
    old, meta = load_checkpoint(tmp_path / "old.pt")
    assert old.pool == "global" and "pool" not in meta and old.input_chans == 3
    with torch.no_grad():
        torch.testing.assert_close(old(x[:, :3]), glob(x[:, :3]))


# --------------------------------------------------------------------------- augmentation


def test_augment_moves_the_mask_channel_but_never_jitters_it() -> None:
    from liverlesion.data import Augment

    x = torch.from_numpy(_inputs(2)[1][0])
    torch.manual_seed(0)
    jitter_only = Augment(False, 0.0, 0.0, 0.3, n_mask=1)
    y = jitter_only(x.clone())
    torch.testing.assert_close(y[-1], x[-1])  # the mask as it was
    assert not torch.allclose(y[:3], x[:3])  # the image jittered
    full = Augment(True, 30.0, 0.2, 0.3, n_mask=1)
    moved = 0
    for _ in range(8):
        y = full(x.clone())
        m = y[-1]
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
        assert float(m.sum()) == pytest.approx(float(x[-1].sum()), rel=0.5)  # moved, not scaled away
        moved += not torch.equal(m, x[-1])
    assert moved  # rotation / flips / zoom move the mask with the image


# --------------------------------------------------------------------------- lpft staged forward


@pytest.mark.parametrize("pool", ["global", "lesion"])
def test_lpft_cache_pools_each_view_with_its_mask_and_staged_equals_full(pool) -> None:
    from liverlesion.lpft import build_cache, deep_logits_from_cache

    model = _net(pool)
    cfg = load_config(overrides={"model": {"pool": pool}, "train": {"aug_views": 2}})
    arrays = _inputs(4, pool=pool)
    cache = build_cache(model, arrays, cfg, n_top=1, progress=False)
    assert cache.lower[0].shape[:2] == (6, 1)  # 4 flip views + 2 augmented ones
    # the staged forward (cached lower activations -> top block -> pooling -> head) is the full forward
    np.testing.assert_allclose(
        deep_logits_from_cache(model, cache, np.arange(4)),
        lesion_logits(model, arrays, tta="flips"),
        atol=1e-5,
    )
    x = torch.from_numpy(arrays[2])
    with torch.no_grad():
        for v, view in enumerate(tta_views(x, "flips")):  # the frozen pooled features of each TTA view
            np.testing.assert_allclose(cache.pooled[2][v], model.features(view).numpy(), atol=1e-5)
        # the frozen_lr baseline reads globally pooled features whatever model.pool is
        np.testing.assert_allclose(cache.frozen[2], model._pool(model.feature_map(x)).numpy(), atol=1e-5)
    if pool == "lesion":
        assert not np.allclose(cache.pooled[2][0], cache.frozen[2])
        np.testing.assert_allclose(cache.pooled[0][0], cache.frozen[0], atol=1e-6)  # no lesion: global


# --------------------------------------------------------------------------- export and predict


def test_onnx_export_of_a_lesion_pooling_model_matches_eager(tmp_path) -> None:
    import onnxruntime as ort

    from liverlesion.export import export_model
    from liverlesion.inference import apply_temperature

    cfg = Config()
    cfg.model = ModelConfig(backbone="resnet18", weights="none", fusion="none", pool="lesion")
    cfg.patch.size_px = 72  # layer3's map is 5x5: 72 is no multiple of it (adaptive pooling would not export)
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, num_classes=2, in_chans=3)
    model.eval()
    ckpt = save_checkpoint(tmp_path / "model.pt", model, cfg, ["cyst", "metastasis"], 3, temperature=3.0)
    out = export_model(ckpt, "onnx", tmp_path / "model.onnx")
    x = np.concatenate(_inputs(3, size=72))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [tuple(i.shape) for i in sess.get_inputs()] == [("batch", 4, 72, 72)]
    got = sess.run(["probabilities"], {"image": x})[0]
    expected = apply_temperature(lesion_logits(model, [a[None] for a in x], tta="flips"), 3.0)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    import json

    meta = json.loads((tmp_path / "model.onnx.json").read_text())
    assert meta["pool"] == "lesion" and meta["input"]["shape"] == ["N", 4, 72, 72]
    assert "lesion mask" in meta["input"]["range"]


def test_classifier_feeds_the_mask_from_the_checkpoint_not_the_config(tmp_path) -> None:
    from liverlesion.patches import extract_patch
    from liverlesion.predict import Classifier

    image, mask = make_ct_with_two_lesions()
    path = make_tiny_checkpoint(tmp_path / "lesion.pt", 0, pool="lesion")
    obj = torch.load(path, weights_only=True)
    obj["config"]["model"]["pool"] = "global"  # the checkpoint's own "pool" is what counts
    torch.save(obj, path)
    clf = Classifier.load(path, backend="torch")
    assert clf.members[0].pool == "lesion"
    df = clf.predict(image, mask=mask, min_size_mm=0, gradcam=True)
    assert len(df) == 2 and df["prob_metastasis"].notna().all()
    lesion = mask.array == 1
    lesion[:, :, 30:] = False
    patch = extract_patch(image, lesion, clf.patch_config)
    net = clf.members[0].model
    with torch.no_grad():
        logits = net(torch.from_numpy(model_input(patch.image, patch.mask, "lesion")))
    expected = torch.softmax(logits, dim=1).mean(0).numpy()
    np.testing.assert_allclose(clf.predict_patch(patch.image, mask=patch.mask), expected, rtol=1e-5)
    with pytest.raises(UserError, match="needs the patch's lesion mask"):
        clf.predict_patch(patch.image)
    cam = clf.gradcam(patch.image, "metastasis", patch.mask)
    assert cam.shape == patch.image.shape[-2:]
    # the onnxruntime backend (predict / serve on the CPU) feeds its graph the same input
    from liverlesion.export import export_model

    export_model(path, "onnx", path.with_suffix(".onnx"))
    onnx = Classifier.load(path, backend="onnx")
    assert onnx.backend == "onnx" and onnx.members[0].pool == "lesion"
    np.testing.assert_allclose(onnx.predict_patch(patch.image, mask=patch.mask), expected, atol=1e-4)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow  # 15-30 s on 2 cores: the slow job (.ci/run-slow)
def test_cv_cli_with_lesion_pooling(tmp_path, capsys) -> None:
    """`liverlesion cv --set model.pool=lesion` end to end (lpft, fusion, evaluation, Grad-CAM gallery)."""
    import json

    from liverlesion.cli import main
    from liverlesion.synth import generate_cohort

    generate_cohort(tmp_path / "cohort", patients=6, lesions=14, seed=5)
    run = tmp_path / "run"
    sets = [
        "model.backbone=resnet10t", "model.weights=none", "model.pool=lesion", "patch.size_px=48",
        "train.epochs=1", "train.probe_epochs=2", "train.aug_views=1", "train.batch_size=8",
        "eval.n_bootstrap=20", "eval.gradcam_max=2",
    ]  # fmt: skip
    args = ["cv", str(tmp_path / "cohort" / "manifest.csv"), "-o", str(run), "--folds", "2", "--no-baselines"]
    assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    ckpt = torch.load(run / "fold_0" / "model.pt", weights_only=True)
    assert ckpt["pool"] == "lesion" and ckpt["in_chans"] == 3
    assert json.loads((run / "metrics.json").read_text())
    assert (run / "report.html").exists()


def test_frozen_floor_is_the_same_features_with_or_without_the_lpft_cache(monkeypatch, tmp_path) -> None:
    """cv's frozen_lr features: from the lpft cache, or (end_to_end, the paper preset) computed as
    ``liverlesion baselines`` does; both are the globally pooled identity view, whatever model.pool is."""
    import pandas as pd

    import liverlesion.data
    import liverlesion.model
    from liverlesion.cv import _frozen_features
    from liverlesion.lpft import build_cache

    cfg = load_config(overrides={"model": {"pool": "lesion"}, "train": {"aug_views": 1}})
    assert cfg.model.weights == "imagenet"
    lesion_in = _inputs(4, pool="lesion")
    image_in = [a[:, :3] for a in lesion_in]
    index = pd.DataFrame({"lesion_id": [f"p{i}-L01" for i in range(4)], "file": [f"f{i}" for i in range(4)]})
    built = []

    def fake_build(mcfg, **kw):  # the same random weights, as the ImageNet ones would be
        built.append(mcfg.pool)
        return _net(mcfg.pool), "test weights"

    monkeypatch.setattr(liverlesion.model, "build_model", fake_build)
    monkeypatch.setattr(liverlesion.data, "load_patch_arrays", lambda d, t, pool="global": image_in)
    cache = build_cache(_net("lesion"), lesion_in, cfg, n_top=1, progress=False)
    from_cache = _frozen_features({"cache": cache}, index, cfg, tmp_path)
    assert not built
    computed = _frozen_features({}, index, cfg, tmp_path)  # no cache: the end_to_end recipe
    assert built == ["global"]
    assert list(computed["lesion_id"]) == list(index["lesion_id"]) == list(from_cache["lesion_id"])
    np.testing.assert_allclose(computed.iloc[:, 1:].to_numpy(), from_cache.iloc[:, 1:].to_numpy(), atol=1e-5)
    # without ImageNet weights there is no floor to show
    cfg.model.weights = "none"
    assert _frozen_features({}, index, cfg, tmp_path) is None
