"""report.html and plots: self-contained, disclaimed, escaped, redrawn from files."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from liverlesion import DISCLAIMER
from liverlesion.errors import UserError
from liverlesion.evaluate import evaluate_run
from liverlesion.report import load_metrics, render_report

# The synthetic run-folder builders live in test_evaluate.py; load them by path so this works
# whatever pytest's import mode is.
_spec = importlib.util.spec_from_file_location(
    "_ll_eval_helpers", Path(__file__).with_name("test_evaluate.py")
)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

PNG = b"\x89PNG\r\n\x1a\n"


def _data_uris(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory) -> Path:
    test = helpers.synth_predictions(20, n_patients=24)
    run = helpers.write_run(
        tmp_path_factory.mktemp("rep") / "run & co",  # a name that needs escaping
        test,
        helpers.synth_val(21),
        n_bootstrap=30,
        baselines={"mean_hu": helpers.baseline_from(test, 3, 1.2)},
    )
    evaluate_run(run, gradcam=True)  # no fold models / patch cache here: the gallery is skipped with a note
    return run


def test_report_is_self_contained_and_disclaimed(binary_run: Path):
    text = (binary_run / "report.html").read_text(encoding="utf-8")
    assert "Research use, not for diagnosis" in text and DISCLAIMER in text
    images = _data_uris(text)
    assert len(images) >= 5 and all(img.startswith(PNG) for img in images)
    assert not re.search(r"https?://", text), "report must not reference anything online"
    # self-contained: the only script is the inline table sorter, nothing is loaded
    assert not re.search(r"<script[^>]*\bsrc=", text, re.I) and "<link" not in text.lower()
    assert text.lower().count("<script") == 1
    assert "run &amp; co" in text and "run & co" not in text  # escaped
    for section in (
        "Summary",
        "side by side",
        "Per fold",
        "Thresholds and temperatures",
        "By lesion size",
        "Calibration",
        "Grad-CAM gallery",
        "Dataset",
        "Model card",
        "config.yaml",
        "Library versions",
        "Per patient",
        "Per lesion",
        "Run time and hardware",
    ):
        assert section in text, section
    # a table of contents with one working link per section
    ids = re.findall(r'<h2 id="(s\d+)">', text)
    links = re.findall(r'<li><a href="#(s\d+)">', text)
    assert ids and ids == links and text.count("<h2") == len(ids)
    assert "<tr><th></th><th></th></tr>" not in text  # key-value tables (model card) have no empty header
    versions = text.split("Library versions</h2>", 1)[1]
    assert all(pkg in versions for pkg in ("lightning", "SimpleITK", "onnxruntime", "highdicom"))
    assert "0.96" in text and "0.92" in text and "not comparable" in text  # the paper's numbers as context
    assert "Grad-CAM gallery not drawn" in text  # the reason is shown, not hidden
    assert "mean_hu" in text and "Paired patient-bootstrap test" in text


def test_plots_are_written(binary_run: Path):
    for name in ("roc", "pr", "confusion_matrix", "reliability", "size_breakdown", "dataset"):
        png = binary_run / "plots" / f"{name}.png"
        assert png.read_bytes().startswith(PNG), name
    assert not [p for p in (binary_run / "plots").iterdir() if p.name.startswith(".")]


def test_ece_interval_is_not_sold_as_correcting_the_estimates_bias(binary_run: Path):
    """The ECE's shifted interval only brackets the estimate; the estimate stays biased upwards (a
    calibrated model reads ~0.07 on ~220 lesions, its interval excluding the true 0 in ~96 of 100
    cohorts). Was: 'biased upwards ... so its interval is shifted down by the bootstrap's estimate of
    that bias', read as a corrected interval."""
    text = (binary_run / "report.html").read_text(encoding="utf-8")
    assert "does not correct the estimate itself" in text
    assert "not evidence of miscalibration" in text
    settings = json.loads((binary_run / "metrics.json").read_text(encoding="utf-8"))["settings"]
    assert "stays biased upwards" in settings["ci_method"]


