"""Importers that turn public dataset layouts into a liverlesion manifest.

* :func:`liverlesion.datasets.ircadb.import_ircadb`: 3D-IRCADb-01 (IRCAD, CC BY-NC-ND 4.0).
* :func:`liverlesion.datasets.msd.import_msd`: a Medical Segmentation Decathlon task (CC BY-SA 4.0).
* :func:`liverlesion.datasets.folder.import_folder`: nnU-Net raw, or ``images/`` + ``labels/`` pairs.
* :func:`liverlesion.datasets.tcia_crlm.import_tcia_crlm`: TCIA Colorectal-Liver-Metastases (CC BY 4.0).
"""

from __future__ import annotations

__all__ = ["import_folder", "import_ircadb", "import_msd", "import_tcia_crlm"]


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
