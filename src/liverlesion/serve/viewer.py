"""What the viewer page asks of a loaded study: open it, render a slice, classify a click.

No HTTP here: each function takes the classifier, a :class:`~liverlesion.serve.studies.Study` and
plain values, and returns JSON-ready dicts or bytes; ``server.py`` routes requests to them. The
downloads (CSV, JSON, DICOM SR and SEG) are :mod:`.downloads`. Slices are
windowed and drawn on the server (PNG), so no volume is sent to the browser.
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from liverlesion import DISCLAIMER
from liverlesion.decision import CLASSIFIED
from liverlesion.errors import UserError
from liverlesion.io import check_geometry, read_volume
from liverlesion.seg_select import parse_selector
from liverlesion.serve.downloads import seg_available, seg_unavailable, sr_unavailable
from liverlesion.serve.masks import check_label, read_mask, resolve_segment_label
from liverlesion.serve.multipart import FormField
from liverlesion.serve.oneshot import (
    IMAGE_SUFFIXES,
    SEG_MASK_SUFFIXES,
    form_file,
    form_text,
    json_safe,
    suffix,
)
from liverlesion.serve.studies import Study, StudyStore

__all__ = [
    "PRESETS",
    "classify",
    "hu_at",
    "open_study",
    "overlay_png",
    "parse_classify",
    "parse_window",
    "render_slice",
    "study_info",
]

#: Window presets (level, width) in HU; "liver" is the window the patches use.
PRESETS = {"liver": (60.0, 250.0), "soft tissue": (40.0, 400.0)}
_MASK_RGB = (0, 230, 0)  # the uploaded mask's outline
_CLICK_RGB = (255, 210, 0)  # spheres classified from clicks
_MAX_LABEL = 65535


def _renamed(err: UserError, replace: dict[str, str], workdir: Path) -> UserError:
    """The same message with the user's file names in place of our private temp paths (keys in order)."""
    msg = str(err)
    for path, name in replace.items():
        msg = msg.replace(path, name)
    return UserError(msg.replace(str(workdir), "(upload)"))


# --------------------------------------------------------------------------- opening


def open_study(store: StudyStore, fields: dict[str, FormField], workdir: Path) -> Study:
    """Read an uploaded CT (and optional mask) into a new study; the upload files are left to the caller.

    Args:
        store: Where the study is kept.
        fields: The multipart fields: ``image`` (NIfTI, NRRD, MHA, or a .zip / .dcm of one DICOM series),
            optionally ``mask`` (a label or binary NIfTI/NRRD/MHA on the CT's grid, or a DICOM SEG drawn on
            this CT) and, with a SEG, ``label``: which segments to open (a number, a SegmentLabel or a
            pattern such as ``Tumor*``; empty: all).
        workdir: The request's private folder holding the uploads.

    Raises:
        UserError: Missing or wrong files, not a CT, mask not on the CT's grid, or too large to keep.
    """
    from scipy import ndimage

    from liverlesion.predict import check_ct_volume  # local: heavy (scipy)

    image_f = form_file(fields, "image")
    if image_f is None:
        raise UserError("CT file: none uploaded; choose a NIfTI (.nii/.nii.gz) or a .zip of one DICOM series")
    image_suf = suffix(image_f.filename or "", IMAGE_SUFFIXES)
    if not image_suf:
        raise UserError(
            f"CT file {image_f.filename!r}: not a CT file type; choose a NIfTI (.nii/.nii.gz), NRRD, MHA, or a "
            ".zip of one DICOM series"
        )
    mask_f = form_file(fields, "mask")
    mask_suf = ""
    if mask_f is not None:
        mask_suf = suffix(mask_f.filename or "", SEG_MASK_SUFFIXES)
        if not mask_suf:
            raise UserError(
                f"mask file {mask_f.filename!r}: not a mask file type; choose a NIfTI (.nii/.nii.gz), NRRD or "
                "MHA label mask, or a DICOM SEG (.dcm), drawn on this CT"
            )
    label_txt = form_text(fields, "label").strip()
    image_name = f"CT file {image_f.filename!r}"
    mask_name = f"mask file {mask_f.filename!r}" if mask_f is not None else "mask"
    image_path = workdir / f"image{image_suf}"
    image_f.save(image_path)
    replace = {str(image_path): repr(image_f.filename)}
    mask_path = None
    if mask_f is not None:
        mask_path = workdir / f"mask{mask_suf}"
        mask_f.save(mask_path)
        replace = {f"{mask_name} {mask_path}": mask_name, str(mask_path): repr(mask_f.filename), **replace}
    try:
        if label_txt and mask_path is not None and mask_suf != ".dcm":
            raise UserError(
                f"label {label_txt!r}: chooses segments of a DICOM SEG mask; with a NIfTI/NRRD/MHA mask leave it "
                "empty and pick the lesion from the list once the CT is open"
            )
        is_seg, selector = check_label(mask_path, label_txt, mask_name)
        image = read_volume(image_path, kind="image", name=image_name)
        check_ct_volume(image, image_name)
        labels, kind, segments = None, "", {}
        if mask_path is not None:
            mask, named, segments = read_mask(mask_path, image, is_seg, selector, mask_name, image_name)
            check_geometry(image, mask, tolerance=1e-3, image_name=image_name, mask_name=mask_name)
            arr = mask.array
            present = np.unique(arr[arr > 0])
            if present.size == 0:
                raise UserError(
                    f"{mask_name}: the mask is empty (no voxel > 0); give a mask that contains the lesions"
                )
            if is_seg and (named is not None or present.size > 1):
                # segment N is label N, one lesion each (a segment named alone stays one lesion too)
                labels, kind = arr.astype(np.uint16), "segments"
                segments = {n: lab for n, lab in segments.items() if n in set(present.tolist())}
            elif present.size > 1:
                if present.max() > _MAX_LABEL or np.any(present != np.round(present)):
                    raise UserError(
                        f"{mask_name}: values {present[0]:g}..{present[-1]:g} are not whole-number lesion labels "
                        f"(1..{_MAX_LABEL}); give a label mask"
                    )
                labels, kind = np.where(arr > 0, arr, 0).astype(np.uint16), "labels"
            else:  # binary: lesions are its components, numbered as lesions_from_mask numbers them
                comp, _ = ndimage.label(arr > 0, structure=np.ones((3, 3, 3), dtype=bool))
                labels, kind = comp.astype(np.uint16), "components"
    except UserError as e:
        raise _renamed(e, replace, workdir) from None
    return store.add(
        image,
        labels=image.with_array(labels, source="") if labels is not None else None,
        mask_kind=kind,
        segments=segments,
        names={"image": image_f.filename, "mask": mask_f.filename if mask_f is not None else None},
    )


