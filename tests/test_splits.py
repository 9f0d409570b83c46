"""Patient-level splits: no patient crosses folds; written once and reused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from liverlesion.errors import UserError
from liverlesion.splits import check_splits, load_or_create_splits, make_splits


def _table(n_patients: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for _ in range(rng.integers(1, 7)):  # several lesions per patient, as in the paper (~3.7)
            rows.append({"patient_id": f"P{p:03d}", "lesion_class": rng.choice(["metastasis", "cyst"])})
    return pd.DataFrame(rows)


def test_no_patient_in_two_folds_and_all_covered():
    table = _table()
    s = make_splits(table, folds=5, seed=0)
    tests = [set(f["test_patients"]) for f in s["splits"]]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not tests[i] & tests[j]
    assert set().union(*tests) == set(table["patient_id"])
    for f in s["splits"]:
        assert not set(f["train_patients"]) & set(f["test_patients"])
        assert not set(f["val_patients"]) & set(f["test_patients"])
        assert not set(f["train_patients"]) & set(f["val_patients"])
        # every non-test patient is either in inner-train or inner-val
        assert set(f["train_patients"]) | set(f["val_patients"]) | set(f["test_patients"]) == set(
            table["patient_id"]
        )


def test_check_splits_catches_leak():
    s = make_splits(_table(), folds=4, seed=1)
    s["splits"][1]["test_patients"].append(s["splits"][0]["test_patients"][0])
    with pytest.raises(UserError, match="fold 1"):
        check_splits(s)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s["splits"][1]["test_patients"].append(s["splits"][0]["test_patients"][0]),
        lambda s: s["splits"][0]["train_patients"].append(s["splits"][0]["test_patients"][0]),
        lambda s: s["splits"][0].pop("val_patients"),
        lambda s: s.pop("splits"),
        lambda s: s["splits"][0].update(test_patients="P001"),
    ],
)
def test_edited_splits_file_is_user_error_naming_it(tmp_path, edit):
    table = _table()
    path = tmp_path / "splits.json"
    s = load_or_create_splits(path, table, folds=4, seed=0)
    edit(s)
    path.write_text(json.dumps(s))
    with pytest.raises(UserError, match="splits.json"):
        load_or_create_splits(path, table, folds=4, seed=0)


def test_written_once_and_reused(tmp_path):
    table = _table()
    path = tmp_path / "splits.json"
    first = load_or_create_splits(path, table, folds=5, seed=0)
    # A different seed must not silently change existing splits.
    second = load_or_create_splits(path, table, folds=5, seed=123)
    assert first == second == json.loads(path.read_text())


def test_mismatched_existing_splits_is_user_error(tmp_path):
    path = tmp_path / "splits.json"
    load_or_create_splits(path, _table(), folds=5, seed=0)
    with pytest.raises(UserError, match="do not match"):
        load_or_create_splits(path, _table(), folds=3, seed=0)


def test_too_few_patients():
    with pytest.raises(UserError, match="at most 3 folds"):
        make_splits(_table(n_patients=3), folds=5)


def _one_lesion_each(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": [f"P{i}" for i in range(n)],
            "lesion_class": [["cyst", "metastasis"][i % 2] for i in range(n)],
        }
    )


def test_inner_split_is_capped_by_the_lesions_per_class():
    """8 patients with one lesion each: 3 lesions per class in a training fold, fewer than 5 inner splits."""
    s = make_splits(_one_lesion_each(8), folds=4, seed=0)
    for f in s["splits"]:
        assert f["train_patients"] and f["val_patients"] and f["test_patients"]
    assert sorted(p for f in s["splits"] for p in f["test_patients"]) == sorted(f"P{i}" for i in range(8))


def test_more_folds_than_lesions_per_class_is_a_user_error():
    with pytest.raises(UserError, match=r"cv.folds=5: the largest class .* 4 lesion\(s\).* at most 4 folds"):
        make_splits(_one_lesion_each(8), folds=5)


@pytest.mark.parametrize(
    ("val_fraction", "expected"), [(0.2, 5), (0.25, 4), (0.5, 2), (0.9, 2), (0.1, 10), (0.0, 1000000)]
)
def test_inner_split_count(val_fraction, expected):
    from liverlesion.splits import inner_split_count

    assert inner_split_count(val_fraction) == expected


def _lesion_counts(table: pd.DataFrame, patients: list[str]) -> dict[str, int]:
    return table[table["patient_id"].isin(patients)]["lesion_class"].value_counts().to_dict()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_are_stratified_by_class_whatever_the_seed(seed):
    """40 one-lesion patients, 20 per class, 5 folds: every test fold holds exactly 4 of each class.

    scikit-learn's ``StratifiedGroupKFold(shuffle=True)`` up to 1.7 pairs each patient with another
    patient's class counts (scikit-learn issue #32478), so its folds were a random draw instead."""
    table = _one_lesion_each(40)
    s = make_splits(table, folds=5, seed=seed)
    for f in s["splits"]:
        assert _lesion_counts(table, f["test_patients"]) == {"cyst": 4, "metastasis": 4}
        # the inner validation split of the 32 training patients is stratified too (a fifth: 3-4 each)
        assert set(_lesion_counts(table, f["val_patients"]).values()) <= {3, 4}


