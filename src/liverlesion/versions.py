"""Which library versions a run used: one list, read without importing the libraries themselves."""

from __future__ import annotations

import platform
from importlib import metadata

LIBRARIES = (
    "numpy",
    "pandas",
    "scikit-learn",
    "scipy",
    "matplotlib",
    "torch",
    "torchvision",
    "timm",
    "lightning",
    "grad-cam",
    "onnxruntime",
    "SimpleITK",
    "pydicom",
    "highdicom",
    "nibabel",
)


def library_versions() -> dict[str, str]:
    """``{package: version}`` of :data:`LIBRARIES` ("not installed" where absent), plus Python's."""
    out = {"python": platform.python_version()}
    for pkg in LIBRARIES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