def study_info(study: Study) -> dict[str, Any]:
    """Shape, spacing, slice count and each slice's z, the mask's lesions and where to start, as JSON."""
    from scipy import ndimage

    image = study.image
    nz, ny, nx = image.shape
    lesions = []
    start = nz // 2
    if study.labels is not None:
        arr = study.labels.array
        values = np.unique(arr[arr > 0])
        boxes = ndimage.find_objects(arr, max_label=int(values.max()) if values.size else 0)
        for v in values:
            box = boxes[int(v) - 1]
            counts = np.count_nonzero(arr[box] == v, axis=(1, 2))
            lesions.append(
                {
                    "label": int(v),
                    "lesion_id": f"case-L{int(v):02d}",
                    "first_slice": int(box[0].start),
                    "last_slice": int(box[0].stop - 1),
                    "largest_slice": int(box[0].start + int(np.argmax(counts))),
                    "n_voxels": int(counts.sum()),
                }
            )
            if study.mask_kind == "segments":
                lesions[-1]["segment_label"] = study.segments.get(int(v), "")
        if lesions:
            start = max(lesions, key=lambda d: d["n_voxels"])["largest_slice"]
    return json_safe(
        {
            "study_id": study.id,
            "shape_zyx": [nz, ny, nx],
            "spacing_zyx_mm": [round(s, 4) for s in image.spacing],
            "n_slices": nz,
            # each slice's z (LPS mm) at its first pixel, as DICOM's ImagePositionPatient: for the page's
            # "slice k of n, z = ... mm" (slices are numbered from 0 here and in centre_slice, from 1 on the page)
            "slice_z_mm": [
                round(float(z), 3)
                for z in image.index_to_physical(
                    np.stack([np.arange(nz, dtype=float), np.zeros(nz), np.zeros(nz)], axis=1)
                )[:, 2]
            ],
            "start_slice": start,
            "format": image.meta.get("format"),
            "image": study.names.get("image"),
            "mask": study.names.get("mask"),
            "mask_kind": study.mask_kind,
            "mask_lesions": lesions,
            "presets": {k: {"level": c, "width": w} for k, (c, w) in PRESETS.items()},
            "orientation": "axial slices; anterior up, patient right on the left",
            "segments": [{"number": n, "label": lab} for n, lab in sorted(study.segments.items())],
            "downloads": {
                "csv": True,
                "json": True,
                "sr": not sr_unavailable(study),
                "seg": seg_available(study),
            },
            "unavailable": {"sr": sr_unavailable(study), "seg": seg_unavailable(study)},
            "disclaimer": DISCLAIMER,
        }
    )


