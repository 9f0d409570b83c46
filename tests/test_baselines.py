"""Baselines: features from the patch cache, patient-level folds, predictions format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import liverlesion.baselines as bl
from liverlesion.baselines import BASELINES as ALL_BASELINES
from liverlesion.baselines import run_baselines
from liverlesion.errors import UserError
from liverlesion.features import extract_features, lesion_features
from liverlesion.splits import make_splits

SIZE = 48

# frozen_lr needs frozen deep features (given by cv, or by the CLI with ImageNet weights)
BASELINES = tuple(b for b in ALL_BASELINES if b != "frozen_lr")


def _lesion_patch(rng: np.random.Generator, kind: str, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """A (1, H, W) HU patch in liver (~110 HU) with a metastasis-like or cyst-like lesion."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    r = np.hypot(yy, xx)
    hu = 110 + rng.normal(0, 8, (SIZE, SIZE))
    if kind == "metastasis":  # heterogeneous soft tissue, lobulated, ill-defined
        theta = np.arctan2(yy, xx)
        edge = radius_px * (1 + 0.2 * np.sin(3 * theta + rng.uniform(0, 6)))
        w = np.clip((edge - r) / 3 + 0.5, 0, 1)
        tissue = 60 + rng.normal(0, 25, (SIZE, SIZE))
    elif kind == "cyst":  # water, homogeneous, sharp
        edge = np.full_like(r, radius_px)
        w = (r < edge).astype(float)
        tissue = 8 + rng.normal(0, 3, (SIZE, SIZE))
    else:  # "random": one generator for every class
        edge = radius_px * (1 + 0.1 * np.sin(2 * np.arctan2(yy, xx)))
        w = np.clip((edge - r) / 1.5 + 0.5, 0, 1)
        tissue = 40 + rng.normal(0, 15, (SIZE, SIZE))
    hu = hu * (1 - w) + tissue * w
    mask = (w >= 0.5).astype(np.uint8)
    return hu[None].astype(np.float32), mask[None]


def _write_cache(
    folder: Path,
    n_patients: int,
    per_patient: int,
    seed: int,
    separable: bool,
    classes=("cyst", "metastasis"),
) -> pd.DataFrame:
    """A patch cache in the ARCHITECTURE.md layout: index.csv + one npz per lesion (image, mask, hu, meta)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        pid = f"P{p:02d}"
        for k in range(per_patient):
            cls = classes[(p + k) % len(classes)]
            radius = rng.uniform(6, 16)
            hu, mask = _lesion_patch(rng, cls if separable else "random", radius)
            pixel_mm = 0.5
            image = np.clip((hu - (60 - 125)) / 250, 0, 1)[:, None]  # (S=1, C=1, H, W)
            lid = f"{pid}-L{k + 1:02d}"
            meta = json.dumps({"pixel_mm": pixel_mm})
            np.savez_compressed(folder / f"{lid}.npz", image=image, mask=mask, hu=hu, meta=np.array(meta))
            area_mm2 = mask.sum() * pixel_mm**2
            d = 2 * np.sqrt(area_mm2 / np.pi)
            rows.append(
                {
                    "lesion_id": lid,
                    "patient_id": pid,
                    "lesion_class": cls,
                    "n_voxels": int(mask.sum()),
                    "volume_ml": round(area_mm2 * d / 1000, 4),
                    "max_axial_diameter_mm": round(d, 3),
                    "min_axis_mm": round(d * 0.9, 3),
                    "hu_mean": float(hu[mask > 0].mean()),
                    "hu_std": float(hu[mask > 0].std()),
                    "file": f"{lid}.npz",
                    "patch_pixel_mm": pixel_mm,
                }
            )
    index = pd.DataFrame(rows)
    index.to_csv(folder / "index.csv", index=False)
    (folder / "settings.json").write_text(json.dumps({"window_center": 60.0, "window_width": 250.0}))
    return index


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sep") / "patches"
    index = _write_cache(folder, n_patients=18, per_patient=3, seed=0, separable=True)
    return index, folder, make_splits(index, folds=3, seed=0)


@pytest.fixture
def small_forest(monkeypatch):
    """Fewer trees where the forest's size does not matter to the test (speed on shared CPUs)."""
    monkeypatch.setattr(bl, "RF_TREES", 40)