def test_cis_that_skipped_one_class_resamples_say_so(binary_run: Path, tmp_path):
    """A CI that left out resamples with one class drawn (AUC undefined) is conditional on both classes;
    metrics.json counted them (n_undefined) but the report never said so for the metric tables."""
    run = tmp_path / "run"
    shutil.copytree(binary_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    for e in metrics["network"]["size"]:
        for v in e.get("metrics", {}).values():
            v["n_undefined"] = 0
    for v in metrics["network"]["metrics"].values():
        v["n_undefined"] = 0
    for f in metrics["network"]["per_fold"].values():
        for v in f["metrics"].values():
            v["n_undefined"] = 0
    render_report(run, metrics=metrics)
    assert "drew one class only" not in (run / "report.html").read_text(encoding="utf-8")
    stratum = next(
        e for e in metrics["network"]["size"] if e.get("metrics", {}).get("roc_auc", {}).get("ci_low")
    )
    stratum["metrics"]["roc_auc"]["n_undefined"] = 7
    render_report(run, metrics=metrics)
    text = (run / "report.html").read_text(encoding="utf-8")
    assert "drew one class only" in text and f"{stratum['bin']} (up to 7)" in text


def test_report_is_redrawn_from_files_without_re_evaluating(binary_run: Path):
    metrics_before = (binary_run / "metrics.json").read_bytes()
    for png in (binary_run / "plots").glob("*.png"):
        png.unlink()
    (binary_run / "report.html").unlink()
    out = render_report(binary_run)
    assert out == binary_run / "report.html" and out.is_file()
    assert (binary_run / "plots" / "roc.png").is_file()
    assert (binary_run / "metrics.json").read_bytes() == metrics_before
    assert len(_data_uris(out.read_text(encoding="utf-8"))) >= 5


def test_report_text_is_escaped(tmp_path):
    classes = ["cyst", "met<b>astasis"]
    test = helpers.synth_predictions(22, n_patients=16, classes=classes)
    run = helpers.write_run(tmp_path / "run", test, None, n_bootstrap=0, classes=classes)
    evaluate_run(run, positive_class="met<b>astasis", gradcam=False)
    text = (run / "report.html").read_text(encoding="utf-8")
    assert "met&lt;b&gt;astasis" in text and "met<b>astasis" not in text


def test_multiclass_report(tmp_path):
    classes = ["cyst", "hcc", "metastasis"]
    test = helpers.synth_predictions(23, n_patients=24, classes=classes)
    run = helpers.write_run(
        tmp_path / "run", test, helpers.synth_val(24, classes=classes), n_bootstrap=30, classes=classes
    )
    m = evaluate_run(run, gradcam=False)
    assert m["task"] == "multiclass"
    text = (run / "report.html").read_text(encoding="utf-8")
    assert "Per class (one vs rest)" in text and "Sensitivity (hcc)" in text
    assert (run / "plots" / "confusion_matrix.png").read_bytes().startswith(PNG)
    assert (
        json.loads((run / "metrics.json").read_text())["network"]["curves"]["positive_class"] == "metastasis"
    )
    # The ROC / PR curves drawn are 'metastasis' vs rest: their legends give that curve's AUC and AP,
    # not the macro AUC over all three classes (and not "AP n/a")
    from liverlesion import plots

    net = m["network"]["metrics"]
    assert plots._curve_metric(m, m["network"], "roc_auc") == net["roc_auc_metastasis"] != net["roc_auc"]
    assert plots._curve_metric(m, m["network"], "pr_auc")["value"] > 0


def test_redraw_without_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="liverlesion evaluate"):
        render_report(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_metrics(tmp_path)
    # valid JSON but not evaluate's (another file, an older or hand-cut one): was a KeyError/TypeError traceback
    for text, expected in (("[]", "no network"), ("{}", "no network"), ('{"network": 5}', "no settings")):
        (tmp_path / "metrics.json").write_text(text)
        with pytest.raises(UserError, match=f"not a metrics.json written by .*{expected}"):
            render_report(tmp_path)


def test_per_lesion_table_and_loss_curves(tmp_path):
    """Every predictions.csv row is in the sortable lesion table; Lightning CSV logs become loss curves."""
    import pandas as pd

    test = helpers.synth_predictions(10, n_patients=8)
    run = helpers.write_run(tmp_path / "run", test, helpers.synth_val(3), n_bootstrap=20)
    log = run / "fold_0" / "logs" / "csv_probe"
    log.mkdir(parents=True)
    pd.DataFrame(
        {
            "epoch": [0, 0, 1, 1],
            "step": [1, 1, 2, 2],
            "train_loss": [0.7, None, 0.5, None],
            "val_loss": [None, 0.6, None, 0.55],
        }
    ).to_csv(log / "metrics.csv", index=False)
    evaluate_run(run, gradcam=False)
    text = (run / "report.html").read_text(encoding="utf-8")
    lesion_table = text.split("Per lesion</h2>", 1)[1].split("</table>", 1)[0]
    preds = pd.read_csv(run / "predictions.csv")
    assert lesion_table.count("<tr>") == len(preds) + 1  # header + one row per lesion
    assert all(str(x) in lesion_table for x in preds["lesion_id"])
    assert "Loss curves</h2>" in text and (run / "plots" / "losses.png").is_file()
    assert "Worst errors</h2>" in text and "no patch cache" in text  # the reason, not a silent gap


def test_worst_errors_gallery_from_the_patch_cache(tmp_path):
    """The most confident mistakes are drawn from the cache; none are drawn when there are none."""
    import json as _json

    import numpy as np
    import pandas as pd

    from liverlesion.plots import plot_worst_errors

    cache = tmp_path / "patches"
    cache.mkdir()
    rows = []
    for i in range(3):
        img = np.full((1, 3, 16, 16), 0.5, np.float32)
        mask = np.zeros((1, 16, 16), np.uint8)
        mask[0, 5:11, 5:11] = 1
        np.savez(cache / f"L{i}.npz", image=img, mask=mask, hu=img[:, 0], meta=_json.dumps({}))
        rows.append({"lesion_id": f"L{i}", "patient_id": f"P{i}", "file": f"L{i}.npz"})
    pd.DataFrame(rows).to_csv(cache / "index.csv", index=False)
    classes = ["cyst", "metastasis"]
    df = pd.DataFrame(
        {
            "lesion_id": ["L0", "L1", "L2"],
            "true_class": ["cyst", "metastasis", "cyst"],
            "pred_class": ["metastasis", "metastasis", "cyst"],
            "prob_cyst": [0.1, 0.2, 0.9],
            "prob_metastasis": [0.9, 0.8, 0.1],
        }
    )
    out = plot_worst_errors(df, classes, cache, tmp_path / "worst.png")
    assert out is not None and out.read_bytes().startswith(b"\x89PNG")
    # shareable alone: the outline explained and the disclaimer on it; titles readable in the report
    from liverlesion import DISCLAIMER, plots

    seen = []
    real = plots._save
    plots_save = lambda fig, out, **kw: (seen.append(fig), real(fig, out, **kw))[1]  # noqa: E731
    import unittest.mock

    with unittest.mock.patch.object(plots, "_save", plots_save):
        plot_worst_errors(df, classes, cache, tmp_path / "worst.png")
    sup = seen[0]._suptitle.get_text()
    assert DISCLAIMER in sup and "orange outline: lesion mask" in sup
    assert all(ax.title.get_fontsize() >= 8 for ax in seen[0].axes)
    right = df.assign(pred_class=df["true_class"])
    assert plot_worst_errors(right, classes, cache, tmp_path / "none.png") is None
    assert plot_worst_errors(df, classes, None, tmp_path / "none.png") is None


def test_report_command_redraws_without_model_code(binary_run: Path, tmp_path):
    """`liverlesion report RUN` rewrites report.html from the files, in a process that never imports torch."""
    import subprocess
    import sys

    before = (binary_run / "report.html").stat().st_mtime_ns
    code = (
        "import sys; from liverlesion.cli import main; rc = main(['report', sys.argv[1]]); "
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH'); sys.exit(rc)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(binary_run)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "NOTORCH" in r.stdout and "research use" in r.stdout
    assert (binary_run / "report.html").stat().st_mtime_ns > before
    bad = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_gradcam_gallery_is_drawn_at_evaluation_and_only_shown_by_report(tmp_path, monkeypatch):
    """evaluate draws plots/gradcam_gallery.png (fold models); report shows that file, drawing nothing."""
    import subprocess
    import sys

    import liverlesion.evaluate as ev

    test = helpers.synth_predictions(30, n_patients=12)
    run = helpers.write_run(tmp_path / "run", test, helpers.synth_val(31), n_bootstrap=0)
    info = json.loads((run / "run.json").read_text())
    (run / "cache").mkdir()
    (run / "run.json").write_text(json.dumps({**info, "patch_dir": "cache"}))
    calls = []

    def fake_gallery(run_dir, shown, patch_dir, max_items, out_png):
        calls.append((Path(patch_dir), max_items, sorted(set(shown["pred_class"]))))
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.write_bytes(PNG + b"gallery")
        return out_png

    monkeypatch.setattr(ev, "gradcam_gallery", fake_gallery)
    evaluate_run(run, gradcam=True)
    assert calls == [(run / "cache", 4, ["cyst", "metastasis"])]
    text = (run / "report.html").read_text(encoding="utf-8")
    assert PNG + b"gallery" in _data_uris(text) and "Grad-CAM gallery not drawn" not in text
    assert "from an earlier run" not in text

    render_report(run)  # the report stage: shows the gallery already on disk, with a note
    text = (run / "report.html").read_text(encoding="utf-8")
    assert PNG + b"gallery" in _data_uris(text) and "not redrawn: --no-gradcam" in text
    # report, plots and their helpers import no model code (Grad-CAM included)
    code = "import sys, liverlesion.report; print(sorted(m for m in sys.modules if m in ('liverlesion.gradcam', 'torch')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_model_card_says_what_the_network_reads_and_what_it_is_fused_with(tmp_path):
    from liverlesion.report_tables import model_rows

    cfg = tmp_path / "config.yaml"
    cfg.write_text("patch:\n  size_px: 160\nmodel:\n  fusion: radiomics_vote\n  features_from: mid\n")
    per_fold = {"per_fold": {"0": {"network_weight": 0.0}, "1": {"network_weight": 0.0}}}
    rows = dict(model_rows(cfg, "inception_v3", per_fold))
    assert "second-to-last stage" in rows["Network"] and "160 px" in rows["Network"]
    assert rows["Training"].startswith("lpft")
    assert "0.00, 0.00" in rows["Fusion"] and "LR and RF baselines' probabilities" in rows["Fusion"]
    assert "soft vote" in rows["Fusion"] and "random forest" in rows["Fusion"]
    mixed = dict(model_rows(cfg, "inception_v3", {"per_fold": {"0": {"network_weight": 0.35}}}))
    assert "0.35" in mixed["Fusion"] and "baselines' probabilities" not in mixed["Fusion"]
    assert "chosen on each fold" in mixed["Fusion"]  # not the default weight: chosen (an older run)
    set_w = {"per_fold": {"0": {"network_weight": 0.2}, "1": {"network_weight": 0.2}}}
    assert "w = 0.2, set by model.fusion_weight" in dict(model_rows(cfg, "inception_v3", set_w))["Fusion"]

    cfg.write_text("model:\n  fusion: none\n  features_from: last\ntrain:\n  recipe: end_to_end\n")
    rows = dict(model_rows(cfg, "inception_v3", {"per_fold": {}}))
    assert "Fusion" not in rows and "as the paper" in rows["Network"] and "end to end" in rows["Training"]
    # no readable config (an external validation folder): the network row alone, nothing invented
    assert [r[0] for r in model_rows(tmp_path / "absent.yaml", "resnet18", {})] == ["Network"]
    cfg.write_text("model: [not, a, mapping\n")
    assert [r[0] for r in model_rows(cfg, "resnet18", {})] == ["Network"]


def test_model_card_names_as_untrained_only_classes_the_model_was_not_trained_on():
    from liverlesion.report import known_limits

    binary = known_limits(["cyst", "metastasis"], external=False)
    assert "such as HCC, haemangioma or FNH are forced" in binary and "No external validation" in binary
    three = known_limits(["cyst", "haemangioma", "metastasis"], external=True)
    assert "haemangioma" not in three.split("such as")[1].split("are forced")[0]
    assert "No external validation" not in three


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda m: m.pop("dataset"), r"dataset missing or of the wrong type"),
        (lambda m: m["network"].pop("size"), r"network.size missing"),
        (lambda m: m["network"].pop("confusion_matrix"), r"network.confusion_matrix missing"),
        (lambda m: m["network"]["threshold"].pop("per_fold"), r"network.threshold.per_fold missing"),
        (lambda m: m.__setitem__("class_names", "cyst"), r"class_names missing or of the wrong type"),
        # deeper damage: caught while drawing, still one line naming the file
        (
            lambda m: m["network"]["metrics"].__setitem__("roc_auc", "high"),
            r"a value is missing .*AttributeError",
        ),
        (lambda m: m["settings"].pop("n_bootstrap"), r"a value is missing .*KeyError: 'n_bootstrap'"),
    ],
)
def test_redraw_from_a_damaged_metrics_json_is_one_line(binary_run: Path, tmp_path, damage, expected):
    """Sections cut out of metrics.json or retyped were KeyError/AttributeError tracebacks."""
    run = tmp_path / "run"
    shutil.copytree(binary_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    damage(metrics)
    (run / "metrics.json").write_text(json.dumps(metrics))
    before = (run / "report.html").read_bytes()
    with pytest.raises(UserError, match=expected) as e:
        render_report(run)
    msg = str(e.value)
    assert "\n" not in msg and "metrics.json" in msg and "liverlesion evaluate" in msg
    assert (run / "report.html").read_bytes() == before  # the old report is kept whole


def test_redraw_from_another_runs_predictions_is_refused(binary_run: Path, tmp_path, capsys):
    # report draws its curves and tables from predictions.csv and its numbers from metrics.json: a
    # predictions.csv copied in from another run drew a report contradicting itself, with exit 0
    import shutil

    from liverlesion.cli import main

    run = tmp_path / "run"
    shutil.copytree(binary_run, run)
    helpers.synth_predictions(99, n_patients=30).to_csv(run / "predictions.csv", index=False)
    before = (run / "report.html").read_bytes()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "predictions.csv: " in err and "metrics.json was computed from" in err and "Traceback" not in err
    assert "re-run `liverlesion evaluate" in err and len(err.strip().splitlines()) == 1
    assert (run / "report.html").read_bytes() == before


def test_note_columns_wrap_and_wide_tables_scroll_inside_the_page(binary_run: Path):
    """The thresholds table's notes were `td.num` (nowrap): at 1300 px the page scrolled sideways.
    Note columns wrap; every table sits in a box that scrolls itself, never the page."""
    from liverlesion.report_tables import CSS

    text = (binary_run / "report.html").read_text(encoding="utf-8")
    assert ".wide{max-width:100%;overflow-x:auto}" in CSS and "td.text{white-space:normal" in CSS
    thresholds = text.split("Thresholds and temperatures</h2>", 1)[1].split("</table>", 1)[0]
    assert "<div class=wide><table>" in thresholds
    first = re.search(r"<tbody><tr>(.*?)</tr>", thresholds).group(1)
    cells = re.findall(r"<td( class=\w+)?>", first)
    assert cells[2] == cells[5] == " class=text" and cells[1] == " class=num"
    assert text.count("<table") == text.count("<div class=wide><table") + text.count("<div class=scroll>")


def _drawn(monkeypatch, draw, *args):
    """The matplotlib figure a plots.plot_* function saves (captured, not read back from the PNG)."""
    from liverlesion import plots

    figs = []
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, out, **kw: (figs.append(fig), real(fig, out, **kw))[1])
    draw(*args)
    return figs[-1]