# --------------------------------------------------------------------------- slices


def parse_window(query: dict[str, list[str]]) -> tuple[float, float]:
    """Window level/width from ``?wl=..&ww=..`` (default: the liver window)."""
    out = []
    for key, default, what in (("wl", PRESETS["liver"][0], "level"), ("ww", PRESETS["liver"][1], "width")):
        raw = (query.get(key) or [""])[0].strip()
        try:
            v = float(raw) if raw else default
        except ValueError:
            v = math.nan
        if not math.isfinite(v) or abs(v) > 10000 or (key == "ww" and not v >= 1):
            raise UserError(
                f"window {what} {key}={raw!r}: must be a number of HU"
                + (" from 1 to 10000 (e.g. 250)" if key == "ww" else " from -10000 to 10000 (e.g. 60)")
            )
        out.append(v)
    return out[0], out[1]


def _check_slice(study: Study, k: int) -> None:
    nz = study.image.shape[0]
    if not 0 <= k < nz:
        raise UserError(f"slice {k}: out of range; this CT has slices 0..{nz - 1}")


def _box(a: np.ndarray) -> tuple[slice, slice] | None:
    """The non-zero part of a 2-D array grown by one pixel, or None when all zero."""
    rows, cols = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
    if rows.size == 0:
        return None
    return (
        slice(max(rows[0] - 1, 0), rows[-1] + 2),
        slice(max(cols[0] - 1, 0), cols[-1] + 2),
    )


def render_slice(study: Study, k: int, level: float, width: float, outline: bool = True) -> bytes:
    """Axial slice ``k`` windowed to 8-bit grey, with the mask and classified lesions outlined, as PNG.

    One image pixel per voxel (the page scales it by the pixel spacing); anterior up, patient right
    on the left, as the volume is held in LPS.
    """
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from liverlesion.patches import window  # local: heavy (scipy)

    _check_slice(study, k)
    grey = (window(study.image.array[k], level, width) * 255.0 + 0.5).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if outline:
        with study.lock:
            clicks = [r.mask for r in study.results.values() if r.row.get("source") == "click"]
        layers = [(study.labels.array[k], _MASK_RGB)] if study.labels is not None else []
        layers += [(m[k], _CLICK_RGB) for m in clicks]
        for lab, colour in layers:
            box = _box(lab)
            if box is not None:  # outlines within the lesions' box only: a full slice costs 10x more
                rgb[box][find_boundaries(lab[box], mode="inner")] = colour
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _whole(query: dict[str, list[str]], key: str, what: str) -> int:
    raw = (query.get(key) or [""])[0].strip()
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{what} {key}={raw!r}: must be a whole number (a pixel index from 0)") from None


def hu_at(study: Study, query: dict[str, list[str]]) -> dict[str, Any]:
    """The HU of one voxel and its LPS position, from ``?k=&x=&y=`` (slice, column and row indices from 0,
    as ``slice``, ``x_px`` and ``y_px`` of a click): what the page shows under the mouse.

    Raises:
        UserError: A missing or non-whole index, or one outside the volume.
    """
    k = _whole(query, "k", "slice")
    x = _whole(query, "x", "pixel column")
    y = _whole(query, "y", "pixel row")
    _check_slice(study, k)
    nz, ny, nx = study.image.shape
    if not (0 <= x < nx and 0 <= y < ny):
        raise UserError(
            f"pixel x={x}, y={y}: outside the image ({nx} x {ny} pixels: x 0..{nx - 1}, y 0..{ny - 1})"
        )
    lps = study.image.index_to_physical((float(k), float(y), float(x)))
    return {
        "slice": k,
        "x_px": x,
        "y_px": y,
        "hu": round(float(study.image.array[k, y, x]), 1),
        "lps_mm": [round(float(v), 2) for v in lps],
    }


# --------------------------------------------------------------------------- classifying


def _number(body: dict[str, Any], key: str, what: str) -> float | None:
    v = body.get(key)
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer of 400 digits
        f = math.nan
    if isinstance(v, bool) or not math.isfinite(f):
        raise UserError(f"{what} {v!r}: must be a finite number")
    return f


