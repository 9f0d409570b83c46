"""Training: one fold on tiny synthetic patches, checkpoint contents, resume, and (slow) end-to-end CV."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from liverlesion.config import load_config
from liverlesion.cv import prepare_shared
from liverlesion.inference import apply_temperature, lesion_logits
from liverlesion.train import FoldData, fold_subset, train_fold


def _toy(n_patients: int, seed: int, size: int = 48, pool: str = "global"):
    """Bright-blob 'metastasis' vs dark-blob 'cyst' patches, 2 lesions per patient (model inputs for ``pool``)."""
    from liverlesion.model_input import model_input

    rng = np.random.default_rng(seed)
    rows, arrays = [], []
    yy, xx = np.mgrid[:size, :size]
    for p in range(n_patients):
        for j in range(2):
            cls = ["cyst", "metastasis"][(p + j) % 2]
            cy, cx = rng.integers(14, size - 14, 2)
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < 100
            img = 0.5 + rng.normal(0, 0.05, (1, 3, size, size))
            img[..., blob] = 0.9 if cls == "metastasis" else 0.1
            arrays.append(model_input(img.clip(0, 1), blob[None], pool))
            rows.append(
                {
                    "patient_id": f"P{p:02d}",
                    "lesion_id": f"P{p:02d}-L{j + 1:02d}",
                    "lesion_class": cls,
                    "max_axial_diameter_mm": 12.0,
                    "volume_ml": 1.0,
                }
            )
    return pd.DataFrame(rows), arrays


def _cfg(tmp_epochs: int = 3, recipe: str = "end_to_end"):
    return load_config(
        overrides={
            "model": {"backbone": "resnet10t", "weights": "none", "fusion": "none"},
            "patch": {"size_px": 48},
            "train": {
                "epochs": tmp_epochs,
                "batch_size": 8,
                "patience": 10,
                "lr": 3e-3,
                "backbone_lr_mult": 1.0,
                "warmup_epochs": 0,
                "max_threads": 2,
                "recipe": recipe,
                "aug_views": 2,
                "probe_epochs": 5,
            },
        }
    )


def test_train_fold_writes_self_describing_checkpoint_and_learns(tmp_path):
    torch.set_num_threads(2)
    index, arrays = _toy(16, 0)
    classes = ["cyst", "metastasis"]
    patients = sorted(index["patient_id"].unique())
    fit = fold_subset(index, arrays, classes, patients[:10])
    val = fold_subset(index, arrays, classes, patients[10:13])
    test = fold_subset(index, arrays, classes, patients[13:])
    cfg = _cfg(6)
    res = train_fold(tmp_path / "fold_0", fit, val, {"test": test}, classes, cfg, 0, {"run": "test"})

    ckpt = torch.load(tmp_path / "fold_0" / "model.pt", map_location="cpu", weights_only=False)
    assert ckpt["format"] == "liverlesion.checkpoint"
    assert ckpt["class_names"] == classes
    assert ckpt["config"]["patch"]["size_px"] == 48
    assert ckpt["n_train_patients"] == 10 and ckpt["n_val_patients"] == 3
    # a shared model carries no patient id of its training cohort (a manifest's patient_id may be an MRN)
    meta = repr({k: v for k, v in ckpt.items() if k != "state_dict"})
    assert not [p for p in patients if repr(p) in meta]
    assert "torch" in ckpt["versions"]
    assert ckpt["temperature"] > 0

    df = res["test"]
    assert list(df["lesion_id"]) == list(test.index["lesion_id"])
    probs = df[["prob_cyst", "prob_metastasis"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # No patient of the test set was seen in training.
    assert not set(df["patient_id"]) & set(fit.index["patient_id"])
    # The task is trivially separable: a learning loop must beat chance on the training data.
    from liverlesion.model import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "fold_0" / "model.pt")
    p_fit = apply_temperature(lesion_logits(model, fit.arrays, tta="flips"), 1.0)
    assert (p_fit.argmax(1) == fit.labels).mean() >= 0.75
    assert (tmp_path / "fold_0" / "logs" / "csv" / "metrics.csv").exists()
    assert any((tmp_path / "fold_0" / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    # the resume checkpoints (weights + optimiser state) go once the fold's model.pt is written
    assert not (tmp_path / "fold_0" / "checkpoints").exists()


def test_2d_mode_averages_slices_back_to_lesions():
    index, arrays = _toy(4, 1)
    # 3 slice samples per lesion, 1 channel each
    arrays = [np.repeat(a[:, :1], 3, axis=0) for a in arrays]
    data = FoldData(index, arrays, np.zeros(len(arrays), dtype=int), np.arange(len(arrays)))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.zeros(1, 1, 48, 48))
    logits = lesion_logits(lambda x, _e: net(x), data.arrays, tta="none")
    assert logits.shape == (len(arrays), 2)
    with torch.no_grad():
        first = net(torch.from_numpy(arrays[0])).double().mean(0).numpy()
    np.testing.assert_allclose(logits[0], first, atol=1e-6)  # the mean over the lesion's slices
    np.testing.assert_allclose(apply_temperature(logits, 2.0).sum(1), 1.0, atol=1e-6)


@pytest.mark.slow  # a Lightning run of 15-50 s on 2 cores: the slow job (.ci/run-slow)
@pytest.mark.parametrize(("pool", "views"), [("global", 0), ("lesion", 1)])
def test_lpft_staged_forward_matches_full_model_and_learns(tmp_path, pool, views):
    """lpft trains the top block on cached activations; the saved model's full forward gives the same logits.

    ``views``: train.finetune_views (0: every cached view each epoch; 1: one per lesion sample).
    """
    torch.set_num_threads(2)
    index, arrays = _toy(16, 0, pool=pool)
    classes = ["cyst", "metastasis"]
    patients = sorted(index["patient_id"].unique())
    cfg = _cfg(4 if not views else 12, recipe="lpft")
    cfg.model.pool = pool
    cfg.train.finetune_views = views
    shared = prepare_shared(cfg, index, arrays, tmp_path, classes, None, 3)
    fit = fold_subset(index, arrays, classes, patients[:10])
    val = fold_subset(index, arrays, classes, patients[10:13])
    test = fold_subset(index, arrays, classes, patients[13:])
    res = train_fold(tmp_path / "f", fit, val, {"test": test}, classes, cfg, 0, {}, shared=shared)
    from liverlesion.model import load_checkpoint

    model, meta = load_checkpoint(tmp_path / "f" / "model.pt")
    assert meta["training"]["recipe"] == "lpft" and meta["training"]["finetune_blocks"] == 1
    assert meta["pool"] == pool
    probs = apply_temperature(lesion_logits(model, test.arrays, tta="flips"), meta["temperature"])
    np.testing.assert_allclose(res["test"]["prob_metastasis"].to_numpy(), probs[:, 1], atol=1e-5)
    p_fit = lesion_logits(model, fit.arrays, tta="flips")
    assert (p_fit.argmax(1) == fit.labels).mean() >= 0.75


@pytest.mark.slow
def test_cv_end_to_end_on_tiny_synthetic_cohort(tmp_path):
    from liverlesion.cv import run_cv
    from liverlesion.synth import generate_cohort

    generate_cohort(tmp_path / "cohort", patients=12, lesions=40, seed=3, matrix=192)
    cfg = load_config(
        overrides={
            "model": {"backbone": "resnet18", "weights": "none"},
            "patch": {"size_px": 48},
            "train": {"epochs": 2, "batch_size": 16},
            "cv": {"folds": 3},
            "eval": {"n_bootstrap": 100, "gradcam_max": 4},
        }
    )
    run = run_cv(tmp_path / "cohort" / "manifest.csv", tmp_path / "run", cfg)
    preds = pd.read_csv(run / "predictions.csv")
    assert len(preds) == 40 and set(preds["fold"]) == {0, 1, 2}
    # each patient appears in exactly one fold
    assert (preds.groupby("patient_id")["fold"].nunique() == 1).all()
    assert (run / "metrics.json").exists() and (run / "report.html").exists()


def test_lesion_module_is_importable_picklable_and_trains_only_blocks_in_use() -> None:
    """The Lightning module is a module-level class; blocks above ``features_from`` never get gradients."""
    import pickle

    from liverlesion.config import Config
    from liverlesion.lightning_modules import LesionModule
    from liverlesion.model import build_model

    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.features_from = "resnet18", "none", "mid"
    model, _ = build_model(cfg.model, num_classes=2, in_chans=3)
    module = LesionModule(model, cfg, [1.0, 2.0])
    back = pickle.loads(pickle.dumps(module))
    assert back.class_weights.tolist() == [1.0, 2.0]
    in_use = {id(p) for p in model.backbone_parameters()}
    above = [p for p in model.backbone.layer4.parameters()]
    assert above and not any(id(p) in in_use for p in above)
    module.on_train_epoch_start()  # unfreezes the backbone blocks in use, and only those
    assert all(p.requires_grad for p in model.backbone_parameters())
    assert not any(p.requires_grad for p in above)
    opt = module.configure_optimizers()["optimizer"]
    assert not any(id(p) in {id(q) for q in above} for g in opt.param_groups for p in g["params"])


def test_quiet_lightning_restores_the_callers_logging() -> None:
    """Training quiets Lightning's notices only while it runs (no global logging state is changed)."""
    import logging
    import warnings

    from liverlesion.cv import quiet_lightning

    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.setLevel(logging.DEBUG)
    filters = list(warnings.filters)
    with quiet_lightning():
        assert log.level == logging.WARNING
    assert log.level == logging.DEBUG and warnings.filters == filters


