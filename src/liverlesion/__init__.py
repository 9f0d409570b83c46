"""liverlesion: focal liver lesion classification on abdominal CT.

Research use, not for diagnosis.
"""

from __future__ import annotations

__version__ = "0.1.0"

DISCLAIMER = "research use, not for diagnosis"

__all__ = ["__version__", "DISCLAIMER", "Classifier", "Volume", "read_volume"]


def __getattr__(name: str):
    # Lazy imports keep `import liverlesion` (and `liverlesion --help`) fast.
    if name == "Classifier":
        from liverlesion.predict import Classifier

        return Classifier
    if name == "Volume":
        from liverlesion.volume import Volume

        return Volume
    if name == "read_volume":
        from liverlesion.io import read_volume

        return read_volume
    raise AttributeError(f"module 'liverlesion' has no attribute {name!r}")
