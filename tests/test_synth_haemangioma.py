"""The synthetic haemangioma class and the cohort's class list (``synth --classes``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from liverlesion.errors import UserError
from liverlesion.synth import (
    BLOOD_POOL_HU,
    allocate_lesions,
    class_counts,
    generate_cohort,
    parse_classes,
    simulate_patient,
)


def _zones(pat, label: int) -> dict[str, float]:
    """Mean HU of the outer third, the inner third of the lesion (largest slice) and the liver around it."""
    m = pat.labels == label
    z = int(np.argmax(m.sum((1, 2))))
    mm, hu = m[z], pat.hu[z].astype(float)
    d_in = ndimage.distance_transform_edt(mm)
    r = d_in / d_in.max()
    d_out = ndimage.distance_transform_edt(~mm)
    return {
        "rim": float(hu[mm & (r < 0.34)].mean()),
        "centre": float(hu[mm & (r >= 0.67)].mean()),
        "liver": float(np.median(hu[(d_out > 2) & (d_out < 6) & pat.liver[z]])),
        "rim_max": float(np.percentile(hu[mm & (r < 0.34)], 90)),
    }


def test_haemangioma_enhances_peripherally_near_the_blood_pool():
    pat = simulate_patient("h", ["haemangioma"] * 4, seed=[7, 0], matrix=192)
    big = [les for les in pat.lesions if les.diameter_mm >= 12]
    assert big, [les.diameter_mm for les in pat.lesions]
    for les in big:
        z = _zones(pat, les.label)
        assert BLOOD_POOL_HU[0] <= les.design_hu <= BLOOD_POOL_HU[1]
        # peripheral enhancement brighter than the partly filled centre and than the liver
        assert z["rim"] > z["centre"] + 15, (les, z)
        assert z["rim"] > z["liver"], (les, z)
        assert z["rim_max"] > 125, (les, z)  # near blood pool after partial volume and blur
        assert 40 < z["centre"] < 130, (les, z)
        assert les.lobulation < 0.05 and les.margin_mm < 1.0  # well defined


def test_haemangioma_differs_from_cysts_and_metastases():
    pat = simulate_patient("m", ["haemangioma", "cyst", "metastasis"], seed=[11, 0], matrix=192)
    mean = {les.lesion_class: pat.hu[pat.labels == les.label].mean() for les in pat.lesions}
    assert mean["haemangioma"] > mean["metastasis"] and mean["haemangioma"] > mean["cyst"]


def test_parse_classes():
    assert parse_classes(None) == ("metastasis", "cyst")
    assert parse_classes(" metastasis, cyst ,haemangioma") == ("metastasis", "cyst", "haemangioma")
    for bad, match in [
        ("metastasis,hcc", "unknown class 'hcc'"),
        ("cyst,cyst", "given twice"),
        ("cyst", "at least two"),
        ("", "at least two"),
    ]:
        with pytest.raises(UserError, match=match):
            parse_classes(bad)


def test_class_counts_exact_and_every_class_present():
    c = class_counts(("metastasis", "cyst", "haemangioma"), 26)
    assert sum(c.values()) == 26 and c == {"metastasis": 12, "cyst": 8, "haemangioma": 6}
    assert min(class_counts(("metastasis", "cyst", "haemangioma"), 3).values()) == 1


def test_default_allocation_unchanged_by_class_setting():
    a = allocate_lesions(np.random.default_rng(4), 5, 17)
    b = allocate_lesions(np.random.default_rng(4), 5, 17, ("cyst", "metastasis"))
    assert a == b
    three = allocate_lesions(np.random.default_rng(4), 5, 17, ("metastasis", "cyst", "haemangioma"))
    assert [len(x) for x in three] == [len(x) for x in a]
    flat = [c for x in three for c in x]
    assert {c: flat.count(c) for c in set(flat)} == class_counts(("metastasis", "cyst", "haemangioma"), 17)


def test_three_class_cohort(tmp_path):
    out = tmp_path / "c3"
    s = generate_cohort(
        out, patients=3, lesions=6, seed=0, workers=1, matrix=96, classes="metastasis,cyst,haemangioma"
    )
    man = pd.read_csv(out / "manifest.csv")
    assert set(man["lesion_class"]) == {"metastasis", "cyst", "haemangioma"}
    assert set(s["classes"]) == {"metastasis", "cyst", "haemangioma"}
    truth = pd.read_csv(out / "lesions_truth.csv")
    assert truth.loc[truth.lesion_class == "haemangioma", "fill"].between(0.2, 1.0).all()


def test_cli_unknown_class_is_one_line(tmp_path, capsys):
    from liverlesion.cli import main

    rc = main(
        ["synth", "-o", str(tmp_path / "c"), "--patients", "1", "--lesions", "2", "--classes", "cyst,fnh"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--classes" in err and "fnh" in err and "\n" not in err
    assert not (tmp_path / "c").exists()
