"""``liverlesion import ...``: public dataset layouts -> a liverlesion manifest (thin commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from liverlesion.cli_common import (
    DEPRECATED_OUT,
    OverwriteOpt,
    import_app,
    out_dir,
    out_opt,
    output,
)


@import_app.command("ircadb")
def import_ircadb(
    src: Annotated[
        Path, typer.Argument(help="3D-IRCADb-01 folder (holding 3Dircadb1.N) or one 3Dircadb1.N.")
    ],
    out: Annotated[
        Optional[Path], typer.Argument(metavar="[OUT]", help=DEPRECATED_OUT, show_default=False)
    ] = None,
    out_opt: Annotated[Optional[Path], out_opt("Output folder for NIfTI files and manifest.csv.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Import 3D-IRCADb-01 (tumours -> metastasis, cysts -> cyst)."""
    from liverlesion.datasets.ircadb import import_ircadb as _imp
    from liverlesion.datasets.ircadb import import_summary

    out, name = output(out_opt, out, "output folder")
    out_dir(out, name)
    manifest = _imp(src, out, overwrite=overwrite)
    typer.echo(import_summary(manifest.parent))


ClassMapOpt = Annotated[
    list[str],
    typer.Option(
        "--class-map",
        help="Label value (or its dataset.json name) = lesion class, e.g. 2=metastasis; repeatable or "
        "comma-separated. Each connected component of a mapped value is a lesion.",
    ),
]
ImportToleranceOpt = Annotated[
    float, typer.Option("--tolerance", help="Geometry tolerance (mm) between each CT and its label map.")
]


@import_app.command("msd")
def import_msd(
    src: Annotated[
        Path,
        typer.Argument(help="Decathlon task folder, e.g. Task03_Liver (dataset.json, imagesTr/, labelsTr/)."),
    ],
    class_map: ClassMapOpt,
    out: Annotated[Path, out_opt("Output folder for lesion masks and manifest.csv.", typed_required=True)],
    tolerance: ImportToleranceOpt = 1e-3,
    overwrite: OverwriteOpt = False,
) -> None:
    """Import a Medical Segmentation Decathlon task (e.g. Task03_Liver: --class-map 2=metastasis)."""
    from liverlesion.datasets.labelmap import import_summary
    from liverlesion.datasets.msd import import_msd as _imp

    out_dir(out, "--out")
    manifest = _imp(src, out, class_map, overwrite=overwrite, tolerance=tolerance)
    typer.echo(import_summary(manifest.parent))


@import_app.command("folder")
def import_folder(
    src: Annotated[
        Path,
        typer.Argument(
            help="nnU-Net raw dataset (dataset.json, imagesTr/, labelsTr/) or a folder with images/ + labels/."
        ),
    ],
    class_map: ClassMapOpt,
    out: Annotated[Path, out_opt("Output folder for lesion masks and manifest.csv.", typed_required=True)],
    tolerance: ImportToleranceOpt = 1e-3,
    overwrite: OverwriteOpt = False,
) -> None:
    """Import CT + label-map pairs (nnU-Net raw layout, or images/ + labels/ matched by case name)."""
    from liverlesion.datasets.folder import import_folder as _imp
    from liverlesion.datasets.labelmap import import_summary

    out_dir(out, "--out")
    manifest = _imp(src, out, class_map, overwrite=overwrite, tolerance=tolerance)
    typer.echo(import_summary(manifest.parent))


@import_app.command("tcia-crlm")
def import_tcia_crlm(
    src: Annotated[
        Path,
        typer.Argument(
            help="TCIA Colorectal-Liver-Metastases download (manifest-*, collection or CRLM-CT-NNNN)."
        ),
    ],
    out: Annotated[
        Path, out_opt("Output folder for manifest.csv and the import report.", typed_required=True)
    ],
    overwrite: OverwriteOpt = False,
) -> None:
    """Import TCIA Colorectal-Liver-Metastases (tumour segments -> metastasis; CT and SEG used in place)."""
    from liverlesion.datasets.tcia_crlm import import_summary as _summary
    from liverlesion.datasets.tcia_crlm import import_tcia_crlm as _imp

    out_dir(out, "--out")
    manifest = _imp(src, out, overwrite=overwrite)
    typer.echo(_summary(manifest.parent))
