"""The one-shot form (``/form``, ``POST /predict``, ``POST /api/predict``): upload, classify, answer.

The no-JavaScript fallback of the viewer and the original JSON API: each request carries the CT and
the lesion (mask or LPS point); nothing is kept after the answer.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from liverlesion import DISCLAIMER, __version__
from liverlesion.dicom_seg import segment_of, union_if_several
from liverlesion.errors import UserError
from liverlesion.io import read_volume
from liverlesion.serve.masks import check_label, read_mask
from liverlesion.serve.multipart import FormField

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".zip", ".nrrd", ".mha", ".dcm")
MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
SEG_MASK_SUFFIXES = (*MASK_SUFFIXES, ".dcm")  # a .dcm mask is a DICOM SEG (read by liverlesion.dicom_seg)


def suffix(filename: str, allowed: Sequence[str]) -> str:
    low = filename.lower()
    for suf in allowed:
        if low.endswith(suf):
            return suf
    return ""


def form_file(fields: dict[str, FormField], name: str) -> FormField | None:
    """The uploaded file of field ``name``; None when no file was chosen (browsers send an empty
    part with no file name); a chosen file with no bytes is refused, not taken as "none"."""
    f = fields.get(name)
    if f is None or not f.filename:
        return None
    if not (f.data or f.size):
        what = "CT" if name == "image" else name
        raise UserError(
            f"{what} file {f.filename!r}: empty (0 bytes); choose the file again (an interrupted download "
            "or copy leaves an empty file)"
        )
    return f


def form_text(fields: dict[str, FormField], name: str) -> str:
    f = fields.get(name)
    return f.text if f is not None and f.filename is None else ""


def form_number(fields: dict[str, FormField], name: str, what: str) -> float | None:
    raw = form_text(fields, name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError as exc:
        raise UserError(f"{what} {raw!r}: not a number; enter a number of mm such as 12.5") from exc
    if not math.isfinite(value):
        raise UserError(f"{what} {raw!r}: must be a finite number")
    return value


def run_prediction(clf, fields: dict[str, FormField], workdir: Path) -> dict[str, Any]:
    """Validate the form, read the uploads, classify, draw overlays.

    Returns:
        ``{"df": results table, "overlays": [(lesion_id, png bytes)], "info": JSON-ready dict}``.
    """
    from liverlesion.click import check_diameter  # local: heavy (scipy)
    from liverlesion.lesions import lesion_source_problem  # local: heavy (scipy)
    from liverlesion.predict import (  # local: heavy (scipy)
        draw_lesion_overlay,
        parse_point,
        results_info,
        safe_name,
    )

    image_f = form_file(fields, "image")
    if image_f is None:
        raise UserError("CT file: none uploaded; choose a NIfTI (.nii/.nii.gz) or a .zip of one DICOM series")
    mask_f = form_file(fields, "mask")
    point_txt = form_text(fields, "point")
    diameter = form_number(fields, "diameter", "diameter (mm)")
    label_txt = form_text(fields, "label")
    min_size = form_number(fields, "min_size_mm", "min size (mm)")
    min_size = 5.0 if min_size is None else min_size
    problem = lesion_source_problem(
        mask_f is not None, bool(point_txt), bool(label_txt), diameter_given=diameter is not None
    )
    if problem in ("both", "neither"):
        got = "both a mask and a point" if problem == "both" else "neither a mask nor a point"
        raise UserError(
            f"lesion: got {got}; give either a mask file (NIfTI) or a point x,y,z (LPS mm) with a diameter"
        )
    if problem == "label-without-mask":
        raise UserError(
            f"label {label_txt!r}: selects a lesion in the mask; upload a mask or clear the label"
        )
    xyz = parse_point(point_txt, "point") if point_txt else None
    if problem == "point-without-diameter":
        raise UserError(f"point {point_txt!r}: also give the lesion diameter in mm")
    if point_txt:
        check_diameter(diameter, "diameter (mm)")
    if problem == "diameter-without-point":
        raise UserError(
            f"diameter (mm) {diameter:g}: only used with a point; enter a point or clear the diameter"
        )

    image_name = f"CT file {image_f.filename!r}"
    image_suf = suffix(image_f.filename or "", IMAGE_SUFFIXES)
    image_path = workdir / f"image{image_suf}"
    image_f.save(image_path)
    replace = {str(image_path): repr(image_f.filename)}
    mask_path = None
    mask_name = f"mask file {mask_f.filename!r}" if mask_f is not None else "mask"
    if mask_f is not None:
        mask_suf = suffix(mask_f.filename or "", SEG_MASK_SUFFIXES)
        if not mask_suf:
            raise UserError(
                f"mask file {mask_f.filename!r}: expected a NIfTI (.nii or .nii.gz), NRRD or MHA mask, or a "
                "DICOM SEG (.dcm)"
            )
        mask_path = workdir / f"mask{mask_suf}"
        mask_f.save(mask_path)
        replace = {f"{mask_name} {mask_path}": mask_name, str(mask_path): repr(mask_f.filename), **replace}
    try:
        is_seg, label = check_label(mask_path, label_txt, mask_name)  # before reading any volume
        label_given = label
        volume = read_volume(image_path, kind="image", name=image_name)
        mask_vol, segments = None, {}
        if mask_path is not None:
            mask_vol, label, segments = read_mask(mask_path, volume, is_seg, label, mask_name, image_name)
        case = clf.predict_case(
            volume,
            mask=union_if_several(mask_vol, label) if segments else mask_vol,  # as predict --mask SEG
            label=label,
            point=xyz,
            diameter_mm=diameter,
            min_size_mm=min_size,
            patient_id="case",
            gradcam=True,
            tolerance=1e-3,
            image_name=image_name,
            mask_name=mask_name,
            point_name="point",
            image_ref=str(image_f.filename),
        )
        if segments:  # refer to each lesion by its segment, as predict --mask SEG does
            for r in case.results:
                r.lesion.label = r.row["label"] = segment_of(r.mask, mask_vol)
    except UserError as e:
        # Messages name our private temp files; show the user's own file names instead.
        msg = str(e)
        for path, name in replace.items():
            msg = msg.replace(path, name)
        msg = msg.replace(str(workdir), "(upload)")
        raise UserError(msg) from None
    overlays = []
    for r in case.results:
        png = draw_lesion_overlay(
            r, case.image, workdir / "overlays" / f"{safe_name(r.row['lesion_id'])}.png", clf.class_names
        )
        overlays.append((str(r.row["lesion_id"]), png.read_bytes()))
    df = clf.results_frame([r.row for r in case.results])
    info = results_info(
        clf,
        df,
        min_size,
        {
            "image": image_f.filename,
            "mask": mask_f.filename if mask_f is not None else None,
            "label": label_given,
            "point_xyz_mm": list(xyz) if xyz is not None else None,
            "diameter_mm": diameter,
        },
    )
    return {"df": df, "overlays": overlays, "info": info}


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, so the JSON is strict."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is not None and not isinstance(obj, str | int | float | bool):
        try:
            import pandas as pd

            if pd.isna(obj):
                return None
        except (TypeError, ValueError):
            pass
        return str(obj)
    return obj


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:1em auto;padding:0 1em;color:#222}
.banner{background:#b00020;color:#fff;font-weight:bold;padding:.6em 1em;border-radius:4px;text-align:center}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
fieldset{margin:.8em 0}label{display:block;margin:.3em 0}.err{background:#fde;border:1px solid #b00020;padding:.6em}
img{max-width:100%;border:1px solid #ccc}small{color:#555}
"""