def _youden_j(x: pd.Series, y: pd.Series, cut: float) -> float:
    return ((x > cut) & y).sum() / y.sum() + ((x <= cut) & ~y).sum() / (~y).sum()


def _auc(df: pd.DataFrame, positive: str = "metastasis") -> float:
    return roc_auc_score(df["true_class"] == positive, df[f"prob_{positive}"])


def test_separable_toy_set_scores_high(tmp_path, separable):
    index, folder, splits = separable
    paths = run_baselines(index, folder, splits, tmp_path / "b", positive_class="metastasis", seed=0)
    assert set(paths) == set(BASELINES)
    for name, path in paths.items():
        df = pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str})
        expected = [
            "patient_id",
            "lesion_id",
            "true_class",
            "prob_cyst",
            "prob_metastasis",
            "pred_class",
            "fold",
            "max_axial_diameter_mm",
            "volume_ml",
        ]
        assert list(df.columns) == expected
        # every lesion predicted exactly once, out of fold
        assert sorted(df["lesion_id"]) == sorted(index["lesion_id"])
        assert np.allclose(df[["prob_cyst", "prob_metastasis"]].sum(1), 1, atol=1e-5)
        assert set(df["pred_class"]) <= {"cyst", "metastasis"}
        fold_of = {p: s["fold"] for s in splits["splits"] for p in s["test_patients"]}
        assert (df["fold"] == df["patient_id"].map(fold_of)).all()
        assert _auc(df) > 0.9, name
        assert (df["pred_class"] == df["true_class"]).mean() > 0.8, name
        val = pd.read_csv(path.parent / "val_predictions.csv", dtype={"patient_id": str})
        val_p = {p for s in splits["splits"] for p in s["val_patients"]}
        assert set(val["patient_id"]) <= val_p and len(val) > 0
        info = json.loads((path.parent / "baseline.json").read_text())
        assert info["disclaimer"] and info["features"]
    feats = pd.read_csv(tmp_path / "b" / "features.csv")
    assert {
        "fo_mean",
        "fo_entropy",
        "glcm_contrast",
        "glcm_homogeneity",
        "shape_circularity",
        "volume_ml",
    } <= set(feats.columns)


def test_random_toy_set_scores_chance(tmp_path, small_forest):
    folder = tmp_path / "patches"
    index = _write_cache(folder, n_patients=24, per_patient=3, seed=1, separable=False)
    splits = make_splits(index, folds=3, seed=0)
    paths = run_baselines(index, folder, splits, tmp_path / "b", seed=0)
    for name, path in paths.items():
        auc = _auc(pd.read_csv(path))
        assert 0.2 < auc < 0.8, (name, auc)


def test_no_test_patient_in_training(tmp_path, separable, monkeypatch, small_forest):
    index, folder, splits = separable
    calls = []
    real = bl.fit_predict

    def spy(name, features, classes, positive, seed, train, predict):
        calls.append((name, set(train["patient_id"]), set(predict["patient_id"])))
        return real(name, features, classes, positive, seed, train, predict)

    monkeypatch.setattr(bl, "fit_predict", spy)
    run_baselines(index, folder, splits, tmp_path / "b")
    by_fold = {frozenset(s["test_patients"]): s for s in splits["splits"]}
    n_test_calls = 0
    for _, train_p, pred_p in calls:
        assert not train_p & pred_p
        s = by_fold.get(frozenset(pred_p))
        if s is not None:  # a test prediction: trained on the fold's train + val patients
            assert train_p == set(s["train_patients"]) | set(s["val_patients"])
            n_test_calls += 1
        else:  # an inner-validation prediction: trained on train patients only
            s = next(s for s in splits["splits"] if pred_p <= set(s["val_patients"]))
            assert train_p == set(s["train_patients"])
    assert n_test_calls == len(BASELINES) * len(splits["splits"])