def test_end_to_end_recipe_trains_a_lesion_pooling_network(tmp_path):
    """model.pool=lesion end to end: the mask channel rides through the loaders; the checkpoint predicts the same."""
    torch.set_num_threads(2)
    index, arrays = _toy(8, 2, pool="lesion")
    assert arrays[0].shape == (1, 4, 48, 48)
    classes = ["cyst", "metastasis"]
    patients = sorted(index["patient_id"].unique())
    cfg = _cfg(1)
    cfg.model.pool = "lesion"
    fit = fold_subset(index, arrays, classes, patients[:5])
    val = fold_subset(index, arrays, classes, patients[5:7])
    test = fold_subset(index, arrays, classes, patients[7:])
    res = train_fold(tmp_path / "f", fit, val, {"test": test}, classes, cfg, 0, {})
    from liverlesion.model import load_checkpoint

    model, meta = load_checkpoint(tmp_path / "f" / "model.pt")
    assert meta["pool"] == "lesion" and meta["in_chans"] == 3
    probs = apply_temperature(lesion_logits(model, test.arrays, tta="flips"), meta["temperature"])
    np.testing.assert_allclose(res["test"]["prob_metastasis"].to_numpy(), probs[:, 1], atol=1e-5)


def test_end_to_end_recipe_trains_a_fusion_model(tmp_path):
    """model.fusion=radiomics with the end_to_end recipe: training optimises the network half (the
    radiomics branch is fitted afterwards), and the checkpoint is the fused model."""
    torch.set_num_threads(2)
    index, arrays = _toy(8, 3)
    classes = ["cyst", "metastasis"]
    patients = sorted(index["patient_id"].unique())
    cfg = _cfg(1)
    cfg.model.fusion = "radiomics"
    rng = np.random.default_rng(0)
    extra = np.stack([[float(a[0, 0].mean()), rng.normal()] for a in arrays])  # a density and noise
    shared = {"extra": extra, "extra_names": ["mean_density", "noise"]}
    fit = fold_subset(index, arrays, classes, patients[:5])
    val = fold_subset(index, arrays, classes, patients[5:7])
    test = fold_subset(index, arrays, classes, patients[7:])
    res = train_fold(tmp_path / "f", fit, val, {"test": test}, classes, cfg, 0, {}, shared=shared)
    from liverlesion.model import load_checkpoint

    model, meta = load_checkpoint(tmp_path / "f" / "model.pt")
    assert list(model.fusion_features) == ["mean_density", "noise"]
    assert 0.0 <= float(model.fusion_alpha) <= 1.0
    out = res["test"]
    assert {"network_prob_cyst", "network_prob_metastasis"} <= set(out.columns)
    assert np.isfinite(out["prob_metastasis"]).all() and np.isfinite(out["network_prob_metastasis"]).all()


