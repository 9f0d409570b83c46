"""The random forest held as tensors (forest.py): the forest's own probabilities, through the
checkpoint and the ONNX export of a fused model, and the soft vote that makes the handcrafted half."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from helpers import make_tiny_checkpoint, torch_threads
from liverlesion.baselines import rf_pipeline
from liverlesion.forest import TreeEnsemble, vote_logits


def _data(k: int, n: int = 150, f: int = 12, seed: int = 0, classes=None):
    rng = np.random.default_rng(seed)
    y = rng.choice(classes if classes is not None else np.arange(k), n)
    # features on very different scales, as the radiomics-style ones are (HU, mm², ratios)
    x = rng.normal(size=(n, f)) * rng.lognormal(0, 2, size=f) + 40 * y[:, None] * (np.arange(f) < 3)
    x[::9, 4] = np.nan  # missing values: the pipeline imputes them before the forest sees them
    return x, y


def _fitted(x: np.ndarray, y: np.ndarray):
    pipe = rf_pipeline(0).fit(x, y)
    return pipe, pipe.named_steps["impute"].transform(x)


@pytest.mark.parametrize(("k", "classes"), [(2, None), (3, None), (3, [0, 2])])
def test_forest_gives_the_forests_own_probabilities(k, classes):
    """Binary, three classes, and three with one absent from the training data (probability 0)."""
    x, y = _data(k, classes=classes)
    pipe, filled = _fitted(x, y)
    forest = TreeEnsemble.from_sklearn(pipe.named_steps["rf"], k)
    xt, _ = _data(k, n=400, seed=1)
    xt = pipe.named_steps["impute"].transform(xt)
    want = np.zeros((len(xt), k))
    want[:, pipe.named_steps["rf"].classes_] = pipe.predict_proba(xt)
    got = forest(torch.from_numpy(xt)).numpy()
    assert got.shape == (len(xt), k) and len(np.unique(got[:, 0].round(4))) > 10  # a real comparison
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_forest_splits_exactly_where_sklearn_splits():
    """scikit-learn compares float32 features with float64 thresholds; a feature one float32 step
    either side of every root threshold must go the same way here."""
    x, y = _data(2)
    pipe, filled = _fitted(x, y)
    rf = pipe.named_steps["rf"]
    forest = TreeEnsemble.from_sklearn(rf, 2)
    rows = []
    for tree in rf.estimators_[:40]:
        f, t = tree.tree_.feature[0], np.float32(tree.tree_.threshold[0])
        for v in (np.nextafter(t, np.float32(-np.inf)), t, np.nextafter(t, np.float32(np.inf))):
            row = filled[0].copy()
            row[f] = v
            rows.append(row)
    xt = np.array(rows)
    np.testing.assert_allclose(forest(torch.from_numpy(xt)).numpy(), rf.predict_proba(xt), atol=1e-6)


def test_vote_is_the_mean_of_the_two_probabilities():
    lr = torch.tensor([[0.0, 2.0], [1.0, -1.0], [0.3, 0.3]], dtype=torch.float64)
    rf = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    got = torch.softmax(vote_logits(lr, rf), dim=1)
    torch.testing.assert_close(got, (torch.softmax(lr, dim=1) + rf) / 2)
    assert vote_logits(lr, None) is lr  # no forest: the logistic regression alone


def test_fused_checkpoint_keeps_its_forest_and_onnx_agrees(tmp_path):
    """save_checkpoint / load_checkpoint rebuild the forest from the state dict alone, and the ONNX
    export (predict --backend onnx, serve) gives the same fused probabilities as torch."""
    import onnxruntime as ort

    from liverlesion.export import export_model
    from liverlesion.model import load_checkpoint

    x, y = _data(2, f=6)
    with torch_threads(1):
        ckpt = make_tiny_checkpoint(tmp_path / "model.pt", 0, fusion=(x, y), temperature=0.5)
        model, meta = load_checkpoint(ckpt)
        assert model.fusion_forest is not None and model.fusion_forest.levels > 2
        assert float(model.fusion_alpha) == 0.5
        out = export_model(ckpt, "onnx", tmp_path / "model.onnx")
        g = torch.Generator().manual_seed(3)
        image = torch.rand(5, 3, 64, 64, generator=g)
        feats = torch.from_numpy(_data(2, n=5, f=6, seed=2)[0].astype(np.float32))
        with torch.no_grad():
            half = model.handcrafted_logits(feats)
            want = torch.softmax(model.fuse(model.network_logits(image), feats) / 0.5, dim=1).numpy()
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = sess.run(["probabilities"], {"image": image.numpy(), "features": feats.numpy()})[0]
    # the forest votes: its half is not the logistic regression's alone
    lr = model.fusion_head(
        (torch.where(feats.isnan(), model.fusion_fill, feats) - model.fusion_mean) / model.fusion_std
    )
    assert (half - lr).abs().max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("fusion_forest.feature", 99, "splits on a feature outside the 6"),
        ("fusion_forest.left", 10**7, "node that does not exist (left)"),
        ("fusion_forest.depth", 10**6, "depth"),
    ],
)
def test_a_damaged_forest_is_refused_in_one_line(tmp_path, key, value, says):
    """An edited checkpoint whose forest would index outside itself: a one-line error on load, not an
    IndexError in the middle of a prediction."""
    from liverlesion.errors import UserError
    from liverlesion.model import load_checkpoint

    x, y = _data(2, f=6)
    ckpt = make_tiny_checkpoint(tmp_path / "model.pt", 0, fusion=(x, y))
    obj = torch.load(ckpt, weights_only=False)
    t = obj["state_dict"][key]
    if t.dim():
        t.view(-1)[0] = value
    else:
        t.fill_(value)
    torch.save(obj, ckpt)
    with pytest.raises(UserError, match=re.escape(says)) as e:
        load_checkpoint(ckpt)
    assert "damaged or was edited" in str(e.value) and "\n" not in str(e.value)
