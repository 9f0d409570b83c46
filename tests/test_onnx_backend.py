"""predict's onnxruntime backend: the same probabilities as torch (to 1e-4), chosen automatically only
for an up-to-date export, and a CPU path that never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel  # noqa: F401  (imported at collection: its log handler must not bind to a test's captured stderr)
import numpy as np
import pandas as pd
import pytest

from helpers import make_ct_with_two_lesions, make_tiny_checkpoint, torch_threads
from liverlesion.cli import main
from liverlesion.errors import UserError
from liverlesion.export import export_model
from liverlesion.io import read_volume, write_volume
from liverlesion.onnx_backend import export_path
from liverlesion.predict import Classifier

PROBS = ["prob_cyst", "prob_metastasis"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("case")
    image, mask = make_ct_with_two_lesions()
    return {"image": write_volume(image, d / "ct.nii.gz"), "mask": write_volume(mask, d / "mask.nii.gz")}


def _exported(path: Path, seed: int, **kw) -> Path:
    ckpt = make_tiny_checkpoint(path, seed, **kw)
    export_model(ckpt, "onnx", export_path(ckpt))
    return ckpt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    return {
        # flips TTA and a temperature: both must be applied the same way by both backends
        "a": _exported(d / "a" / "model.pt", 0, temperature=0.05),
        "b": _exported(d / "b" / "model.pt", 1, temperature=0.1, threshold=0.4),
        "2d": _exported(d / "2d" / "model.pt", 2, mode="2d", temperature=0.05),  # slice samples
        "plain": make_tiny_checkpoint(d / "plain" / "model.pt", 0, temperature=0.05),
    }


def _predict(clf: Classifier, case) -> pd.DataFrame:
    return clf.predict(read_volume(case["image"]), mask=read_volume(case["mask"], kind="mask"))


@pytest.mark.parametrize("members", [["a"], ["a", "b"], ["2d"]])
def test_onnx_gives_torch_probabilities(members, ckpts, case):
    paths = [ckpts[m] for m in members]
    torch_clf = Classifier.load(paths, device="cpu", backend="torch")
    onnx_clf = Classifier.load(paths, device="cpu", backend="onnx", threads=1)
    assert torch_clf.backend == "torch" and onnx_clf.backend == "onnx"
    assert onnx_clf.config.model.tta == "flips" and onnx_clf.threshold == torch_clf.threshold
    want, got = _predict(torch_clf, case), _predict(onnx_clf, case)
    p_want, p_got = want[PROBS].to_numpy(float), got[PROBS].to_numpy(float)
    assert np.isfinite(p_want[0]).all() and abs(p_want[0, 0] - 0.5) > 1e-3  # a real comparison
    np.testing.assert_allclose(p_got, p_want, atol=1e-4, equal_nan=True)
    np.testing.assert_allclose(got["uncertainty"], want["uncertainty"], atol=1e-4, equal_nan=True)
    assert list(got["pred_class"]) == list(want["pred_class"])
    assert list(got["checkpoint_sha256"]) == list(want["checkpoint_sha256"])


def test_auto_uses_only_an_up_to_date_export(ckpts, tmp_path):
    assert Classifier.load(ckpts["a"], device="cpu").backend == "onnx"
    assert Classifier.load(ckpts["plain"], device="cpu").backend == "torch"  # no export
    assert Classifier.load([ckpts["a"], ckpts["plain"]], device="cpu").backend == "torch"
    with pytest.raises(UserError, match=r"--backend onnx: no export at .*liverlesion export --model"):
        Classifier.load(ckpts["plain"], backend="onnx")
    # The checkpoint changes after the export: the export is stale, auto falls back to torch.
    stale = tmp_path / "model.pt"
    stale.write_bytes(ckpts["a"].read_bytes())
    for name in ("model.onnx", "model.onnx.json"):
        (tmp_path / name).write_bytes((ckpts["a"].parent / name).read_bytes())
    assert Classifier.load(stale, device="cpu").backend == "onnx"
    make_tiny_checkpoint(stale, 5)
    assert Classifier.load(stale, device="cpu").backend == "torch"
    with pytest.raises(UserError, match="exported from another version of model.pt; export again"):
        Classifier.load(stale, backend="onnx")
    with pytest.raises(UserError, match="onnx backend runs on the CPU"):
        Classifier.load(ckpts["a"], backend="onnx", device="cuda")


def test_cli_backends_agree(ckpts, case, tmp_path, capsys):
    outs = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        args = ["predict", "--model", ckpts["a"], "--image", case["image"], "--mask", case["mask"]]
        rc = main([str(a) for a in [*args, "-o", out, "--backend", backend, "--threads", "1"]])
        assert rc == 0, capsys.readouterr().err
        outs[backend] = pd.read_csv(out / "results.csv")
    capsys.readouterr()
    np.testing.assert_allclose(
        outs["onnx"][PROBS].to_numpy(float), outs["torch"][PROBS].to_numpy(float), atol=1e-4, equal_nan=True
    )


def test_onnx_cli_predict_never_imports_torch(ckpts, case, tmp_path):
    code = (
        "import sys; from liverlesion.cli import main; "
        f"rc = main(['predict', '--model', {str(ckpts['a'])!r}, '--image', {str(case['image'])!r}, "
        f"'--mask', {str(case['mask'])!r}, '-o', {str(tmp_path / 'o')!r}, '--device', 'cpu']); "
        "print('RC', rc, 'TORCH', 'torch' in sys.modules)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "RC 0 TORCH False" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "o" / "results.csv").is_file()
    assert list((tmp_path / "o" / "overlays").glob("*.png"))


def test_repr_and_printed_results(ckpts, case):
    clf = Classifier.load([ckpts["a"], ckpts["b"]], device="cpu", backend="onnx", threads=1)
    text = repr(clf)
    for part in ("2 model(s)", "cyst", "metastasis", "decision:", "onnx on cpu", "not for diagnosis"):
        assert part in text, text
    df = _predict(clf, case)
    shown = str(df)
    assert "case-L01" in shown and "too small to characterise" in shown and "decision:" in shown
    assert "checkpoint_sha256" not in shown and "centroid_x_mm" not in shown  # the short table
    assert len(shown.splitlines()) == len(df) + 3
    assert "checkpoint_sha256" in df.columns  # every column is still there
    assert "lesion_id" in repr(df[["lesion_id"]])  # a column selection prints as pandas does


def test_gradcam_with_onnx_loads_the_torch_network(ckpts, case):
    onnx_clf = Classifier.load(ckpts["a"], device="cpu", backend="onnx", threads=1)
    torch_clf = Classifier.load(ckpts["a"], device="cpu", backend="torch")
    ct, mask = read_volume(case["image"]), read_volume(case["mask"], kind="mask")
    got = onnx_clf.predict(ct, mask=mask, gradcam=True).attrs["gradcam"]
    want = torch_clf.predict(ct, mask=mask, gradcam=True).attrs["gradcam"]
    assert list(got) == list(want) == ["case-L01"]
    np.testing.assert_allclose(got["case-L01"], want["case-L01"], atol=1e-4)
    assert onnx_clf.backend == "onnx"  # the probabilities still come from onnxruntime