def parse_classify(study: Study, body: Any) -> dict[str, Any]:
    """Check a classify request before queueing it; returns what :func:`classify` needs.

    ``body``: ``{"slice", "x_px", "y_px", "diameter_mm"?, "use_mask"?}`` (a click, pixel indices of the
    slice image), ``{"label": N}`` (a lesion of the mask; for a DICOM SEG the segment number, or its
    SegmentLabel as text) or ``{"all": true}`` (every mask lesion);
    ``min_size_mm`` optional (default 5).

    Raises:
        UserError: A click outside the image or in air, no diameter, a label not in the mask, and so on.
    """
    from liverlesion.click import check_diameter  # local: heavy (scipy)
    from liverlesion.lesions import AIR_THRESHOLD_HU

    if not isinstance(body, dict):
        raise UserError(
            'classify request: expected a JSON object such as {"slice": 40, "x_px": 120, "y_px": 96}'
        )
    unknown = sorted(
        set(body) - {"slice", "x_px", "y_px", "diameter_mm", "use_mask", "label", "all", "min_size_mm"}
    )
    if unknown:
        raise UserError(f"classify request: unknown field(s) {', '.join(unknown)}")
    for key in ("all", "use_mask"):  # "false" as text would be true
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise UserError(
                f"{key} {body[key]!r}: must be true or false (JSON booleans, not text or numbers)"
            )
    given = [
        what
        for what, present in (
            ("a click (slice, x_px, y_px)", any(body.get(k) is not None for k in ("slice", "x_px", "y_px"))),
            ("a label", body.get("label") not in (None, "")),
            ('"all": true', body.get("all") is True),
        )
        if present
    ]
    if len(given) > 1:  # one would be dropped silently
        raise UserError(f"classify request: gives {' and '.join(given)}; send one of them per request")
    min_size = _number(body, "min_size_mm", "min_size_mm")
    min_size = 5.0 if min_size is None else min_size
    if min_size < 0:
        raise UserError(f"min_size_mm {min_size:g}: must be 0 or a positive number of mm (default 5)")
    if body.get("all"):
        if study.labels is None:
            raise UserError(
                "classify all: this study has no mask; open the CT with a mask, or click a lesion"
            )
        return _all_spec(study, min_size)
    if body.get("label") not in (None, ""):
        if study.labels is None:
            raise UserError(f"label {body['label']!r}: this study has no mask; click the lesion instead")
        label = _segment_label(study, body["label"])
        if label is None:
            label = _number(body, "label", "label")
        elif label == 0:  # a SegmentLabel naming the study's only segment, opened as components
            return _all_spec(study, min_size)
        if label is None or label != int(label) or label < 1 or not np.any(study.labels.array == int(label)):
            raise UserError(
                f"label {body['label']!r}: not a lesion label of the mask; pick one from the list"
            )
        return {"kind": "label", "label": int(label), "min_size_mm": min_size}
    nz, ny, nx = study.image.shape
    k = _number(body, "slice", "slice")
    x = _number(body, "x_px", "x_px")
    y = _number(body, "y_px", "y_px")
    if k is None or x is None or y is None:
        raise UserError("click: give slice, x_px and y_px (pixel of the slice image), a label, or all")
    if k != int(k):
        raise UserError(f"slice {k:g}: must be a whole slice number")
    _check_slice(study, int(k))
    if not (-0.5 <= x <= nx - 0.5 and -0.5 <= y <= ny - 0.5):
        raise UserError(
            f"click at x_px={x:g}, y_px={y:g}: outside the image ({nx} x {ny} pixels); click inside the slice"
        )
    iz, iy, ix = int(k), min(int(round(y)), ny - 1), min(int(round(x)), nx - 1)
    use_mask = body.get("use_mask", True) is not False
    if use_mask and study.labels is not None and study.labels.array[iz, iy, ix] > 0:
        return {"kind": "label", "label": int(study.labels.array[iz, iy, ix]), "min_size_mm": min_size}
    # Air (outside the body, lung, bowel gas) is answered here, in the page's terms (slice and pixel):
    # the classifier would say it in LPS mm and ask to check the coordinates, which a click cannot get wrong.
    # (the median of the 3x3x3 neighbourhood, as the classifier tests it)
    near = tuple(slice(max(c - 1, 0), c + 2) for c in (iz, iy, ix))
    hu_at = float(np.median(study.image.array[near]))
    if hu_at < AIR_THRESHOLD_HU:
        raise UserError(
            f"click on slice {iz + 1} of {nz} (index {iz}) at pixel ({ix}, {iy}): air (HU {hu_at:.0f}), outside "
            "the body or in lung / bowel gas; click inside the lesion"
        )
    d = _number(body, "diameter_mm", "diameter (mm)")
    if d is None:
        raise UserError("diameter (mm): none given; drag across the lesion, or type its diameter in mm")
    check_diameter(d, "diameter (mm)", study.image)
    xyz = tuple(float(v) for v in study.image.index_to_physical((float(k), float(y), float(x))))
    return {"kind": "point", "point": xyz, "diameter_mm": d, "min_size_mm": min_size, "slice": int(k)}