def test_calibrated_selection_loss_judges_ranking_not_confidence():
    """``train.select_on=calibrated`` compares epochs after the temperature the fold fits afterwards:
    an over-confident epoch that ranks the lesions the same is not worse; one that ranks them worse is."""
    from liverlesion.lightning_modules import selection_loss

    rng = np.random.default_rng(0)
    y = torch.from_numpy(np.repeat([0, 1], 20))
    margin = torch.from_numpy(np.where(y.numpy() == 1, 1.0, -1.0) + rng.normal(0, 2.0, 40)).float()
    logits = torch.stack([-margin, margin], 1) / 4  # log-odds 2 * margin / 4: about calibrated
    raw, cal = load_config(overrides={"train": {"select_on": "loss"}}), load_config()
    assert cal.train.select_on == "calibrated"  # the default
    # 10x more confident, same ranking: the raw loss rises steeply, the calibrated one stays put (but for the prior on log T)
    assert selection_loss(10 * logits, y, None, raw) > 1.5 * selection_loss(logits, y, None, raw)
    assert selection_loss(10 * logits, y, None, cal) == pytest.approx(
        selection_loss(logits, y, None, cal), rel=0.05
    )
    # a worse ranking (half the lesions' margins shuffled) is worse under either criterion
    worse = margin.clone()
    worse[::2] = worse[::2][torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    worse_logits = torch.stack([-worse, worse], 1) / 4
    assert selection_loss(worse_logits, y, None, cal) > selection_loss(logits, y, None, cal)
    # a constant network is no better than chance (log 2) after calibration
    assert selection_loss(torch.zeros(40, 2), y, None, cal) == pytest.approx(np.log(2), abs=1e-6)


def test_finetune_views_draws_k_distinct_views_of_every_lesion_sample_per_epoch():
    """train.finetune_views: each epoch has every (lesion, sample) k times, each a different view, at random."""
    from liverlesion.lpft import _Views, _ViewsPerEpoch

    # 7 lesions, 5 views (4 flips + 1 augmented), 3 samples (stacks); item value = (lesion, view, sample)
    source = [np.array([[[i, v, s] for s in range(3)] for v in range(5)], dtype=np.float32) for i in range(7)]
    ds = _Views(source, np.zeros(7, int), n_tta=4, train=True)
    assert len(ds) == 7 * 5 * 3
    for k in (1, 2, 5, 9):
        sampler = _ViewsPerEpoch(ds, k, torch.Generator().manual_seed(0))
        epochs = [list(sampler) for _ in range(3)]
        assert all(len(e) == len(sampler) == 7 * 3 * min(k, 5) for e in epochs)
        for e in epochs:
            picked = [tuple(int(t) for t in ds[j][0]) for j in e]
            assert len(set(picked)) == len(picked)  # no view twice in one epoch
            per = pd.Series([(i, s) for i, _, s in picked]).value_counts()
            assert len(per) == 7 * 3 and (per == min(k, 5)).all()
        if k < 5:
            assert epochs[0] != epochs[1]  # other views (and order) next epoch
    again = _ViewsPerEpoch(ds, 1, torch.Generator().manual_seed(0))
    assert list(again) == list(_ViewsPerEpoch(ds, 1, torch.Generator().manual_seed(0)))  # seeded


def test_build_cache_runs_channels_last_and_leaves_the_model_as_it_found_it():
    """The cache pass holds the weights channels-last (faster convolutions on CPU): same features as NCHW,
    and afterwards the model is trainable and in the usual layout (checkpoints, the fine-tuning stage)."""
    import contextlib

    from liverlesion import lpft
    from liverlesion.model import build_model

    torch.set_num_threads(2)
    _, arrays = _toy(2, 0, pool="lesion")
    cfg = _cfg(recipe="lpft")
    cfg.model.pool = "lesion"
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, num_classes=2, in_chans=3)
    n_top, _ = lpft.n_top_blocks(model, cfg)
    assert n_top >= 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    real = lpft.channels_last

    @contextlib.contextmanager
    def spy(module):
        with real(module):
            convs = [p for p in module.parameters() if p.ndim == 4]
            seen.append(
                bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
            )
            yield module

    lpft.channels_last = spy
    try:
        fast = lpft.build_cache(model, arrays, cfg, n_top, progress=False)
    finally:
        lpft.channels_last = real
    assert seen == [True]
    lpft.channels_last = lambda m: contextlib.nullcontext(m)
    try:
        plain = lpft.build_cache(model, arrays, cfg, n_top, progress=False)
    finally:
        lpft.channels_last = real
    for a, b in zip(fast.pooled + fast.lower, plain.pooled + plain.lower, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.is_contiguous() for p in model.parameters())
    assert not any(
        p.is_contiguous(memory_format=torch.channels_last)
        for p in model.parameters()
        if p.ndim == 4 and p.shape[-1] > 1
    )
    for p in model.parameters():  # not inference tensors: the fine-tuning stage trains them
        p.requires_grad_(True)


