"""``liverlesion predict``, ``export`` and ``serve``: using trained checkpoints (thin commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from liverlesion.cli_common import (
    DEPRECATED_OUT,
    BackendOpt,
    DeviceOpt,
    OverwriteOpt,
    ThreadsOpt,
    app,
    out_dir,
    out_opt,
    output,
    resources,
)
from liverlesion.errors import UserError

IMAGE_FORMATS = (
    "DICOM series folder, .zip of one DICOM series, single (multi-frame) DICOM file, "
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd)"
)


@app.command()
def predict(
    model: Annotated[
        list[Path], typer.Option("--model", help="Checkpoint(s); several, or a cv run folder = ensemble.")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")],
    image: Annotated[
        Optional[Path], typer.Option("--image", help=f"The CT: {IMAGE_FORMATS}.", show_default="none")
    ] = None,
    mask: Annotated[
        Optional[Path],
        typer.Option(
            "--mask",
            help="Lesion mask aligned with --image (same formats), or a DICOM SEG file referencing it.",
            show_default="none",
        ),
    ] = None,
    label: Annotated[
        Optional[str],
        typer.Option(
            "--label",
            help="Lesion label in the mask; for a DICOM SEG a segment number or label (Tumor* patterns too).",
            show_default="every label",
        ),
    ] = None,
    point: Annotated[
        Optional[str],
        typer.Option(
            "--point",
            help="Click x,y,z in LPS mm, one argument (e.g. --point=-69.2,-18.3,36.3).",
            show_default="none",
        ),
    ] = None,
    diameter: Annotated[
        Optional[float],
        typer.Option("--diameter", help="Lesion diameter in mm (with --point).", show_default="none"),
    ] = None,
    manifest: Annotated[
        Optional[Path],
        typer.Option("--manifest", help="Batch of studies as a manifest CSV.", show_default="none"),
    ] = None,
    series: Annotated[
        Optional[str],
        typer.Option(help="SeriesInstanceUID when a folder holds several.", show_default="the only series"),
    ] = None,
    patient_id: Annotated[
        Optional[str],
        typer.Option("--patient-id", help="Patient id for the lesion ids with --image.", show_default="case"),
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Geometry tolerance (mm) between image and mask.")] = 1e-3,
    min_size_mm: Annotated[
        float, typer.Option(help="Smaller lesions are flagged 'too small to characterise'.")
    ] = 5.0,
    dicom_sr: Annotated[
        bool, typer.Option("--dicom-sr", help="Also write a DICOM Structured Report.", show_default="off")
    ] = False,
    dicom_seg: Annotated[
        bool,
        typer.Option(
            "--dicom-seg", help="Also write the lesion masks used as a DICOM SEG.", show_default="off"
        ),
    ] = False,
    gradcam: Annotated[
        Optional[bool],
        typer.Option(
            "--gradcam/--no-gradcam",
            help="Draw Grad-CAM overlays (they need torch: with the onnx backend, --gradcam loads it).",
            show_default="on with the torch backend, off with onnx",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    threads: ThreadsOpt = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="Patches per forward call.", show_default="64")
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Classify lesions in a new study with one or more checkpoints."""
    from liverlesion.runtime import check_backend

    resources(device, threads, batch_size)
    check_backend(backend)
    from liverlesion.predict import predict_cli

    out_dir(out, "--out")
    predict_cli(
        models=model,
        out=out,
        image=image,
        mask=mask,
        label=label,
        point=point,
        diameter=diameter,
        manifest=manifest,
        series=series,
        patient_id=patient_id,
        tolerance=tolerance,
        min_size_mm=min_size_mm,
        dicom_sr=dicom_sr,
        dicom_seg=dicom_seg,
        gradcam=gradcam,
        overwrite=overwrite,
        device=device,
        backend=backend,
        threads=threads,
        batch_size=batch_size,
    )


@app.command()
def export(
    model: Annotated[
        Path, typer.Option("--model", help="Checkpoint to export; a cv run folder: each fold's, next to it.")
    ],
    format: Annotated[str, typer.Option("--format", help="onnx | torchscript.")] = "onnx",
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[
        Optional[Path],
        out_opt(
            "Output file (predict --backend auto/onnx uses model.onnx next to model.pt).",
            "next to the checkpoint: model.onnx | model.ts.pt",
        ),
    ] = None,
) -> None:
    """Export a checkpoint to ONNX or TorchScript."""
    dest = None if out_opt is None and out is None else output(out_opt, out, "output file")[0]
    import json

    from liverlesion import DISCLAIMER
    from liverlesion.export import export_checkpoints

    for path in export_checkpoints(model, format, dest):
        info = json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))
        features = info.get("features_input")  # a fusion model's second input
        inputs = "[0, 1] patches" + (
            f" and {features['shape'][1]} radiomics-style features (fusion_features)" if features else ""
        )
        typer.echo(f"wrote {path} and {path.name}.json (input: {inputs}; output: class probabilities)")
    typer.echo(f"liverlesion export: {DISCLAIMER}")


@app.command()
def serve(
    model: Annotated[
        list[Path], typer.Option("--model", help="Checkpoint(s); several, or a cv run folder = ensemble.")
    ],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (no authentication: keep 127.0.0.1).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8765,
    max_upload_mb: Annotated[
        float,
        typer.Option("--max-upload-mb", help="Largest accepted upload (MiB); bigger ones get HTTP 413."),
    ] = 2048.0,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    threads: ThreadsOpt = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="Patches per forward call.", show_default="64")
    ] = None,
    max_concurrent: Annotated[
        int,
        typer.Option(
            "--max-concurrent", help="Prediction requests in flight at once; more get HTTP 503 (retry)."
        ),
    ] = 64,
    max_studies: Annotated[
        int,
        typer.Option(
            "--max-studies", help="Viewer studies kept loaded at once (least recently used closed first)."
        ),
    ] = 4,
    study_ttl_min: Annotated[
        float, typer.Option("--study-ttl-min", help="Minutes a viewer study stays loaded after its last use.")
    ] = 30.0,
) -> None:
    """Serve a local browser viewer (and JSON API) to classify lesions."""
    import math

    from liverlesion.runtime import check_backend, resolve_threads

    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise UserError(f"--max-upload-mb {max_upload_mb:g}: must be a positive number of MiB (default 2048)")
    resources(device, threads, batch_size)
    check_backend(backend)
    from liverlesion.serve import serve as run_server

    run_server(
        model,
        host=host,
        port=port,
        max_upload_bytes=int(max_upload_mb * 1024**2),
        device=device,
        backend=backend,
        threads=resolve_threads(threads),
        batch_size=batch_size,
        max_concurrent=max_concurrent,
        max_studies=max_studies,
        study_ttl_s=study_ttl_min * 60.0,
    )
