"""External validation (evaluate on predict's output) and the domain-shift check.

Checkpoints are untrained (timm's tiny ``test_resnet``): the plumbing is under test, so
expected numbers come from the files themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel  # noqa: F401  (imported at collection: its log handler must not bind to a test's captured stderr)
import numpy as np
import pandas as pd
import pytest

from helpers import make_tiny_checkpoint, torch_threads, two_lesion_patients
from liverlesion.cli import main
from liverlesion.domain import (
    NO_RANGE,
    STATS,
    check_domain,
    format_domain,
    ring_stats,
    training_range,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _run(args: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _table(n: int, seed: int, shift: dict[str, float] | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = {
        "lesion_hu_mean": (60, 25),
        "lesion_hu_std": (15, 4),
        "parenchyma_hu": (110, 8),
        "parenchyma_noise_hu": (15, 3),
        "slice_mm": (2.5, 0.5),
        "pixel_mm": (0.9, 0.05),
    }
    df = pd.DataFrame({k: rng.normal(m, s, n) for k, (m, s) in base.items()})
    for k, v in (shift or {}).items():
        df[k] = df[k] + v
    df.insert(0, "lesion_id", [f"p{i // 3}-L{i % 3 + 1:02d}" for i in range(n)])
    return df


# --------------------------------------------------------------------------- domain statistics
def test_training_range_uses_only_the_given_lesions():
    t = _table(60, 0)
    t.loc[t.index[:30], "lesion_hu_mean"] += 1000.0  # a "test fold" far away
    r_all = training_range(t)
    r_fit = training_range(t, t["lesion_id"].iloc[30:])
    assert r_fit["n_lesions"] == 30
    assert r_fit["stats"]["lesion_hu_mean"]["high"] < 200 < r_all["stats"]["lesion_hu_mean"]["high"]
    assert set(r_fit["stats"]) == set(STATS)
    s = r_fit["stats"]["parenchyma_hu"]
    assert s["low"] < s["q_low"] < s["median"] < s["q_high"] < s["high"]  # widened by the margin


def test_check_domain_flags_shifted_statistics_only():
    rng = training_range(_table(200, 0))
    same = check_domain(rng, _table(40, 1))
    assert same["status"] == "in range" and not same["warnings"]
    shifted = check_domain(rng, _table(40, 2, {"parenchyma_hu": 80.0, "slice_mm": -2.0}))
    assert shifted["status"] == "shift"
    flagged = {c["statistic"] for c in shifted["checks"] if c["flagged"]}
    assert flagged == {"parenchyma_hu", "slice_mm"}
    lines = format_domain(shifted)
    assert lines[0].startswith("warning: domain shift") and len(lines) == 3
    assert "above" in lines[1] and "below" in lines[2]


def test_check_domain_without_stored_range():
    rep = check_domain(None, _table(5, 0))
    assert rep["status"] == NO_RANGE and not rep["warnings"]
    assert NO_RANGE in format_domain(rep)[0]


def test_ring_stats_measure_the_surrounding_tissue_not_the_lesion():
    rng = np.random.default_rng(0)
    hu = rng.normal(120.0, 10.0, (1, 64, 64)).astype(np.float32)
    yy, xx = np.mgrid[:64, :64]
    lesion = (yy - 32) ** 2 + (xx - 32) ** 2 < 10**2
    hu[0][lesion] = 10.0
    hu[0, :, :4] = -1000.0  # air at the patch edge: not soft tissue, left out
    med, sd = ring_stats(hu, lesion[None].astype(np.uint8), pixel_mm=0.8)
    assert med == pytest.approx(120.0, abs=2.0) and sd == pytest.approx(10.0, rel=0.2)
    assert np.isnan(ring_stats(hu, np.zeros_like(lesion)[None], 0.8)[0])


# --------------------------------------------------------------------------- predict + evaluate
@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return two_lesion_patients(tmp_path_factory.mktemp("ext"), 4)


def _far_range() -> dict:
    """A training range no tiny test CT falls into (as if trained on very different scans)."""
    t = _table(50, 0, {"parenchyma_hu": 400.0, "lesion_hu_mean": 500.0})
    return training_range(t)


def test_predict_warns_on_domain_shift_and_evaluate_marks_external(labelled, tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "m.pt", 0, training_domain=_far_range())
    pred = tmp_path / "pred"
    rc, out, err = _run(
        ["predict", "--model", ckpt, "--manifest", labelled, "-o", pred, "--min-size-mm", "0"], capsys
    )
    assert rc == 0, err
    assert "domain shift" in err and "lesion mean HU" in err and "surrounding-tissue HU" in err
    info = json.loads((pred / "results.json").read_text())
    assert info["domain_check"]["status"] == "shift"

    rc, out, err = _run(["evaluate", pred, "--n-bootstrap", "20"], capsys)
    assert rc == 0, err
    m = json.loads((pred / "metrics.json").read_text())
    sha = info["models"][0]["sha256"]
    assert m["validation"] == "external" and m["external"]["checkpoint_sha256"] == [sha]
    assert m["n_lesions"] == 8 and m["n_patients"] == 4
    assert "8 lesions, 4 patients, external set;" in out
    from liverlesion.summary import format_summary

    one = {**m, "n_lesions": 1, "n_patients": 1}  # an external set of one patient: words, not "1 patients"
    assert "1 lesion, 1 patient," in format_summary(one)
    assert m["network"]["threshold"]["per_fold"]["external"]["source"] == "checkpoint"
    assert m["network"]["calibration"]["available"]
    assert any(n.startswith("domain shift") for n in m["notes"])
    # the same contract as a cv run's predictions.csv, and the same decision as predict
    p = pd.read_csv(pred / "predictions.csv", dtype={"fold": str})
    res = pd.read_csv(pred / "results.csv")
    assert (p["fold"] == "external").all() and list(p["pred_class"]) == list(res["pred_class"])
    right = int((res["pred_class"] == res["true_class"]).sum())
    assert m["network"]["metrics"]["accuracy"]["value"] == pytest.approx(right / 8)
    html = (pred / "report.html").read_text()
    assert "External validation" in html and sha in html and "domain shift" in html
    assert "No external validation" not in html
    assert (pred / "plots" / "reliability.png").is_file() and (
        pred / "plots" / "confusion_matrix.png"
    ).is_file()
    assert "External validation of 1 model(s)" in out

    # the results file itself, and its predictions.csv, name the same run
    for target in (pred / "results.csv", pred / "predictions.csv"):
        rc, _, err = _run(["evaluate", target, "--n-bootstrap", "0"], capsys)
        assert rc == 0, err
    # report redraws from the files
    rc, _, err = _run(["report", pred], capsys)
    assert rc == 0, err


def test_old_checkpoint_says_no_range_stored(labelled, tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "old.pt", 0)  # written without training_domain
    rc, out, err = _run(["predict", "--model", ckpt, "--manifest", labelled, "-o", tmp_path / "p"], capsys)
    assert rc == 0, err
    assert NO_RANGE in out and "domain shift" not in err


def test_evaluate_predict_output_without_labels_is_one_line(tmp_path, capsys):
    d = tmp_path / "pred"
    d.mkdir()
    (d / "results.csv").write_text(
        "lesion_id,patient_id,pred_class,prob_cyst,prob_metastasis,checkpoint_sha256\n"
        "p1-L01,p1,cyst,0.8,0.2,abc\n"
    )
    rc, out, err = _run(["evaluate", d], capsys)
    assert rc != 0 and "Traceback" not in err
    line = err.strip()
    assert "\n" not in line and "results.csv" in line and "lesion_class" in line
    assert not (d / "metrics.json").exists()


def test_evaluate_a_foreign_csv_is_one_line(tmp_path, capsys):
    f = tmp_path / "table.csv"
    f.write_text("a,b\n1,2\n")
    rc, _, err = _run(["evaluate", f], capsys)
    assert rc != 0 and "not the output of `liverlesion predict`" in err and "\n" not in err.strip()


def test_evaluate_a_checkpoint_given_as_the_results_is_one_line(tmp_path, capsys):
    # it was read as a CSV: 'file line 9 has 2 fields but the header has 1; the file is damaged or was edited'
    ckpt = make_tiny_checkpoint(tmp_path / "model.pt", seed=0)
    rc, _, err = _run(["evaluate", ckpt], capsys)
    assert rc == 2 and "Traceback" not in err and "\n" not in err.strip(), err
    assert "model.pt: binary data, not a CSV table" in err and "file line" not in err


def test_fold_range_excludes_the_test_fold():
    from liverlesion.train import FoldData, _training_domain

    t = _table(30, 0)
    t.loc[t.index[20:], "parenchyma_hu"] = 900.0  # the test fold's lesions
    fit = FoldData(t.iloc[:15][["lesion_id"]], [], np.zeros(15))
    val = FoldData(t.iloc[15:20][["lesion_id"]], [], np.zeros(5))
    r = _training_domain({"domain": t}, fit, val)
    assert r["n_lesions"] == 20 and r["stats"]["parenchyma_hu"]["high"] < 200
    assert _training_domain({}, fit, val) is None


def test_evaluate_refuses_classes_the_model_does_not_know(tmp_path, capsys):
    d = tmp_path / "pred"
    d.mkdir()
    (d / "results.csv").write_text(
        "lesion_id,patient_id,true_class,pred_class,prob_cyst,prob_metastasis,checkpoint_sha256\n"
        "p1-L01,p1,haemangioma,cyst,0.8,0.2,abc\np2-L01,p2,cyst,cyst,0.7,0.3,abc\n"
    )
    rc, _, err = _run(["evaluate", d], capsys)
    assert rc != 0 and "haemangioma" in err and "model's classes" in err and "\n" not in err.strip()
    assert not (d / "metrics.json").exists() and not (d / "predictions.csv").exists()


def test_evaluate_bad_probability_names_the_file_and_its_line(tmp_path, capsys):
    """The check ran on the classified rows only: it named "network", not results.csv, and counted
    rows without the too-small ones before it (line 4 here, not 5)."""
    d = tmp_path / "pred"
    d.mkdir()
    (d / "results.csv").write_text(
        "lesion_id,patient_id,true_class,pred_class,prob_cyst,prob_metastasis,status,checkpoint_sha256\n"
        "p1-L01,p1,cyst,too small to characterise,,,too small to characterise,abc\n"
        "p2-L01,p2,cyst,cyst,0.7,0.3,classified,abc\n"
        "p3-L01,p3,metastasis,metastasis,0.2,0.8,classified,abc\n"
        "p4-L01,p4,metastasis,cyst,nan,0.4,classified,abc\n"
    )
    rc, _, err = _run(["evaluate", d, "--n-bootstrap", 0, "--no-gradcam"], capsys)
    assert rc != 0 and "\n" not in err.strip(), err
    assert "results.csv: probabilities missing or outside [0, 1] in row(s) 5;" in err
    assert not (d / "metrics.json").exists() and not (d / "predictions.csv").exists()


def test_evaluate_truncated_results_csv_says_truncated(tmp_path, capsys):
    """A results.csv cut short mid-row was 'empty true_class in row(s) N; every lesion of the manifest
    needs a lesion_class' (pandas pads the short row): wrong cause, wrong fix."""
    from liverlesion.errors import UserError
    from liverlesion.predictions import read_predictions

    header = "lesion_id,patient_id,pred_class,prob_cyst,prob_metastasis,status,checkpoint_sha256,true_class\n"
    rows = [
        "p1-L01,p1,cyst,0.7,0.3,classified,abc,cyst\n",
        "p2-L01,p2,metastasis,0.2,0.8,classified,abc,metastasis\n",
        "p3-L01,p3,metastasis,0.1,0.9,classified,abc,metastasis\n",
    ]
    d = tmp_path / "pred"
    d.mkdir()
    full = header + "".join(rows)
    (d / "results.csv").write_text(full[: len(full) - 20])  # cut inside the last row
    rc, _, err = _run(["evaluate", d, "--n-bootstrap", 0, "--no-gradcam"], capsys)
    assert rc != 0 and "Traceback" not in err and "\n" not in err.strip(), err
    assert "results.csv: looks truncated: its last row (file line 4) has 6 of the header's 8 fields" in err
    assert "does not end with a newline" in err and "copy results.csv again" in err
    assert "true_class" not in err
    assert not (d / "metrics.json").exists() and not (d / "predictions.csv").exists()

    (d / "results.csv").write_text(header + rows[0] + rows[1][:30] + "\n" + rows[2])  # a row cut mid-file
    rc, _, err = _run(["evaluate", d, "--n-bootstrap", 0, "--no-gradcam"], capsys)
    assert rc != 0 and "results.csv: file line 3 has 6 fields but the header has 8" in err, err

    p = tmp_path / "predictions.csv"  # a cv run's predictions, read by the same check
    p.write_text(
        "patient_id,lesion_id,true_class,prob_cyst,prob_metastasis,fold\np1,p1-L01,cyst,0.7,0.3,0\np2,p2-L0"
    )
    with pytest.raises(UserError, match=r"predictions\.csv: looks truncated: .* 2 of the header's 6 fields"):
        read_predictions(p)
