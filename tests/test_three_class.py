"""Three classes end to end: synth --classes -> cv -> evaluate -> report -> predict -> evaluate (external)
-> export -> predict --backend onnx -> serve, on a tiny synthetic cohort with a tiny network."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest

from helpers import http_post, multipart_body, torch_threads
from liverlesion.cli import main

CLASSES3 = ["cyst", "haemangioma", "metastasis"]  # training order: sorted names
TINY = [
    "--set", "model.backbone=resnet10t",
    "--set", "model.weights=none",
    "--set", "patch.size_px=48",
    "--set", "train.epochs=2",
    "--set", "train.batch_size=8",
    "--set", "eval.n_bootstrap=50",
    "--set", "eval.gradcam_max=3",
]  # fmt: skip


@pytest.mark.slow
def test_three_class_cohort_end_to_end(tmp_path, capsys):
    cohort, run = tmp_path / "cohort", tmp_path / "run"
    assert (
        main(
            ["synth", "-o", str(cohort), "--patients", "15", "--lesions", "36", "--seed", "4", "--matrix", "128",
             "--classes", "metastasis,cyst,haemangioma", "--workers", "1"]
        )
        == 0
    )  # fmt: skip
    manifest = cohort / "manifest.csv"
    assert sorted(pd.read_csv(manifest)["lesion_class"].unique()) == CLASSES3

    with torch_threads(1):
        rc = main(["cv", str(manifest), "-o", str(run), "--folds", "3", *TINY])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    net = m["network"]
    assert m["class_names"] == CLASSES3 and net["task"] == "multiclass"
    for c in CLASSES3:  # per-class one-vs-rest metrics with CIs
        assert {f"roc_auc_{c}", f"sensitivity_{c}", f"specificity_{c}"} <= set(net["metrics"])
    assert "ci_low" in net["metrics"]["roc_auc"] and "macro_f1" in net["metrics"]
    cm = np.array(net["confusion_matrix"]["counts"])
    assert cm.shape == (3, 3) and cm.sum() == m["coverage"]["n_classified"]
    assert all(t["source"] == "argmax" for t in net["threshold"]["per_fold"].values())
    assert set(m["baselines"])  # the baselines ran on three classes too
    html = (run / "report.html").read_text()
    assert "Per class (one vs rest)" in html and "haemangioma" in html
    assert (run / "plots" / "confusion_matrix.png").is_file()
    assert main(["report", str(run)]) == 0

    # checkpoints: three classes, no threshold (argmax), a training range for the domain check
    ckpts = [str(run / f"fold_{k}" / "model.pt") for k in range(3)]
    from liverlesion.model import load_checkpoint

    _, meta = load_checkpoint(ckpts[0])
    assert meta["class_names"] == CLASSES3 and meta["threshold"] is None
    assert {"lesion_hu_mean", "parenchyma_hu", "slice_mm"} <= set(meta["training_domain"]["stats"])

    pred = tmp_path / "pred"
    models = sum((["--model", c] for c in ckpts), [])
    args = ["--manifest", str(manifest), "-o", str(pred), "--no-gradcam", "--backend", "torch"]
    with torch_threads(1):
        assert main(["predict", *models, *args]) == 0
    res = pd.read_csv(pred / "results.csv")
    ok = res["status"] == "classified"
    probs = res.loc[ok, [f"prob_{c}" for c in CLASSES3]].to_numpy(float)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert list(res.loc[ok, "pred_class"]) == [CLASSES3[i] for i in probs.argmax(1)]
    out = capsys.readouterr().out
    assert "domain check" in out  # the cohort the folds were trained on: no shift expected

    assert main(["evaluate", str(pred), "--n-bootstrap", "30"]) == 0
    ext = json.loads((pred / "metrics.json").read_text())
    assert ext["validation"] == "external" and ext["task"] == "multiclass"
    assert len(ext["external"]["checkpoint_sha256"]) == 3
    assert np.array(ext["network"]["confusion_matrix"]["counts"]).shape == (3, 3)
    assert "External validation" in (pred / "report.html").read_text()

    # ONNX export, and predict on the onnx backend gives the same probabilities
    for c in ckpts:
        assert main(["export", "--model", c, "--format", "onnx"]) == 0
    pred_onnx = tmp_path / "pred_onnx"
    args[args.index("torch")] = "onnx"
    args[args.index(str(pred))] = str(pred_onnx)
    assert main(["predict", *models, *args]) == 0
    res_onnx = pd.read_csv(pred_onnx / "results.csv")
    info_onnx = json.loads((pred_onnx / "results.json").read_text())
    assert info_onnx["models"][0]["backend"] == "onnx"
    assert info_onnx["domain_check"]["status"] in ("in range", "shift")  # the range travels with the export
    for c in CLASSES3:
        np.testing.assert_allclose(res_onnx[f"prob_{c}"], res[f"prob_{c}"], atol=1e-4)

    # serve: the JSON API answers with the three class probabilities
    from liverlesion.serve import make_server

    row = pd.read_csv(manifest).iloc[0]
    files = {
        "image": ("ct.nii.gz", (cohort / row["image"]).read_bytes()),
        "mask": ("mask.nii.gz", (cohort / row["mask"]).read_bytes()),
    }
    body, ctype = multipart_body(
        {"label": str(int(row["label"])), "point": "", "diameter": "", "min_size_mm": "0"}, files
    )
    with torch_threads(1):
        server = make_server([ckpts[0]], host="127.0.0.1", port=0, max_upload_bytes=50_000_000)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            status, data = http_post(f"http://127.0.0.1:{server.server_address[1]}/api/predict", body, ctype)
        finally:
            server.shutdown()
            server.server_close()
    assert status == 200, data[:500]
    lesion = json.loads(data)["lesions"][0]
    assert lesion["pred_class"] in CLASSES3
    assert sum(lesion[f"prob_{c}"] for c in CLASSES3) == pytest.approx(1.0, abs=1e-6)
