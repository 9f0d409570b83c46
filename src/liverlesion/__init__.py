"""liverlesion: focal liver lesion classification on abdominal CT.

Research use, not for diagnosis.
"""

from __future__ import annotations

__version__ = "0.1.0"

DISCLAIMER = "research use, not for diagnosis"

__all__ = ["__version__", "DISCLAIMER", "Classifier", "Volume", "read_volume"]


def _private_inductor_cache() -> None:
    """Keep torch's compile cache out of the user's TMPDIR.

    ``import timm`` imports torchvision, whose ``ops.roi_align`` imports ``torch._dynamo``; that
    creates ``$TMPDIR/torchinductor_<user>`` at import time although nothing here compiles. Unless the
    user chose a cache folder, point it at a private temp folder removed when the process exits.
    Child processes inherit the variable (and so the folder) and leave its removal to the parent.
    """
    import os
    import sys

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "torch._dynamo" in sys.modules:
        return
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="liverlesion-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    atexit.register(shutil.rmtree, folder, True)


_private_inductor_cache()


def __getattr__(name: str):
    # Lazy imports keep `import liverlesion` (and `liverlesion --help`) fast.
    if name == "Classifier":
        from liverlesion.classifier import Classifier

        return Classifier
    if name == "Volume":
        from liverlesion.volume import Volume

        return Volume
    if name == "read_volume":
        from liverlesion.io import read_volume

        return read_volume
    raise AttributeError(f"module 'liverlesion' has no attribute {name!r}")