def test_leaky_splits_are_refused(tmp_path, separable):
    index, folder, splits = separable
    leaky = json.loads(json.dumps(splits))
    leaky["splits"][0]["train_patients"].append(leaky["splits"][0]["test_patients"][0])
    with pytest.raises(AssertionError, match="test patient"):
        run_baselines(index, None, leaky, tmp_path / "b")


def test_mean_hu_threshold_from_training_patients_only(tmp_path, separable):
    index, _, splits = separable
    paths = run_baselines(index, None, splits, tmp_path / "b")
    assert set(paths) == {"mean_hu"}
    info = json.loads((tmp_path / "b" / "mean_hu" / "baseline.json").read_text())
    preds = pd.read_csv(paths["mean_hu"], dtype={"patient_id": str})
    for s, f in zip(splits["splits"], info["folds"], strict=True):
        train = index[index["patient_id"].isin(s["train_patients"] + s["val_patients"])]
        t = f["threshold_hu"]
        assert f["positive_above"]  # metastases are denser than cysts here
        # the cut separates the training lesions as well as any cut can (Youden's J)
        y = train["lesion_class"] == "metastasis"
        x = train["hu_mean"]
        assert _youden_j(x, y, t) >= max(_youden_j(x, y, c) for c in x) - 1e-9
        test_rows = index[index["patient_id"].isin(s["test_patients"])].set_index("lesion_id")
        fold_preds = preds[preds["fold"] == s["fold"]].set_index("lesion_id")
        expected = np.where(test_rows.loc[fold_preds.index, "hu_mean"] > t, "metastasis", "cyst")
        assert (fold_preds["pred_class"].to_numpy() == expected).all()
    assert _auc(preds) > 0.9


def test_three_classes(tmp_path, small_forest):
    folder = tmp_path / "patches"
    index = _write_cache(folder, 15, 3, seed=2, separable=False, classes=("cyst", "hemangioma", "metastasis"))
    splits = make_splits(index, folds=3, seed=0)
    paths = run_baselines(index, folder, splits, tmp_path / "b")
    df = pd.read_csv(paths["radiomics_lr"])
    cols = ["prob_cyst", "prob_hemangioma", "prob_metastasis"]
    assert all(c in df.columns for c in cols)
    assert np.allclose(df[cols].sum(1), 1, atol=1e-5)


def test_lesion_features_respond_to_texture_and_margin():
    rng = np.random.default_rng(0)
    met = lesion_features(*_lesion_patch(rng, "metastasis", 12), pixel_mm=0.5)
    cyst = lesion_features(*_lesion_patch(rng, "cyst", 12), pixel_mm=0.5)
    assert met["fo_std"] > 3 * cyst["fo_std"]
    assert met["glcm_contrast"] > cyst["glcm_contrast"]
    assert cyst["glcm_homogeneity"] > met["glcm_homogeneity"]
    assert cyst["fo_mean"] < 20 < met["fo_mean"]
    assert cyst["shape_circularity"] > met["shape_circularity"]
    assert cyst["margin_contrast_hu"] < met["margin_contrast_hu"] < 0
    assert all(np.isfinite(v) for v in met.values())


def test_feature_errors(tmp_path, separable):
    _, folder, _ = separable
    with pytest.raises(UserError, match="mask is empty"):
        lesion_features(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), 1.0)
    with pytest.raises(UserError, match="extractor"):
        extract_features(folder, extractor="nope")
    with pytest.raises(UserError, match="index.csv"):
        extract_features(tmp_path)
    try:
        import radiomics  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="PyRadiomics is not installed"):
            extract_features(folder, extractor="pyradiomics")