def test_min_delta_stops_a_creeping_loss_and_still_keeps_the_lowest(tmp_path):
    """train.min_delta: epochs that lower the inner-validation loss by less do not reset the patience.

    A linear head on separable features with a small learning rate lowers the raw loss every epoch,
    by far less than 1 nat: with min_delta 0 it trains to the epoch limit, with min_delta 1 it stops
    after ``patience`` epochs without a large enough gain; both keep the weights of the lowest loss.
    """
    from liverlesion.lpft import _fit_stage, _Views

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    # 40 lesions, 2 views, 1 sample, 8 features; class 1 shifted along every feature
    source = [(rng.normal(size=(2, 1, 8)) + 1.5 * k).astype(np.float32) for k in y]
    ran = {}
    for delta in (0.0, 1.0):
        cfg = load_config(overrides={"train": {"min_delta": delta, "patience": 2, "select_on": "loss"}})
        net = torch.nn.Linear(8, 2)
        with torch.no_grad():
            net.weight.zero_(), net.bias.zero_()
        fit, val = _Views(source[:30], y[:30], 2, True), _Views(source[30:], y[30:], 2, False)
        res = _fit_stage(
            net, list(net.parameters()), 1e-3, 10, fit, val, cfg, None, tmp_path, f"d{delta}", False
        )
        assert res["improved"] and res["best_val_loss"] < res["start_val_loss"] - 1e-3
        ran[delta] = res
    assert ran[0.0]["epochs"] == 10 and ran[0.0]["best_epochs"] == 10  # still improving at the limit
    assert ran[1.0]["epochs"] == 3 and ran[1.0]["best_epochs"] == 3  # patience 2 after the first epoch