def test_roc_and_pr_legends_explain_bands_and_keep_the_disclaimer_visible(binary_run, monkeypatch, tmp_path):
    """The ROC's disclaimer sat in the axes' lower right, under the legend; the shading was explained
    only in the report's caption, not in a PNG shared alone."""
    from liverlesion import DISCLAIMER, plots

    metrics = json.loads((binary_run / "metrics.json").read_text(encoding="utf-8"))
    for draw in (plots.plot_roc, plots.plot_pr):
        fig = _drawn(monkeypatch, draw, metrics, tmp_path / "c.png")
        ax = fig.axes[0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "shaded: 95% patient-bootstrap band" in legend
        assert any(t.startswith("network:") for t in legend) and any(t.startswith("mean_hu:") for t in legend)
        assert "95% CI" in ax.get_legend().get_title().get_text()
        assert fig._supxlabel.get_text() == DISCLAIMER  # below the axes, laid out with them
        assert not any(DISCLAIMER in t.get_text() for t in ax.texts)
    roc = _drawn(monkeypatch, plots.plot_roc, metrics, tmp_path / "r.png")
    assert "chance (AUC 0.5)" in [t.get_text() for t in roc.axes[0].get_legend().get_texts()]


def test_reliability_before_stays_visible_under_after(binary_run, monkeypatch, tmp_path):
    """'after' was drawn in the same style exactly over 'before' (all temperatures 1): one curve seen."""
    from liverlesion import plots

    net = json.loads((binary_run / "metrics.json").read_text(encoding="utf-8"))["network"]
    net["calibration"]["after"] = net["calibration"]["before"]
    fig = _drawn(monkeypatch, plots.plot_reliability, net, tmp_path / "rel.png")
    ax = fig.axes[0]
    before, after = ax.lines[1], ax.lines[2]
    assert before.get_markerfacecolor() == "none" and before.get_markersize() > after.get_markersize()
    assert before.get_linestyle() != after.get_linestyle()
    assert "same as before" in after.get_label() and ax.get_xlabel()
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()][0] == "before"


def test_dataset_size_and_loss_plots_label_what_they_show(binary_run, monkeypatch, tmp_path):
    """Axes with units, the size bins' edges and the positive class named; the dataset panel says its
    count includes the lesions too small to characterise (the report's counts leave them out)."""
    import pandas as pd

    from liverlesion import plots

    metrics = json.loads((binary_run / "metrics.json").read_text(encoding="utf-8"))
    net = metrics["network"]
    fig = _drawn(monkeypatch, plots.plot_size, net, tmp_path / "s.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "maximal axial diameter (mm)" and ax.get_ylabel() == "metric value"
    assert net["positive_class"] in ax.get_legend().get_title().get_text()
    df = pd.DataFrame(
        {
            "patient_id": ["a", "a", "b"],
            "true_class": net["class_names"][:2] + net["class_names"][:1],
            "status": ["classified", "classified", "too small to characterise"],
            "max_axial_diameter_mm": [4.0, 12.0, 25.0],
        }
    )
    fig = _drawn(monkeypatch, plots.plot_dataset, df, net["class_names"], tmp_path / "d.png")
    assert "incl. 1 too small to characterise" in fig.axes[0].get_title()
    assert "size bins: 10, 20 mm" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