def test_input_errors(tmp_path, separable):
    index, folder, splits = separable
    with pytest.raises(UserError, match="positive class"):
        run_baselines(index, None, splits, tmp_path / "b", positive_class="hcc")
    with pytest.raises(UserError, match="in no test fold"):
        extra = pd.concat([index, index.iloc[[0]].assign(patient_id="NEW", lesion_id="NEW-L01")])
        run_baselines(extra, None, splits, tmp_path / "b")
    with pytest.raises(UserError, match="only one class"):
        run_baselines(index.assign(lesion_class="cyst"), None, splits, tmp_path / "b")
    missing = index[index["lesion_id"] != index["lesion_id"].iloc[0]].copy()
    missing["file"] = "../patches/" + missing["file"]
    (folder.parent / "partial").mkdir()
    missing.to_csv(folder.parent / "partial" / "index.csv", index=False)
    with pytest.raises(UserError, match="no patch for lesion"):
        run_baselines(index, folder.parent / "partial", splits, tmp_path / "b")
    one_class_train = index.copy()
    s0 = splits["splits"][0]
    # every training patient of fold 0 gets the same class: nothing to learn from
    train_p = set(s0["train_patients"]) | set(s0["val_patients"])
    one_class_train.loc[one_class_train["patient_id"].isin(train_p), "lesion_class"] = "cyst"
    with pytest.raises(UserError, match="fold 0"):
        run_baselines(one_class_train, None, splits, tmp_path / "b")


def test_cli_end_to_end_on_synthetic_cohort(tmp_path, capsys, small_forest):
    from liverlesion.cli import main
    from liverlesion.synth import generate_cohort

    generate_cohort(tmp_path / "cohort", patients=6, lesions=16, seed=2, matrix=192)
    capsys.readouterr()
    out = tmp_path / "run"
    args = ["baselines", str(tmp_path / "cohort" / "manifest.csv"), str(out)]
    assert (
        main(
            [
                *args,
                "--set",
                "cv.folds=2",
                "--set",
                "eval.n_bootstrap=20",
                "--set",
                "patch.size_px=32",
                "--set",
                "model.weights=none",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert all(name in printed for name in BASELINES) and "research use" in printed
    splits = json.loads((out / "splits.json").read_text())
    for name in BASELINES:
        df = pd.read_csv(out / "baselines" / name / "predictions.csv", dtype={"patient_id": str})
        assert len(df) == 16
        for s in splits["splits"]:
            assert set(df.loc[df["fold"] == s["fold"], "patient_id"]) <= set(s["test_patients"])
    summary = json.loads((out / "baselines" / "summary.json").read_text())
    assert set(summary["baselines"]) == set(BASELINES) and summary["disclaimer"]


def test_cli_missing_manifest(tmp_path, capsys):
    from liverlesion.cli import main

    assert main(["baselines", str(tmp_path / "nope.csv"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.csv" in err and "\n" not in err


def test_baselines_into_a_run_of_other_lesions_are_refused(tmp_path, capsys):
    """Baselines of another cohort in a cv run folder: evaluate then said "radiomics_lr: no rows"."""
    from liverlesion.baselines import check_run_folder
    from liverlesion.cli import main
    from liverlesion.synth import generate_cohort

    generate_cohort(tmp_path / "cohort", patients=4, lesions=8, seed=2, matrix=96)
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame(
        {"patient_id": ["other01", "syn001"], "lesion_id": ["other01-L01", "syn001-L01"], "fold": [0, 1]}
    ).to_csv(run / "predictions.csv", index=False)
    capsys.readouterr()
    # before any work: the run's patients are not this manifest's
    assert main(["baselines", str(tmp_path / "cohort" / "manifest.csv"), "-o", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "patients not in this manifest (other01)" in err and "-o" in err
    assert sorted(p.name for p in run.iterdir()) == ["predictions.csv"]  # no patches, no splits
    # after the patch index: the same patients, other lesions
    with pytest.raises(UserError, match=r"has 2 lesions, this manifest 3, 3 in only one of them"):
        check_run_folder(run, lesions={"syn001-L02", "syn001-L03", "other01-L01"})
    check_run_folder(run, patients={"other01", "syn001", "syn002"}, lesions={"other01-L01", "syn001-L01"})
    check_run_folder(tmp_path / "new", patients={"x"}, lesions={"x-L01"})  # no run there: nothing to match