@pytest.mark.parametrize("command", ["cv", "train"])
@pytest.mark.parametrize("made", [False, True])
def test_a_bad_image_found_while_cutting_patches_leaves_no_run_folder(tmp_path, capsys, command, made):
    # the run folder's config.yaml and empty patches/ were left behind, and the next run was refused
    # with 'run folder already exists and is not empty; pass --resume'
    from helpers import one_lesion_patients
    from liverlesion.cli import main

    manifest = one_lesion_patients(tmp_path, 4)
    (tmp_path / "ct3.nii.gz").write_text("not an image\n")
    out = tmp_path / "runs" / "run"
    if made:  # a folder the user made for the run is kept, empty
        out.mkdir(parents=True)
    extra = ["--folds", "2"] if command == "cv" else ["--set", "train.val_fraction=0.5"]
    for _ in range(2):  # the second run meets the same error, not the first run's leftovers
        assert main([command, str(manifest), "-o", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "ct3.nii.gz is not a NIfTI image" in err and "Traceback" not in err
        assert (out.is_dir() and not any(out.iterdir())) if made else not out.exists()


@pytest.mark.parametrize("kind", ["cv", "train"])
def test_train_and_cv_train_inside_the_same_quieting_and_say_whose_fusion_statistics(
    tmp_path, monkeypatch, capsys, kind
):
    # `train` printed Lightning's "GPU available" / litlogger tip / eval-mode warnings that `cv` silences
    # (quiet_lightning wrapped a helper, not train_single), and said "training-fold statistics per fold"
    import logging
    import warnings

    from helpers import one_lesion_patients
    from liverlesion import cv

    seen = []

    def probe(*args, **kwargs):  # the training itself: what the quieting is for
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn(
                "Found 8 module(s) in eval mode at the start of training.", UserWarning, stacklevel=1
            )
        seen.append((logging.getLogger("lightning.pytorch.utilities.rank_zero").level, len(caught)))
        return {}  # as a non-zero DDP rank: nothing to write

    monkeypatch.setattr(cv, "train_fold", probe)
    manifest = one_lesion_patients(tmp_path, 8)
    cfg = load_config(
        overrides={
            "model": {"backbone": "resnet10t", "weights": "none", "fusion": "radiomics"},
            "patch": {"size_px": 48},
            "train": {"recipe": "end_to_end", "val_fraction": 0.5},
            "cv": {"folds": 2},
        }
    )
    if kind == "cv":
        cv.run_cv(manifest, tmp_path / "run", cfg, baselines=False, evaluate=False)
    else:
        cv.train_single(manifest, tmp_path / "run", cfg)
    assert seen and all(s == (logging.WARNING, 0) for s in seen), seen
    stats = {"cv": "(training-fold statistics per fold)", "train": "(statistics of the training patients)"}
    assert f"Fusion: radiomics-style features of every lesion {stats[kind]}" in capsys.readouterr().out
