"""``liverlesion predict``: classify lesions in a new study and write the results folder.

``predict_cli`` checks every option, loads the :class:`~liverlesion.classifier.Classifier`
(one or more checkpoints), classifies an image's lesions (mask or click) or every image of a
manifest through :meth:`Classifier.classify_case <liverlesion.classifier.Classifier.classify_case>`
/ :meth:`~liverlesion.classifier.Classifier.classify_manifest`, and writes ``results.csv``,
``results.json``, overlay PNGs and, when asked, the DICOM SR and SEG, all at once.

``from liverlesion.predict import Classifier`` (the Python API) keeps working: the public
names of the split modules are imported here.

Outputs are research results, not a diagnosis; every file says so.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from liverlesion.case_input import check_ct_volume, check_min_size, parse_point
from liverlesion.classifier import Classifier
from liverlesion.click import check_diameter
from liverlesion.decision import TOO_SMALL
from liverlesion.dicom_seg import seg_mask, segment_of, union_if_several
from liverlesion.domain import format_domain
from liverlesion.errors import UserError
from liverlesion.fileio import atomic_dir, check_out_spares_inputs, write_csv, write_json
from liverlesion.io import read_volume
from liverlesion.lesions import lesion_source_problem
from liverlesion.overlay import draw_lesion_overlay
from liverlesion.results import (
    CaseResult,
    LesionResult,
    Results,
    format_results,
    result_columns,
    results_info,
    safe_name,
)
from liverlesion.runtime import resolve_threads
from liverlesion.seg_select import check_cli_mask_label
from liverlesion.seg_write import check_seg_source, write_seg
from liverlesion.sr import check_sr_inputs, check_sr_source, write_sr

__all__ = [
    "CaseResult",
    "Classifier",
    "LesionResult",
    "Results",
    "format_results",
    "TOO_SMALL",
    "check_ct_volume",
    "draw_lesion_overlay",
    "parse_point",
    "predict_cli",
    "result_columns",
    "results_info",
    "safe_name",
]


def _warn_unknown_classes(manifest: Path, classes: Sequence[str]) -> None:
    """Say before classifying when the manifest's lesion_class holds a class the model does not know.

    Those lesions are classified anyway (the model answers with its own classes), but ``evaluate`` of
    the output refuses them, so a misspelt class would otherwise surface only after the whole batch.
    """
    from liverlesion.manifest import read_manifest  # also validates the manifest before any work

    given = read_manifest(manifest, need_class=False)["lesion_class"].astype(str)
    unknown = sorted(set(given) - set(classes) - {""})  # "": a case without a diagnosis, nothing to check
    if unknown:
        n = int(given.isin(unknown).sum())
        print(
            f"liverlesion predict: warning: --manifest {manifest}: lesion_class "
            f"{', '.join(map(repr, unknown))} ({n} row{'s' if n != 1 else ''}) is not a class of the model "
            f"({', '.join(classes)}); those lesions are classified anyway, but `liverlesion evaluate` of "
            "this output will refuse them: fix the spelling, or use a model trained on that class",
            file=sys.stderr,
        )


def _source_info(case: CaseResult) -> dict[str, Any]:
    """Non-identifying facts about an input image (never DICOM patient tags or UIDs)."""
    meta = case.image.meta
    geo = case.image.geometry()
    return {
        "image": case.image_ref,
        "format": meta.get("format"),
        "modality": meta.get("modality"),
        "shape_zyx": geo["shape_zyx"],
        "spacing_zyx_mm": geo["spacing_zyx_mm"],
        "n_lesions": len(case.results),
    }


def _write_case_files(
    case: CaseResult,
    tmp: Path,
    clf: Classifier,
    used: set[str],
    counts: dict[str, int],
    per_patient: bool,
    dicom_sr: bool,
    dicom_seg: bool,
) -> None:
    """One image's overlays and, when asked, its DICOM SEG and SR, into the output being built.

    Args:
        used: Overlay names so far (lesion ids differing only in unsafe characters get a ``_``).
        counts: SR/SEG files so far per patient (``--manifest``: ``reports/<patient>_<n>.dcm``).
        per_patient: Name the SR/SEG by patient (``--manifest``), else ``report.dcm`` / ``segmentation.dcm``.
    """
    for r in case.results:
        name = safe_name(r.row["lesion_id"])
        while name in used:  # ids differing only in unsafe characters
            name += "_"
        used.add(name)
        draw_lesion_overlay(r, case.image, tmp / "overlays" / f"{name}.png", clf.class_names)
    if not (dicom_sr or dicom_seg) or not case.results:
        return
    if per_patient:
        pid = safe_name(str(case.results[0].row["patient_id"]))
        counts[pid] = counts.get(pid, 0) + 1
        seg_path = tmp / "segmentations" / f"{pid}_{counts[pid]}.dcm"
        sr_path = tmp / "reports" / f"{pid}_{counts[pid]}.dcm"
    else:
        seg_path, sr_path = tmp / "segmentation.dcm", tmp / "report.dcm"
    seg_ref = None
    if dicom_seg:
        estimated = [r.row["lesion_id"] for r in case.results if r.lesion.source != "mask"]
        seg_ref = write_seg(case.image, case.masks, seg_path, estimated=estimated)
    if dicom_sr:
        write_sr(clf.results_frame(case.rows), case.image, sr_path, lesion_masks=case.masks, seg=seg_ref)


def _print_table(df: pd.DataFrame, clf: Classifier) -> None:
    print(format_results(df, clf.class_names, clf.positive_class, clf.decision_rule, clf.n_models))


def predict_cli(
    models: Sequence[Path],
    out: Path,
    image: Path | None = None,
    mask: Path | None = None,
    label: int | str | None = None,
    point: str | None = None,
    diameter: float | None = None,
    manifest: Path | None = None,
    series: str | None = None,
    min_size_mm: float = 5.0,
    dicom_sr: bool = False,
    dicom_seg: bool = False,
    gradcam: bool | None = True,
    overwrite: bool = False,
    tolerance: float = 1e-3,
    patient_id: str | None = None,
    device: str = "auto",
    backend: str = "auto",
    threads: int | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """``liverlesion predict``: classify lesions and write results into ``out``.

    Exactly one lesion source: ``mask`` (with ``image``), ``point`` + ``diameter``
    (with ``image``), or ``manifest``. Writes ``results.csv``, ``results.json``,
    ``overlays/<lesion_id>.png`` and, with ``dicom_sr``, ``report.dcm`` (single
    image) or ``reports/<patient>_<n>.dcm`` (manifest); with ``dicom_seg``, the lesion
    masks used as ``segmentation.dcm`` / ``segmentations/<patient>_<n>.dcm`` (DICOM SEG,
    referred to by the SR). ``mask`` may be a DICOM SEG; ``label`` then selects segments
    (see :mod:`liverlesion.dicom_seg`). ``out`` appears complete or not at all.

    ``patient_id`` (``--image`` only) names the lesions ``{patient_id}-L01``, ...
    (default ``case``); with ``manifest`` the ids come from its patient_id column.

    ``device``, ``backend``, ``threads`` and ``batch_size`` go to :meth:`Classifier.load`;
    ``threads=None`` means the free cores. ``gradcam=None``: Grad-CAM with the torch backend,
    none with onnx (a Grad-CAM needs the torch network, whose import is most of a run's time).

    Returns:
        The results table (as written to results.csv).

    Raises:
        UserError: Bad option combination or input; nothing is written.
    """
    sources = {"--mask": mask is not None, "--point": point is not None, "--manifest": manifest is not None}
    given = [k for k, v in sources.items() if v]
    allowed = "use exactly one of: --image IMG --mask MASK [--label N] | --image IMG --point x,y,z --diameter MM | --manifest CSV"
    if len(given) != 1:
        what = "none of --mask/--point/--manifest" if not given else " and ".join(given)
        raise UserError(f"predict: got {what}; {allowed}")
    if manifest is not None and image is not None:
        raise UserError(
            f"--manifest {manifest} with --image {image}: the manifest names the images; {allowed}"
        )
    if manifest is None and image is None:
        raise UserError(f"{given[0]} needs --image (the CT: DICOM folder/zip or NIfTI); {allowed}")
    if manifest is not None and series is not None:
        raise UserError(f"--series {series}: applies to --image only; with --manifest use its series column")
    if manifest is not None and patient_id is not None:
        raise UserError(
            f"--patient-id {patient_id!r}: applies to --image only; with --manifest the ids come from its patient_id column"
        )
    if patient_id is not None and not patient_id.strip():
        raise UserError(
            "--patient-id '': must not be empty; give an id such as case01, or leave the option out"
        )
    if mask is not None and image is not None and Path(mask).resolve() == Path(image).resolve():
        raise UserError(f"--mask {mask}: is the --image itself; give the lesion mask file")
    problem = lesion_source_problem(
        mask is not None, point is not None, label is not None, diameter is not None, require_one=False
    )
    if problem == "label-without-mask":
        raise UserError(f"--label {label}: selects a lesion in --mask; give --mask too, or drop --label")
    if problem == "point-without-diameter":
        raise UserError(f"--point {point}: also give --diameter MM (the lesion's approximate diameter)")
    if problem == "diameter-without-point":
        raise UserError(
            f"--diameter {diameter}: only used with --point x,y,z; add --point or drop --diameter"
        )
    if diameter is not None:
        check_diameter(diameter, "--diameter")
    xyz = parse_point(point) if point is not None else None
    check_min_size(min_size_mm)
    label_given = label
    mask_is_seg, label = check_cli_mask_label(mask, label)
    if dicom_sr or dicom_seg:  # before any compute: every image must be a DICOM series
        for flag in ("--dicom-sr",) * dicom_sr + ("--dicom-seg",) * dicom_seg:
            check_sr_inputs(image=image, manifest=manifest, option=flag)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder path")
    check_out_spares_inputs(
        out,
        [("--image", image), ("--mask", mask), ("--manifest", manifest), *(("--model", m) for m in models)],
        "--out",
    )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"--out {out}: folder already exists and is not empty; choose another path or pass --overwrite"
        )

    clf = Classifier.load(
        list(models), device=device, backend=backend, threads=resolve_threads(threads), batch_size=batch_size
    )
    if gradcam is None:
        gradcam = clf.backend == "torch"

    def check_source(volume, name: str) -> None:  # before any lesion is classified
        if dicom_sr:
            check_sr_source(volume, name)
        if dicom_seg:
            check_seg_source(volume, name)

    if manifest is not None:
        _warn_unknown_classes(Path(manifest), clf.class_names)
        # one image at a time (every input checked first): its outputs are written, then it is let go
        cases: Iterable[CaseResult] = clf.iter_manifest_cases(
            Path(manifest), min_size_mm, gradcam, tolerance, check_image=check_source
        )
    else:
        volume = read_volume(image, series=series, kind="image", name="--image")
        check_source(volume, str(image))
        seg_labels = None
        if mask_is_seg:
            seg_labels, label = seg_mask(
                mask, volume, label, tolerance=tolerance, name="--mask", image_name="--image"
            )
            mask_vol = union_if_several(seg_labels, label)
        else:
            mask_vol = read_volume(mask, kind="mask", name="--mask") if mask is not None else None
        cases = [
            clf.classify_case(
                volume,
                mask=mask_vol,
                label=label,
                point=xyz,
                diameter_mm=diameter,
                min_size_mm=min_size_mm,
                patient_id=patient_id.strip() if patient_id is not None else "case",
                gradcam=gradcam,
                tolerance=tolerance,
                image_name="--image",
                mask_name="--mask",
                point_name="--point",
                image_ref=str(image),
            )
        ]
        if seg_labels is not None:
            for r in cases[0].results:  # refer to each lesion by its segment
                r.lesion.label = r.row["label"] = segment_of(r.mask, seg_labels)

    inputs = {
        "image": str(image) if image is not None else None,
        "mask": str(mask) if mask is not None else None,
        "label": label_given,
        "dicom_seg": bool(dicom_seg),
        "point_xyz_mm": list(xyz) if xyz is not None else None,
        "diameter_mm": diameter,
        "manifest": str(manifest) if manifest is not None else None,
        "series": series,
        "patient_id": patient_id,
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        results: list = []
        sources: list[dict[str, Any]] = []
        used: set[str] = set()
        counts: dict[str, int] = {}
        for case in cases:
            _write_case_files(case, tmp, clf, used, counts, manifest is not None, dicom_sr, dicom_seg)
            results += case.results
            sources.append(_source_info(case))
        df = clf.results_frame([r.row for r in results])
        domain = clf.domain_check(results)
        write_csv(tmp / "results.csv", df)
        write_json(
            tmp / "results.json",
            results_info(clf, df, min_size_mm, inputs, sources=sources, domain_check=domain),
        )
    _print_table(df, clf)
    for line in format_domain(domain):
        print(f"liverlesion predict: {line}", file=sys.stderr if domain["status"] == "shift" else sys.stdout)
    print(f"wrote {out}")
    return df