def _all_spec(study: Study, min_size: float) -> dict[str, Any]:
    """Every mask lesion; a SEG study of one segment keeps it as one lesion (its number, not components)."""
    if study.mask_kind == "segments":
        arr = study.labels.array
        present = np.unique(arr[arr > 0])
        if present.size == 1:
            return {"kind": "label", "label": int(present[0]), "min_size_mm": min_size}
    return {"kind": "all", "min_size_mm": min_size}


def _segment_label(study: Study, raw: Any) -> int | None:
    """For a SEG study, a text label (SegmentLabel or pattern) as its segment number; None otherwise.

    Returns 0 when it names the only segment of a study opened as that segment's components.

    Raises:
        UserError: No segment matches, or the text picks several segments.
    """
    if not study.segments or not isinstance(raw, str) or not isinstance(parse_selector(raw), str):
        return None
    numbers = resolve_segment_label(raw.strip(), study.segments)
    if study.mask_kind == "components":
        return 0
    if len(numbers) > 1:
        raise UserError(
            f"label {raw!r}: picks {len(numbers)} segments ({', '.join(map(str, numbers))}); give one segment "
            "number or label, or classify all"
        )
    return numbers[0]


def classify(clf, study: Study, spec: dict[str, Any], job=None) -> dict[str, Any]:
    """Classify what :func:`parse_classify` checked; the results join the study (a lesion classified
    again replaces its earlier result).

    Returns:
        ``{"study_id", "lesions": [row + overlay_url], "class_names", "decision_rule", "min_size_mm"
        (smaller lesions are not classified), "disclaimer"}``.
    """
    stage = job.set_stage if job is not None else (lambda s: None)
    stage("cutting the patch and running the model")
    image_ref = str(study.names.get("image") or "")
    common = {
        "min_size_mm": spec["min_size_mm"],
        "image_ref": image_ref,
        "image_name": "CT",
        "mask_name": "mask",
    }
    with study.lock:
        study.min_size_mm = float(spec["min_size_mm"])
        if spec["kind"] == "point":
            case = clf.predict_case(
                study.image,
                point=spec["point"],
                diameter_mm=spec["diameter_mm"],
                point_name="click",
                **common,
            )
            study.n_clicks += 1
            for r in case.results:  # clicks are numbered per study, apart from the mask's labels
                r.row["lesion_id"] = r.lesion.lesion_id = f"case-C{study.n_clicks:02d}"
        else:
            case = clf.predict_case(study.image, mask=study.labels, label=spec.get("label"), **common)
        for r in case.results:
            study.results.pop(r.row["lesion_id"], None)
            study.results[r.row["lesion_id"]] = r
    stage("done")
    rows = []
    for r in case.results:
        row = json_safe(dict(r.row))
        row["overlay_url"] = f"/api/studies/{study.id}/lesions/{r.row['lesion_id']}/overlay.png"
        row["slice"] = int(r.row["centre_slice"])
        rows.append(row)
    return {
        "study_id": study.id,
        "lesions": rows,
        "class_names": list(clf.class_names),
        "decision_rule": clf.decision_rule,
        "min_size_mm": float(spec["min_size_mm"]),
        "disclaimer": DISCLAIMER,
    }


def overlay_png(clf, study: Study, lesion_id: str, gradcam: bool) -> bytes:
    """The lesion's overlay PNG (slice + outline, the network's patch; with ``gradcam`` its Grad-CAM,
    computed now on first request and kept)."""
    from liverlesion.predict import draw_lesion_overlay  # local: heavy (scipy)

    with study.lock:
        r = study.results.get(lesion_id)
        if r is None:
            raise UserError(f"lesion {lesion_id!r}: not classified in this study; click it first")
        if gradcam and r.cam is None and r.row.get("status") == CLASSIFIED:
            r.cam = clf.gradcam(r.patch.image, str(r.row["pred_class"]), r.patch.mask)
        cam, r.cam = r.cam, (r.cam if gradcam else None)
        try:
            with tempfile.TemporaryDirectory(prefix="liverlesion-serve-") as tmp:
                path = draw_lesion_overlay(r, study.image, Path(tmp) / "overlay.png", clf.class_names)
                return path.read_bytes()
        finally:
            r.cam = cam