def page(title: str, body: str) -> bytes:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<div class='banner'>Research use, not for diagnosis</div>{body}"
        f"<p><small>liverlesion {html.escape(__version__)}: {html.escape(DISCLAIMER)}</small></p>"
        "</body></html>"
    ).encode()


def _model_info_html(clf) -> str:
    d = clf.describe()
    rows = [
        ("classes", ", ".join(clf.class_names)),
        ("decision", clf.decision_rule),
        ("models", str(clf.n_models)),
    ]
    for i, m in enumerate(d["models"]):
        rows.append((f"model {i + 1}", f"{m.get('backbone') or '?'}, sha256 {m.get('sha256') or '?'}"))
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<h2>Model</h2><table>{cells}</table>"


def form_html(clf) -> bytes:
    body = f"""
<h1>liverlesion: classify a liver lesion</h1>
<p>A form without JavaScript; <a href='/'>the viewer</a> shows the slices and takes a click on the lesion.</p>
{_model_info_html(clf)}
<form method="post" action="/predict" enctype="multipart/form-data">
<fieldset><legend>CT</legend>
<label>CT file (NIfTI .nii/.nii.gz, or a .zip of one DICOM series)
<input type="file" name="image" required></label></fieldset>
<fieldset><legend>Lesion: a mask, or a point</legend>
<label>Mask file (NIfTI aligned with the CT, or a DICOM SEG drawn on it) <input type="file" name="mask"></label>
<label>Label in the mask (empty: every lesion; for a DICOM SEG a segment number, label or pattern such as Tumor*)
<input type="text" name="label" placeholder="2"></label>
<p>or</p>
<label>Point x,y,z (LPS mm, as DICOM viewers show) <input type="text" name="point" placeholder="-42.5,10.0,-120"></label>
<label>Diameter (mm) <input type="text" name="diameter" placeholder="18"></label>
</fieldset>
<label>Min size (mm): smaller lesions are not classified <input type="text" name="min_size_mm" value="5"></label>
<p><button type="submit">Classify</button></p>
</form>"""
    return page("liverlesion", body)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.3f}"
    return "-" if v is None else str(v)


def results_html(clf, result: dict[str, Any]) -> bytes:
    df = result["df"]
    cols = ["lesion_id", "pred_class", *[f"prob_{c}" for c in clf.class_names], "uncertainty"]
    cols += ["max_axial_diameter_mm", "min_axis_mm", "volume_ml", "status"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(rec.get(c)))}</td>" for c in cols) + "</tr>"
        for rec in df.astype(object).to_dict(orient="records")
    )
    csv_b64 = base64.b64encode(df.to_csv(index=False).encode("utf-8")).decode("ascii")
    json_b64 = base64.b64encode(
        json.dumps(json_safe(result["info"]), indent=2, allow_nan=False).encode("utf-8")
    ).decode("ascii")
    imgs = "".join(
        f"<h3>{html.escape(lid)}</h3><img alt='overlay {html.escape(lid)}' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"
        for lid, png in result["overlays"]
    )
    body = (
        f"<h1>Results</h1><p>{len(df)} lesion(s); decision: {html.escape(clf.decision_rule)}; "
        f"{clf.n_models} model(s).</p><table><tr>{head}</tr>{rows}</table>"
        f"<p>Download: <a download='results.csv' href='data:text/csv;base64,{csv_b64}'>results.csv</a> · "
        f"<a download='results.json' href='data:application/json;base64,{json_b64}'>results.json</a> · "
        "<a href='/form'>classify another</a></p>"
        f"{imgs}"
    )
    return page("liverlesion results", body)


def error_html(status: int, message: str) -> bytes:
    body = f"<h1>Error {status}</h1><p class='err'>{html.escape(message)}</p><p><a href='/form'>back to the form</a> · <a href='/'>the viewer</a></p>"
    return page(f"liverlesion error {status}", body)