def test_folds_have_similar_sizes_with_patients_of_mostly_one_class():
    """Three classes, patients of 1-12 lesions mostly of one class (as in clinical cohorts and ``synth``):
    no test fold is less than half or more than 1.5 times the mean, and each holds every class."""
    rng = np.random.default_rng(3)
    classes = ["metastasis", "cyst", "haemangioma"]
    rows = []
    for p in range(24):
        own = classes[p % 3]
        for _ in range(int(rng.integers(1, 7)) if p else 12):
            cls = own if rng.random() < 0.8 else classes[int(rng.integers(3))]
            rows.append({"patient_id": f"P{p:03d}", "lesion_class": cls})
    table = pd.DataFrame(rows)
    s = make_splits(table, folds=5, seed=0)
    sizes = [len(table[table["patient_id"].isin(f["test_patients"])]) for f in s["splits"]]
    mean = len(table) / 5
    assert 0.5 * mean <= min(sizes) and max(sizes) <= 1.5 * mean, sizes
    for f in s["splits"]:
        assert set(_lesion_counts(table, f["test_patients"])) == set(classes)


def test_fold_classes_refuse_a_one_class_training_set_and_pass_a_mixed_one():
    from liverlesion.splits import check_fold_classes

    lesions = pd.DataFrame(
        {
            "patient_id": ["a", "a", "b", "c", "d"],
            "lesion_class": ["cyst", "metastasis", "metastasis", "cyst", "cyst"],
        }
    )
    mixed = {
        "folds": 2,
        "splits": [{"fold": 0, "train_patients": ["a"], "val_patients": ["b"], "test_patients": ["c"]}],
    }
    check_fold_classes(mixed, lesions)  # patient a alone holds both classes
    one = {
        "folds": 2,
        "splits": [{"fold": 1, "train_patients": ["c", "d"], "val_patients": ["a"], "test_patients": ["b"]}],
    }
    with pytest.raises(
        UserError, match=r"cv.folds=2: fold 1's training patients \(2, .*one class only \('cyst'\)"
    ):
        check_fold_classes(one, lesions)


def test_train_split_names_train_val_fraction_not_folds():
    # train has no folds: make_splits said "cv.folds=5: ... use at most 4 folds" (the API) or, for
    # patients that pass that check, "cv.folds=2: fold 0's training patients have one lesion per class"
    from liverlesion.splits import make_train_split

    with pytest.raises(UserError) as e:
        make_train_split(_one_lesion_each(4), 0.2, source="manifest m.csv")
    msg = str(e.value)
    assert msg.startswith("manifest m.csv: 4 patient(s) with 4 lesion(s)") and "cv.folds" not in msg
    assert "train.val_fraction=0.2" in msg and "--set train.val_fraction=0.5" in msg
    with pytest.raises(UserError, match=r"2 patient\(s\).*add patients \(at least 3"):
        make_train_split(_one_lesion_each(2), 0.5)
    with pytest.raises(UserError, match="only one class"):
        make_train_split(_one_lesion_each(4).assign(lesion_class="cyst"), 0.5)
    s = make_train_split(_one_lesion_each(4), 0.5, seed=0)  # was refused by make_splits' unused inner splits
    assert len(s["val_patients"]) == 2 and sorted(s["train_patients"] + s["val_patients"]) == [
        f"P{i}" for i in range(4)
    ]


@pytest.mark.parametrize("seed", [0, 3])
def test_train_split_holds_out_the_patients_it_always_did(seed):
    # the first of round(1 / val_fraction) patient groups, as train drew it from make_splits' first fold
    from liverlesion.splits import inner_split_count, make_train_split

    table = _table(seed=seed)
    fold = make_splits(table, inner_split_count(0.2), seed, 0.2)["splits"][0]
    s = make_train_split(table, 0.2, seed)
    assert s == {
        "group": "patient_id",
        "train_patients": sorted(fold["train_patients"] + fold["val_patients"]),
        "val_patients": fold["test_patients"],
    }
