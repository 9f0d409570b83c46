"""The `Volume` type: voxels in HU together with their geometry.

Canonical orientation (every reader returns this):

* ``array`` is indexed ``[z, y, x]`` (slice, row, column), as SimpleITK's
  ``GetArrayFromImage`` gives it.
* The volume is resampled-free reoriented (axis permutation/flips only) so that
  the direction matrix is the identity in **LPS**: ``x`` increases towards the
  patient's Left, ``y`` towards Posterior, ``z`` towards Superior. Row 0 is the
  most anterior row, column 0 the patient's rightmost column, slice 0 the most
  inferior slice. This is the DICOM patient coordinate system, so physical
  points (``x_mm, y_mm, z_mm``) from a PACS viewer can be used directly.
* ``spacing`` is in **array axis order** ``(z, y, x)``, in mm.
* ``origin`` is the physical LPS position ``(x, y, z)`` in mm of voxel ``[0, 0, 0]``.
* ``direction`` is the 3x3 direction cosine matrix (columns = x, y, z index axes
  in LPS), kept for images that could not be made axis-aligned (oblique).

A volume read from DICOM carries a :class:`DicomReference` in ``Volume.dicom``: the
UIDs and the source header that writers of DICOM objects (SR, SEG) need. That header
identifies the patient, so the reference is kept out of ``repr``, never copied to
masks made with :meth:`Volume.with_array`, and must never be printed, logged or
written anywhere but into a DICOM object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False, repr=False)
class DicomReference:
    """The DICOM series a volume was read from, for writers of DICOM objects (SR, SEG).

    Attributes:
        study_instance_uid: StudyInstanceUID of the series (None when the files lack it).
        series_instance_uid: SeriesInstanceUID.
        frame_of_reference_uid: FrameOfReferenceUID (None when absent).
        sop_class_uid: SOPClassUID of the image instances.
        sop_instance_uids: SOPInstanceUIDs; in array slice order when
            ``slices_along_array_z`` (``sop_instance_uids[k]`` is array slice ``k``),
            else in file/frame order.
        slices_along_array_z: Each source instance is one array z-slice.
        header: The first instance's pydicom Dataset without pixel data. It holds the
            patient/study module (identifying): only DICOM writers may read it.
    """

    study_instance_uid: str | None
    series_instance_uid: str | None
    frame_of_reference_uid: str | None
    sop_class_uid: str | None
    sop_instance_uids: tuple[str, ...]
    slices_along_array_z: bool
    header: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "sop_instance_uids", tuple(str(u) for u in self.sop_instance_uids))

    def __repr__(self) -> str:
        # Not the UIDs nor the header: a repr ends up in logs and tracebacks.
        return f"DicomReference({len(self.sop_instance_uids)} instance(s); identifying header withheld)"

    __str__ = __repr__

    def replace(self, **changes: Any) -> DicomReference:
        """A copy with some fields changed (the header is shared, not copied)."""
        return dataclasses.replace(self, **changes)


def withheld_uid(uid: str | None) -> str | None:
    """What an output file (results.json, a patch cache's provenance) keeps of a UID the user chose
    (``--series``): that one was chosen, not the UID, which identifies the study; only the DICOM
    objects written (SR, SEG) carry UIDs. The error that lists a folder's series still shows them."""
    return "given (UID withheld)" if uid else None


_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # (negative, positive) end of LPS x, y, z


def orientation_code(direction: np.ndarray) -> str:
    """Three letters naming where the x, y, z index axes point (``"LPS"`` for canonical).

    Each letter is the patient direction closest to that axis; ``" (oblique)"`` is
    appended when an axis is more than about 2.5 degrees off it.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    letters = []
    for col in d.T:
        k = int(np.argmax(np.abs(col)))
        letters.append(_AXIS_LETTERS[k][int(col[k] > 0)])
    oblique = bool(np.min(np.max(np.abs(d), axis=0)) < 0.999)
    return "".join(letters) + (" (oblique)" if oblique else "")


def _num(v: float) -> str:
    return f"{float(v):.3f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid without its voxels: what an image's header says, in :class:`Volume`'s conventions.

    The header-only readers (``liverlesion.io.read_grid``) return it, with the canonical
    orientation the full read would give, so that ``io.check_geometry`` compares it with another
    grid (or a :class:`Volume`) exactly as it compares loaded volumes.

    Attributes:
        shape: Array shape ``(z, y, x)`` the full read would give.
        spacing: Voxel size in mm, ``(z, y, x)``.
        origin: LPS position in mm ``(x, y, z)`` of voxel ``[0, 0, 0]``.
        direction: 3x3 direction cosines (columns = x, y, z index axes in LPS).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=float).reshape(3, 3))


@dataclass(repr=False)
class Volume:
    """A 3-D image with geometry.

    Attributes:
        array: Voxel values, ``[z, y, x]``. HU (float32) for CT, integers for masks.
        spacing: Voxel size in mm, in array axis order ``(z, y, x)``.
        origin: LPS position in mm ``(x, y, z)`` of voxel ``[0, 0, 0]``.
        direction: 3x3 direction cosines (SimpleITK convention, row-major).
        meta: Non-identifying metadata (modality, manufacturer, series description,
            source path, format); never DICOM patient tags or UIDs.
        dicom: Where the volume came from in DICOM (None for other formats and for
            masks); identifying, see :class:`DicomReference`.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    meta: dict[str, Any] = field(default_factory=dict)
    dicom: DicomReference | None = None

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        assert self.array.ndim == 3, f"Volume array must be 3-D, got shape {self.array.shape}"

    def __repr__(self) -> str:
        a = self.array
        if a.size == 0:
            values = "empty"
        else:
            lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.dtype.kind == "f" else (a.min(), a.max())
            what = "HU" if a.dtype.kind == "f" else "values"
            values = f"{what} {_num(lo)}..{_num(hi)} ({a.dtype})"
        fmt = self.meta.get("format")
        return (
            f"Volume(shape (z,y,x) {self.shape}, spacing (z,y,x) ({', '.join(_num(s) for s in self.spacing)}) mm, "
            f"origin (x,y,z) ({', '.join(_num(o) for o in self.origin)}) mm, "
            f"orientation {orientation_code(self.direction)}, {values}"
            + (f", format {fmt}" if fmt else "")
            + (", DICOM reference withheld" if self.dicom is not None else "")
            + ")"
        )

    __str__ = __repr__

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_physical(self, index_zyx) -> np.ndarray:
        """Map (possibly fractional) array indices ``[..., (z, y, x)]`` to LPS mm ``(x, y, z)``."""
        idx = np.asarray(index_zyx, dtype=float)[..., ::-1]  # -> (x, y, z) index order
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing_xyz)) @ self.direction.T

    def physical_to_index(self, point_xyz) -> np.ndarray:
        """Map LPS mm ``(x, y, z)`` to fractional array indices ``(z, y, x)``."""
        p = np.asarray(point_xyz, dtype=float) - np.asarray(self.origin)
        idx_xyz = (p @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing_xyz)
        return idx_xyz[..., ::-1]

    def contains_index(self, index_zyx) -> bool:
        idx = np.asarray(index_zyx, dtype=float)
        return bool(np.all(idx >= -0.5) and np.all(idx <= np.asarray(self.shape) - 0.5))

    def geometry(self) -> dict[str, Any]:
        """Geometry as plain values (for messages and JSON)."""
        return {
            "shape_zyx": list(self.shape),
            "spacing_zyx_mm": [round(s, 4) for s in self.spacing],
            "origin_xyz_mm": [round(o, 3) for o in self.origin],
            "direction": [round(float(d), 4) for d in self.direction.ravel()],
        }

    def to_sitk(self):
        """Convert to a SimpleITK image (same geometry)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing_xyz)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.ravel()))
        return img

    @classmethod
    def from_sitk(cls, img, meta: dict[str, Any] | None = None, reorient: bool = True) -> Volume:
        """Build a Volume from a SimpleITK image, reoriented to canonical LPS when possible."""
        import SimpleITK as sitk

        if reorient:
            img = sitk.DICOMOrient(img, "LPS")
        sx, sy, sz = img.GetSpacing()
        return cls(
            array=sitk.GetArrayFromImage(img),
            spacing=(sz, sy, sx),
            origin=img.GetOrigin(),
            direction=np.asarray(img.GetDirection()).reshape(3, 3),
            meta=dict(meta or {}),
        )

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """A new Volume with the same geometry and another array (e.g. a mask).

        The DICOM reference is not carried over: a mask made from an image is not that series.
        """
        assert array.shape == self.array.shape, (array.shape, self.array.shape)
        return Volume(array, self.spacing, self.origin, self.direction.copy(), {**self.meta, **meta})
