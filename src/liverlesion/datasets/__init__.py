"""Importers that turn public dataset layouts into a liverlesion manifest.

* :func:`liverlesion.datasets.ircadb.import_ircadb`: 3D-IRCADb-01 (IRCAD, CC BY-NC-ND 4.0).
* :func:`liverlesion.datasets.msd.import_msd`: a Medical Segmentation Decathlon task (CC BY-SA 4.0).
* :func:`liverlesion.datasets.folder.import_folder`: nnU-Net raw, or ``images/`` + ``labels/`` pairs.
* :func:`liverlesion.datasets.tcia_crlm.import_tcia_crlm`: TCIA Colorectal-Liver-Metastases (CC BY 4.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from liverlesion.errors import UserError

__all__ = ["import_folder", "import_ircadb", "import_msd", "import_tcia_crlm", "refuse_empty_import"]


def refuse_empty_import(
    source: str | Path, n_cases: int, unit: str, reasons: Sequence[str], fix: str
) -> None:
    """Refuse an import that found no lesion in any case, with the first reasons why.

    Every importer calls it inside its ``atomic_dir`` block, before writing the manifest, so a refused
    import leaves no output folder (an empty manifest would only fail later, in ``cv`` or ``inspect``).

    Args:
        source: The folder read.
        n_cases: How many cases (patients) were read.
        unit: ``"patient"`` or ``"case"``.
        reasons: One line per case on why it gave no lesion (``"ID: reason"``).
        fix: What to try, in a few words.
    """
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    raise UserError(
        f"{source}: no lesions found in {n_cases} {unit}{'s' if n_cases != 1 else ''}"
        f"{f' ({shown})' if shown else ''}; nothing was written: {fix}"
    )


def __getattr__(name: str):
    # Lazy, so `import liverlesion.datasets` does not pull in SimpleITK/scipy.
    if name == "import_ircadb":
        from liverlesion.datasets.ircadb import import_ircadb

        return import_ircadb
    if name == "import_msd":
        from liverlesion.datasets.msd import import_msd

        return import_msd
    if name == "import_folder":
        from liverlesion.datasets.folder import import_folder

        return import_folder
    if name == "import_tcia_crlm":
        from liverlesion.datasets.tcia_crlm import import_tcia_crlm

        return import_tcia_crlm
    raise AttributeError(f"module 'liverlesion.datasets' has no attribute {name!r}")
