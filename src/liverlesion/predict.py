"""Classify lesions in a new study with one or more checkpoints.

``Classifier`` is the Python API; ``predict_cli`` is what ``liverlesion predict``
runs. Both go through the same code, so they give the same numbers:

new study -> ``io.read_volume`` -> lesions (mask, click or manifest, ``lesions.py``)
-> ``patches.extract_patch`` with the checkpoint's own patch settings -> each
ensemble member's temperature-scaled softmax (2-D mode: mean over the lesion's
slice samples) -> mean over members (and their spread) -> class, using the
checkpoint's threshold for the positive class in the binary case.

A lesion whose smallest axis is below ``min_size_mm`` is not classified: the
network was never shown such lesions, and a confident-looking probability on
a few voxels would mislead. It is reported as "too small to characterise".

Outputs are research results, not a diagnosis; every file says so.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion import DISCLAIMER, __version__
from liverlesion.errors import UserError
from liverlesion.volume import Volume

__all__ = [
    "Classifier",
    "Results",
    "format_results",
    "TOO_SMALL",
    "check_ct_volume",
    "draw_lesion_overlay",
    "parse_point",
    "predict_cli",
    "result_columns",
    "results_info",
    "safe_name",
]

from liverlesion.decision import CLASSIFIED, TOO_SMALL  # noqa: E402  (the one definition)

OVERLAY_CAPTION = "Research use, not for diagnosis"

# Spacing beyond this is not a CT voxel (mm); usually a unit error (cm / m) in a converted file.
_MAX_SPACING_MM = 50.0


# --------------------------------------------------------------------------- ensemble members


@dataclass
class _Member:
    path: Path
    model: Any  # torch.nn.Module (LesionNet), or onnx_backend.OnnxNet (its exported graph)
    ckpt: dict  # the checkpoint without weights (onnx: the same fields, from the export's sidecar)
    sha256: str
    torch_model: Any = None  # with onnx: the LesionNet, loaded only when Grad-CAM needs it

    @property
    def backend(self) -> str:
        return "onnx" if getattr(self.model, "takes_numpy", False) else "torch"

    def network(self, device: str = "cpu"):
        """The torch LesionNet (for Grad-CAM); with the onnx backend loaded now, once."""
        if self.backend == "torch":
            return self.model
        if self.torch_model is None:
            from liverlesion.model import load_checkpoint

            self.torch_model = load_checkpoint(self.path)[0].eval().to(device)
        return self.torch_model

    @property
    def temperature(self) -> float:
        t = self.ckpt.get("temperature")
        return float(t) if t is not None and math.isfinite(float(t)) and float(t) > 0 else 1.0

    @property
    def threshold(self) -> float | None:
        t = self.ckpt.get("threshold")
        return None if t is None or not math.isfinite(float(t)) else float(t)

    def describe(self) -> dict[str, Any]:
        """Plain values for results.json (no weights, no patient data)."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "liverlesion_version": self.ckpt.get("liverlesion_version"),
            "fold": self.ckpt.get("fold"),
            "backbone": (self.ckpt.get("config") or {}).get("model", {}).get("backbone"),
            "temperature": self.temperature,
            "threshold": self.threshold,
            "positive_class": self.ckpt.get("positive_class"),
            "created": self.ckpt.get("created"),
            "backend": self.backend,
            "onnx": str(self.model.path) if self.backend == "onnx" else None,
        }


@dataclass
class _LesionResult:
    """One lesion's row plus the arrays needed for overlays and the SR (kept out of the table)."""

    row: dict[str, Any]
    lesion: Any  # lesions.Lesion
    mask: np.ndarray  # full-size bool
    patch: Any  # patches.LesionPatch
    cam: np.ndarray | None = None
    domain: dict[str, float] | None = None  # liverlesion.domain statistics of this lesion


@dataclass
class _Case:
    """One image with its lesion results."""

    image: Volume
    image_ref: str
    results: list[_LesionResult] = field(default_factory=list)


# --------------------------------------------------------------------------- input checks


def parse_point(text: str, name: str = "--point") -> tuple[float, float, float]:
    """Parse ``"x,y,z"`` (LPS mm) into three finite floats.

    Raises:
        UserError: Not three comma-separated finite numbers.
    """
    parts = [p.strip() for p in str(text).strip().strip("()[]").split(",")]
    if len(parts) != 3 or not all(parts):
        raise UserError(
            f'{name} {text!r}: expected three comma-separated numbers x,y,z in LPS mm, e.g. {name} "-12.5,40,101"'
        )
    try:
        values = tuple(float(p) for p in parts)
    except ValueError as exc:
        raise UserError(
            f'{name} {text!r}: not numbers; expected x,y,z in LPS mm, e.g. {name} "-12.5,40,101"'
        ) from exc
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{name} {text!r}: coordinates must be finite numbers (x,y,z in LPS mm)")
    return values  # type: ignore[return-value]


def check_ct_volume(volume: Volume, name: str = "image") -> None:
    """Refuse volumes that cannot be CT in Hounsfield units with usable geometry.

    Readers already refuse 2-D images, non-CT DICOM modalities and NIfTI headers with zero or
    negative voxel sizes; this catches what reaches us as an in-memory Volume: bad or absurd spacing, a non-CT
    modality recorded in ``meta``, and values that were never rescaled to HU.

    Raises:
        UserError: One line naming ``name``.
    """
    spacing = np.asarray(volume.spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0) or np.any(spacing > _MAX_SPACING_MM):
        raise UserError(
            f"{name}: voxel spacing {tuple(round(float(s), 4) for s in spacing)} mm (z, y, x) is not a CT geometry "
            f"(each must be > 0 and <= {_MAX_SPACING_MM:g} mm); the file's header is broken or not in mm: "
            "re-export the CT with its real spacing (e.g. from DICOM with dcm2niix)"
        )
    if not np.all(np.isfinite(volume.direction)) or abs(abs(np.linalg.det(volume.direction)) - 1) > 1e-2:
        raise UserError(
            f"{name}: direction matrix {np.round(volume.direction.ravel(), 3).tolist()} is not a rotation; "
            "re-export the CT with valid orientation"
        )
    modality = str(volume.meta.get("modality") or "").upper()
    if modality and modality != "CT":
        raise UserError(
            f"{name}: modality {modality}, not CT; this tool works on CT in Hounsfield units: pass a CT series"
        )
    if min(volume.shape) < 2:
        raise UserError(
            f"{name}: shape {volume.shape} (z, y, x) is not a 3-D volume; pass the whole CT series"
        )
    lo = float(np.min(volume.array))
    if lo >= 0:
        raise UserError(
            f"{name}: no negative values (min {lo:g}, max {float(np.max(volume.array)):g}); CT in Hounsfield units "
            "has air near -1000 and fat near -100, so this is not CT in HU (rescale slope/intercept not applied, "
            "or not a CT): convert it to HU"
        )


def safe_name(name: str) -> str:
    """A file-name-safe version of a lesion id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "lesion"


_sanitize = safe_name


def _entropy_bits(p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=float), 1e-12, 1.0)
    return float(-(p * np.log2(p)).sum())


# --------------------------------------------------------------------------- Classifier


class Classifier:
    """One checkpoint or an ensemble of checkpoints, ready to classify lesions.

    Use :meth:`load`. All members share class names, input channels and patch
    settings (checked on load).

    Example:
        >>> clf = Classifier.load(["fold_0/model.pt", "fold_1/model.pt"])  # doctest: +SKIP
        >>> df = clf.predict(read_volume("ct/"), mask=read_volume("mask.nii.gz", kind="mask"))  # doctest: +SKIP
    """

    def __init__(
        self, members: list[_Member], device: str = "cpu", batch_size: int = 64, threads: int | None = None
    ):
        assert members, "a Classifier needs at least one checkpoint"
        from liverlesion.config import config_from_dict

        self.members = members
        self.device = device
        self.batch_size = int(batch_size)  # patches per forward call
        self.threads = threads  # CPU threads asked for (None: as found)
        first = members[0].ckpt
        self.config = config_from_dict(first["config"])
        self.class_names: list[str] = [str(c) for c in first["class_names"]]
        self.in_chans = int(first["in_chans"])
        positive = first.get("positive_class")
        self.positive_class: str | None = positive if positive in self.class_names else None
        thresholds = [m.threshold for m in members if m.threshold is not None]
        if len(self.class_names) == 2 and self.positive_class is not None and thresholds:
            # Each fold chose its own threshold on its inner validation set; the
            # ensemble uses their mean (recorded in every result).
            self.threshold: float | None = float(np.mean(thresholds))
            self.decision_rule = (
                f"{self.positive_class} if P({self.positive_class}) >= {self.threshold:.4g} "
                + (
                    "(checkpoint threshold)"
                    if len(members) == 1
                    else f"(mean of {len(thresholds)} checkpoint thresholds)"
                )
            )
        else:
            self.threshold = None
            self.decision_rule = "class with the highest probability"

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        ckpt: str | os.PathLike | Sequence[str | os.PathLike],
        device: str = "auto",
        backend: str = "auto",
        threads: int | None = None,
        batch_size: int | None = None,
    ) -> Classifier:
        """Load one checkpoint, or several as an ensemble.

        Args:
            ckpt: A ``model.pt`` path or a list of them.
            device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            backend: ``"torch"``, ``"onnx"`` (onnxruntime on the CPU, from the up-to-date
                ``model.onnx`` that ``liverlesion export`` writes next to each checkpoint; torch
                is not imported) or ``"auto"`` (onnx when on the CPU and every checkpoint has
                such an export, else torch). Both give the same probabilities (to 1e-4).
            threads: CPU threads (onnxruntime's pool; torch's intra-op threads, set globally).
                Default: torch's own setting; onnxruntime: the free cores.
            batch_size: Patches per forward call (default 64).

        Raises:
            UserError: Unreadable/foreign/newer checkpoint, ensemble members that disagree on
                class names, positive class, input channels or patch settings, a bad device, or
                ``backend="onnx"`` without an up-to-date export.
        """
        from liverlesion.onnx_backend import OnnxNet, checkpoint_view, file_hash, fresh_export
        from liverlesion.runtime import (
            apply_torch_threads,
            check_backend,
            check_device,
            check_positive_int,
            cuda_maybe_present,
            resolve_threads,
            resolve_torch_device,
        )

        paths = [Path(ckpt)] if isinstance(ckpt, str | os.PathLike) else [Path(p) for p in ckpt]
        if not paths:
            raise UserError(
                "--model: no checkpoint given; pass --model PATH/model.pt (repeat it for an ensemble)"
            )
        device = check_device(device)
        backend = check_backend(backend)
        check_positive_int(threads, "--threads", "CPU threads")
        batch_size = check_positive_int(batch_size, "--batch-size", "patches per forward call") or 64
        if backend == "onnx" and device.startswith("cuda"):
            raise UserError(
                f"--backend onnx with --device {device}: the onnx backend runs on the CPU; "
                "use --backend torch for CUDA, or --device cpu"
            )
        for p in paths:
            if not p.is_file():
                raise UserError(
                    f"--model {p}: file not found; give the path of a model.pt written by train or cv"
                )
        on_cpu = device == "cpu" or (device == "auto" and (backend == "onnx" or not cuda_maybe_present()))
        if backend != "torch" and on_cpu:
            hashes = [file_hash(p) for p in paths]
            found = [fresh_export(p, h) for p, h in zip(paths, hashes, strict=True)]
            missing = [why for f, why in found if f is None]
            if not missing:
                n = resolve_threads(threads)
                members = [
                    _Member(path=p, model=OnnxNet(f, info, threads=n), ckpt=checkpoint_view(info), sha256=h)
                    for p, h, (f, info) in zip(paths, hashes, found, strict=True)
                ]
                _check_members(members)
                return cls(members, device="cpu", batch_size=batch_size, threads=n)
            if backend == "onnx":
                raise UserError(f"--backend onnx: {missing[0]}; or use --backend torch")

        from liverlesion.model import checkpoint_hash, load_checkpoint

        device = resolve_torch_device(device)
        if threads is not None:
            apply_torch_threads(threads)
        members = []
        for p in paths:
            model, data = load_checkpoint(p)
            model.eval().to(device)
            members.append(_Member(path=p, model=model, ckpt=data, sha256=checkpoint_hash(p)))
        _check_members(members)
        return cls(members, device=device, batch_size=batch_size, threads=threads)

    @property
    def backend(self) -> str:
        """``"onnx"`` (onnxruntime) or ``"torch"``."""
        return self.members[0].backend

    def __repr__(self) -> str:
        pc = self.patch_config
        names = ", ".join(m.path.name if len(self.members) > 1 else str(m.path) for m in self.members)
        return (
            f"Classifier({self.n_models} model(s): {names}; classes {self.class_names}; "
            f"decision: {self.decision_rule}; patch {pc.mode} {pc.size_px} px, "
            f"window {pc.window_center:g}/{pc.window_width:g} HU; "
            f"{self.backend} on {self.device}; research use, not for diagnosis)"
        )

    # ------------------------------------------------------------------ properties
    @property
    def n_models(self) -> int:
        return len(self.members)

    @property
    def patch_config(self):
        """The PatchConfig every member was trained with."""
        return self.config.patch

    @property
    def model_version(self) -> str:
        """liverlesion version(s) that wrote the checkpoints."""
        versions = sorted({str(m.ckpt.get("liverlesion_version", "?")) for m in self.members})
        return ";".join(versions)

    @property
    def checkpoint_hashes(self) -> list[str]:
        return [m.sha256 for m in self.members]

    @property
    def training_domain(self) -> dict[str, Any] | None:
        """The training range of HU/spacing statistics (union over members; None for older checkpoints)."""
        from liverlesion.domain import merge_ranges

        return merge_ranges([m.ckpt.get("training_domain") for m in self.members])

    def domain_check(self, results: Sequence[_LesionResult]) -> dict[str, Any]:
        """New lesions' HU/spacing statistics against the checkpoint's training range."""
        from liverlesion.domain import STATS, check_domain

        table = pd.DataFrame([r.domain for r in results if r.domain], columns=list(STATS))
        return check_domain(self.training_domain, table)

    def describe(self) -> dict[str, Any]:
        """Run information for results.json."""
        return {
            "models": [m.describe() for m in self.members],
            "n_models": self.n_models,
            "class_names": self.class_names,
            "positive_class": self.positive_class,
            "threshold": self.threshold,
            "decision_rule": self.decision_rule,
            "patch": self.config.to_dict()["patch"],
        }

    # ------------------------------------------------------------------ inference
    @property
    def fusion_features(self) -> list[str]:
        """Names of the radiomics-style features a fusion model also reads ([] for a plain network)."""
        return list(self.members[0].model.fusion_features)

    def fusion_vector(self, patch, lesion) -> np.ndarray | None:
        """The fusion features of one lesion, from its patch and measurements (None for a plain network)."""
        if not self.fusion_features:
            return None
        from liverlesion.features import radiomics_features

        pc = self.patch_config
        feats = radiomics_features(
            patch.hu,
            patch.mask,
            float(patch.meta["pixel_mm"]),
            (pc.window_center, pc.window_width),
            {
                k: getattr(lesion, k)
                for k in ("volume_ml", "max_axial_diameter_mm", "min_axis_mm", "hu_mean", "hu_std")
            },
        )
        return np.array([feats.get(n, math.nan) for n in self.fusion_features], dtype=np.float64)

    def member_probs(self, patch_image: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """Per-member calibrated class probabilities ``(n_models, n_classes)`` for one lesion's patch.

        Args:
            patch_image: ``(S, C, H, W)`` in ``[0, 1]``; 2-D mode's slice samples are averaged.
            extra: The lesion's fusion features (:meth:`fusion_vector`) for a fusion model.
        """
        from liverlesion.inference import apply_temperature, lesion_logits

        x = np.asarray(patch_image, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim == 4 and x.shape[1] == 1 and self.in_chans > 1:
            x = np.repeat(x, self.in_chans, axis=1)  # 2-D mode: a grey slice fed as several channels
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise UserError(
                f"patch of shape {tuple(np.shape(patch_image))} does not fit the model: expected (S, {self.in_chans}, H, W) "
                f"as cut with the checkpoint's patch settings"
            )
        e = None if extra is None else np.asarray(extra, dtype=np.float64)[None]
        out = []
        for m in self.members:
            logits = lesion_logits(
                m.model, [x], e, tta=self.config.model.tta, batch_size=self.batch_size, device=self.device
            )
            out.append(apply_temperature(logits, m.temperature)[0])
        return np.stack(out)

    def predict_patch(self, patch_image: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """Ensemble-mean class probabilities ``(n_classes,)`` for one lesion's patch ``(S, C, H, W)``."""
        from liverlesion.inference import ensemble_probs

        return ensemble_probs(self.member_probs(patch_image, extra))

    def decide(self, probs: np.ndarray) -> str:
        """The predicted class for mean probabilities (the checkpoint's decision rule)."""
        from liverlesion.decision import decide

        return decide(probs, self.class_names, self.positive_class, self.threshold)[0]

    def gradcam(self, patch_image: np.ndarray, target_class: str | int) -> np.ndarray:
        """Grad-CAM ``(H, W)`` in ``[0, 1]`` on the patch's centre sample, averaged over members."""
        from liverlesion.gradcam import compute_cam

        target = self.class_names.index(target_class) if isinstance(target_class, str) else int(target_class)
        x = np.asarray(patch_image, dtype=np.float32)
        sample = x[x.shape[0] // 2]  # 2-D mode: the centre slice; 2.5-D: the only sample
        if sample.shape[0] == 1 and self.in_chans > 1:
            sample = np.repeat(sample, self.in_chans, axis=0)
        nets = [m.network(self.device) for m in self.members]
        if self.threads is not None:  # with onnx, torch was imported just now, with a thread per core
            from liverlesion.runtime import apply_torch_threads

            apply_torch_threads(self.threads)
        cams = [np.asarray(compute_cam(net, sample, target), dtype=np.float32) for net in nets]
        return np.clip(np.mean(cams, axis=0), 0.0, 1.0)

    # ------------------------------------------------------------------ lesions
    def predict(
        self,
        volume: Volume,
        mask: Volume | np.ndarray | None = None,
        label: int | None = None,
        point: Sequence[float] | None = None,
        diameter_mm: float | None = None,
        min_size_mm: float = 5.0,
        patient_id: str = "case",
        gradcam: bool = False,
        *,
        tolerance: float = 1e-3,
        image_name: str = "image",
        mask_name: str = "mask",
        point_name: str = "point",
    ) -> pd.DataFrame:
        """Classify the lesions of one CT volume.

        Give either ``mask`` (every connected component, or only ``label``) or
        ``point`` + ``diameter_mm`` (a lesion grown from a click in LPS mm within the diameter;
        its measurements are marked "estimated from click").

        Args:
            volume: CT in HU (from ``read_volume``).
            mask: Lesion mask on the image grid (Volume, checked against the image, or array).
            label: Only this label of the mask (default: every connected component).
            point: Click ``(x, y, z)`` in LPS mm.
            diameter_mm: Lesion diameter in mm (with ``point``).
            min_size_mm: Lesions whose smallest axis is below this are flagged, not classified.
            patient_id: Used in the lesion ids (``{patient_id}-L01``); never taken from DICOM.
            gradcam: Also compute Grad-CAM maps; they are in ``df.attrs["gradcam"]`` (lesion_id -> (H, W)).
            tolerance: Geometry tolerance (mm) between image and mask.
            image_name: How the image is named in error messages.
            mask_name: How the mask is named in error messages.
            point_name: How the point is named in error messages.

        Returns:
            One row per lesion (see :func:`result_columns`).

        Raises:
            UserError: Bad volume, mask/point inputs or geometry mismatch.
        """
        case = self._predict_case(
            volume,
            mask=mask,
            label=label,
            point=point,
            diameter_mm=diameter_mm,
            min_size_mm=min_size_mm,
            patient_id=patient_id,
            gradcam=gradcam,
            tolerance=tolerance,
            image_name=image_name,
            mask_name=mask_name,
            point_name=point_name,
            image_ref=str(volume.meta.get("source") or ""),
        )
        df = self._frame([r.row for r in case.results])
        df.attrs["domain_check"] = self.domain_check(case.results)
        if gradcam:
            df.attrs["gradcam"] = {r.row["lesion_id"]: r.cam for r in case.results if r.cam is not None}
        return df

    def predict_manifest(
        self,
        manifest: str | os.PathLike,
        min_size_mm: float = 5.0,
        gradcam: bool = False,
        *,
        tolerance: float = 1e-3,
    ) -> pd.DataFrame:
        """Classify every lesion of a manifest CSV (the same path as ``liverlesion predict --manifest``).

        Args:
            manifest: A manifest (``patient_id,image,mask,label[,lesion_class]``); paths relative to it.
            min_size_mm: Lesions whose smallest axis is below this are flagged, not classified.
            gradcam: Also compute Grad-CAM maps (``df.attrs["gradcam"]``, lesion_id -> (H, W)).
            tolerance: Geometry tolerance (mm) between image and mask.

        Returns:
            One row per lesion (see :func:`result_columns`); ``true_class`` when the manifest has
            ``lesion_class``; ``df.attrs["domain_check"]``: the lesions' HU/spacing statistics against
            the checkpoint's training range (:func:`liverlesion.domain.check_domain`).

        Raises:
            UserError: Bad manifest rows, images or masks (one line naming the row's file).
        """
        cases = _predict_manifest(self, Path(manifest), min_size_mm, gradcam, tolerance)
        results = [r for case in cases for r in case.results]
        df = self._frame([r.row for r in results])
        df.attrs["domain_check"] = self.domain_check(results)
        if gradcam:
            df.attrs["gradcam"] = {r.row["lesion_id"]: r.cam for r in results if r.cam is not None}
        return df

    def predict_case(
        self,
        volume: Volume,
        *,
        mask: Volume | np.ndarray | None = None,
        label: int | None = None,
        point: Sequence[float] | None = None,
        diameter_mm: float | None = None,
        min_size_mm: float = 5.0,
        patient_id: str = "case",
        gradcam: bool = False,
        tolerance: float = 1e-3,
        image_name: str = "image",
        mask_name: str = "mask",
        point_name: str = "point",
        image_ref: str = "",
    ) -> _Case:
        """As :meth:`predict`, but the case itself: ``case.results[i]`` holds the row and the lesion's mask,
        patch and Grad-CAM (what overlays, the DICOM SR and ``serve``'s viewer draw from).

        Returns:
            The case; :meth:`results_frame` of ``[r.row for r in case.results]`` is :meth:`predict`'s table.

        Raises:
            UserError: As :meth:`predict`.
        """
        return self._predict_case(
            volume,
            mask=mask,
            label=label,
            point=point,
            diameter_mm=diameter_mm,
            min_size_mm=min_size_mm,
            patient_id=patient_id,
            gradcam=gradcam,
            tolerance=tolerance,
            image_name=image_name,
            mask_name=mask_name,
            point_name=point_name,
            image_ref=image_ref,
        )

    def results_frame(self, rows: list[dict]) -> pd.DataFrame:
        """The results table (:func:`result_columns`, with the decision rule in ``attrs``) of result rows."""
        return self._frame(rows)

    def _predict_case(
        self,
        volume: Volume,
        *,
        mask,
        label,
        point,
        diameter_mm,
        min_size_mm,
        patient_id,
        gradcam,
        tolerance,
        image_name,
        mask_name,
        point_name,
        image_ref,
    ) -> _Case:
        from liverlesion.lesions import lesion_from_click, lesion_source_problem, lesions_from_mask

        _check_min_size(min_size_mm)
        problem = lesion_source_problem(mask is not None, point is not None, label is not None)
        if problem in ("both", "neither"):
            raise UserError(
                "give exactly one lesion source: a mask, or a point with diameter_mm "
                f"(got mask={'yes' if mask is not None else 'no'}, point={'yes' if point is not None else 'no'})"
            )
        if problem == "label-without-mask":
            raise UserError(f"label={label}: a label selects a lesion in a mask; give the mask too")
        check_ct_volume(volume, image_name)
        if mask is not None:
            mask_vol = self._mask_volume(volume, mask, tolerance, image_name, mask_name)
            items = lesions_from_mask(
                volume,
                mask_vol,
                label,
                patient_id,
                "",
                first_number=int(label) if label else 1,  # a selected label keeps its value as the id
                image_ref=image_ref,
                mask_ref=str(mask_vol.meta.get("source") or ""),
                mask_name=mask_name,
            )
        else:
            if diameter_mm is None:
                raise UserError(f"{point_name}: a click needs the lesion diameter too (--diameter MM)")
            items = [
                lesion_from_click(
                    volume,
                    tuple(float(v) for v in point),
                    float(diameter_mm),
                    patient_id,
                    "",
                    image_ref=image_ref,
                    point_name=point_name,
                )
            ]
        case = _Case(image=volume, image_ref=image_ref)
        case.results = self._classify(volume, items, min_size_mm, gradcam, image_ref)
        return case

    @staticmethod
    def _mask_volume(volume: Volume, mask, tolerance: float, image_name: str, mask_name: str) -> Volume:
        from liverlesion.io import check_geometry

        if isinstance(mask, Volume):
            check_geometry(volume, mask, tolerance=tolerance, image_name=image_name, mask_name=mask_name)
            return mask
        arr = np.asarray(mask)
        if arr.shape != volume.shape:
            raise UserError(
                f"{mask_name}: array shape {arr.shape} (z, y, x) differs from {image_name}'s {volume.shape}; "
                "give the mask drawn on this image"
            )
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        return volume.with_array(arr, source="")

    def _classify(
        self, volume: Volume, items: list, min_size_mm: float, gradcam: bool, image_ref: str
    ) -> list[_LesionResult]:
        from tqdm.auto import tqdm

        from liverlesion.decision import too_small as is_too_small
        from liverlesion.domain import lesion_stats
        from liverlesion.inference import ensemble_probs
        from liverlesion.patches import extract_patch

        results = []
        hashes = ";".join(self.checkpoint_hashes)
        for lesion, lmask in tqdm(
            items,
            desc="classifying lesions",
            unit="lesion",
            file=sys.stderr,
            disable=len(items) < 2,
            leave=False,
        ):
            patch = extract_patch(volume, lmask, self.patch_config)
            too_small = is_too_small(lesion.min_axis_mm, min_size_mm)
            probs = np.full(len(self.class_names), np.nan)
            uncertainty = entropy = math.nan
            pred = TOO_SMALL
            cam = None
            if not too_small:
                member = self.member_probs(patch.image, self.fusion_vector(patch, lesion))
                probs = ensemble_probs(member)
                pred = self.decide(probs)
                j = self.class_names.index(pred)
                uncertainty = float(member[:, j].std()) if len(member) > 1 else 0.0
                entropy = _entropy_bits(probs)
                if gradcam:
                    cam = self.gradcam(patch.image, j)
            row: dict[str, Any] = {
                "lesion_id": lesion.lesion_id,
                "patient_id": lesion.patient_id,
                "image": image_ref,
                "source": lesion.source,
                "label": lesion.label,
                "pred_class": pred,
                "status": TOO_SMALL if too_small else CLASSIFIED,
                "fusion_input": "" if not self.fusion_features else lesion.measurement,
                # "mask", or for a click "estimated from click ..." (grown, capped or sphere; click.py)
                "measurement": lesion.measurement,
            }
            for c, p in zip(self.class_names, probs, strict=True):
                row[f"prob_{c}"] = float(p)
            cx, cy, cz = lesion.centroid_mm
            row.update(
                {
                    "uncertainty": uncertainty,
                    "entropy_bits": entropy,
                    "threshold": self.threshold if self.threshold is not None else math.nan,
                    "positive_class": self.positive_class or "",
                    "max_axial_diameter_mm": float(lesion.max_axial_diameter_mm),
                    "min_axis_mm": float(lesion.min_axis_mm),
                    "volume_ml": float(lesion.volume_ml),
                    "n_voxels": int(lesion.n_voxels),
                    "hu_mean": float(lesion.hu_mean),
                    "hu_std": float(lesion.hu_std),
                    "centroid_x_mm": float(cx),
                    "centroid_y_mm": float(cy),
                    "centroid_z_mm": float(cz),
                    "centre_slice": int(patch.meta["centre_slice"]),
                    "n_models": self.n_models,
                    "model_version": self.model_version,
                    "checkpoint_sha256": hashes,
                    "disclaimer": DISCLAIMER,
                }
            )
            if lesion.lesion_class:
                row["true_class"] = lesion.lesion_class
            dom = lesion_stats(
                lesion.hu_mean,
                lesion.hu_std,
                patch.hu,
                patch.mask,
                float(patch.meta["pixel_mm"]),
                volume.spacing,
            )
            results.append(
                _LesionResult(row=row, lesion=lesion, mask=lmask, patch=patch, cam=cam, domain=dom)
            )
        return results

    def _frame(self, rows: list[dict]) -> pd.DataFrame:
        cols = result_columns(self.class_names)
        if any("true_class" in r for r in rows):
            cols.insert(cols.index("pred_class"), "true_class")
        df = Results(rows, columns=cols)
        df["label"] = df["label"].astype("Int64")
        df.attrs.update(
            class_names=list(self.class_names),
            positive_class=self.positive_class,
            decision_rule=self.decision_rule,
            n_models=self.n_models,
        )
        return df


class Results(pd.DataFrame):
    """The results table (one row per lesion, :func:`result_columns`); a plain DataFrame that prints short.

    ``print(clf.predict(...))`` shows the lesion id, class, probability, uncertainty and size of each
    lesion, the decision rule and the disclaimer; every column is still in the frame
    (``df.to_string()`` or ``pd.DataFrame(df)`` show them all).
    """

    @property
    def _constructor(self):
        return Results

    def __repr__(self) -> str:
        a = self.attrs
        if "class_names" not in a or not {"lesion_id", "pred_class", "uncertainty"} <= set(self.columns):
            return super().__repr__()  # a selection of columns: print it as pandas does
        return format_results(self, a["class_names"], a.get("positive_class"), a.get("decision_rule"))


def format_results(
    df: pd.DataFrame,
    class_names: Sequence[str],
    positive_class: str | None = None,
    decision_rule: str | None = None,
    n_models: int | None = None,
) -> str:
    """The short results table that ``predict`` prints (and ``print(results)`` shows)."""
    cols = ["lesion_id", "pred_class"]
    if positive_class is not None:
        cols.append(f"prob_{positive_class}")
    else:
        cols += [f"prob_{c}" for c in class_names]
    cols += ["uncertainty", "max_axial_diameter_mm", "volume_ml"]
    show = pd.DataFrame(df)[[c for c in cols if c in df.columns]]
    show = show.rename(columns={"max_axial_diameter_mm": "diam_mm", "volume_ml": "vol_ml"})
    with pd.option_context("display.max_rows", 40, "display.width", 160):
        table = show.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
    n_models = n_models if n_models is not None else df.attrs.get("n_models")
    tail = f"{len(df)} lesion(s)"
    if decision_rule:
        tail += f"; decision: {decision_rule}"
    if n_models:
        tail += f"; {n_models} model(s)"
    if "measurement" in df.columns and df["measurement"].astype(str).str.startswith("estimated").any():
        tail += "; sizes of clicked lesions are estimated from the click, not measured on a mask"
    return f"{table}\n{tail}\nliverlesion: {DISCLAIMER}"


def result_columns(class_names: Sequence[str]) -> list[str]:
    """Columns of the results table, in order (``true_class`` is added in manifest mode)."""
    return [
        "lesion_id",
        "patient_id",
        "image",
        "source",
        "label",
        "pred_class",
        *[f"prob_{c}" for c in class_names],
        "uncertainty",
        "entropy_bits",
        "threshold",
        "positive_class",
        "status",
        "fusion_input",
        "measurement",
        "max_axial_diameter_mm",
        "min_axis_mm",
        "volume_ml",
        "n_voxels",
        "hu_mean",
        "hu_std",
        "centroid_x_mm",
        "centroid_y_mm",
        "centroid_z_mm",
        "centre_slice",
        "n_models",
        "model_version",
        "checkpoint_sha256",
        "disclaimer",
    ]


def _check_min_size(min_size_mm: float) -> None:
    if not (math.isfinite(float(min_size_mm)) and min_size_mm >= 0):
        raise UserError(f"--min-size-mm {min_size_mm}: must be 0 or a positive number of mm (default 5)")


def _check_members(members: list[_Member]) -> None:
    """Ensemble members must agree on everything that shapes their input and output."""
    first = members[0]

    def key(m: _Member) -> dict[str, Any]:
        return {
            "class names": [str(c) for c in m.ckpt.get("class_names", [])],
            "positive class": m.ckpt.get("positive_class"),
            "input channels": int(m.ckpt.get("in_chans", -1)),
            "patch settings": (m.ckpt.get("config") or {}).get("patch"),
        }

    ref = key(first)
    for m in members[1:]:
        k = key(m)
        for what, value in k.items():
            if value != ref[what]:
                if what == "patch settings":
                    diff = sorted(
                        name
                        for name in set(value or {}) | set(ref[what] or {})
                        if (value or {}).get(name) != (ref[what] or {}).get(name)
                    )
                    shown = ", ".join(
                        f"{n}: {(ref[what] or {}).get(n)!r} vs {(value or {}).get(n)!r}" for n in diff
                    )
                else:
                    shown = f"{ref[what]!r} vs {value!r}"
                raise UserError(
                    f"--model {first.path} and --model {m.path} differ in {what} ({shown}); an ensemble needs "
                    "checkpoints trained with the same classes and patch settings: pass checkpoints of one run"
                )


# --------------------------------------------------------------------------- batch (manifest)


def _predict_manifest(
    clf: Classifier, manifest: Path, min_size_mm: float, gradcam: bool, tolerance: float = 1e-3
) -> list[_Case]:
    from liverlesion.manifest import read_manifest
    from liverlesion.manifest_lesions import iter_manifest_lesions

    _check_min_size(min_size_mm)
    table = read_manifest(manifest)
    cases = []
    for image, items in iter_manifest_lesions(table, tolerance):
        ref = str(image.meta.get("source") or "")
        check_ct_volume(image, f"--manifest {manifest} image {ref}")
        case = _Case(image=image, image_ref=ref)
        case.results = clf._classify(image, items, min_size_mm, gradcam, ref)
        cases.append(case)
    return cases


# --------------------------------------------------------------------------- outputs


def draw_lesion_overlay(result: _LesionResult, image: Volume, path: Path, class_names: Sequence[str]) -> Path:
    """Write a lesion's overlay PNG (atomically).

    Left: the lesion's centre slice (largest cross-section) in the liver window, as
    in a viewer (anterior up, patient right on the left), with the lesion outline.
    Right: the network's patch with the outline and, when computed, the Grad-CAM
    heat-map. Title: class and probabilities; caption: research use, not for diagnosis.
    """
    from matplotlib.figure import Figure

    from liverlesion.fileio import atomic_path
    from liverlesion.gradcam import draw_overlay
    from liverlesion.patches import window

    row, patch = result.row, result.patch
    z = int(row["centre_slice"])
    s = patch.image.shape[0] // 2  # 2-D mode: the centre sample; 2.5-D: the only one
    centre = patch.image[s, patch.image.shape[1] // 2]
    patch_mask = patch.mask[min(s, patch.mask.shape[0] - 1)]

    fig = Figure(figsize=(8.0, 4.6), dpi=100)
    ax = fig.add_subplot(1, 2, 1)
    # Liver window (W 250 / L 60, as the patches) for display.
    ax.imshow(
        window(image.array[z], 60.0, 250.0),
        cmap="gray",
        vmin=0,
        vmax=1,
        aspect=image.spacing[1] / image.spacing[2],
        interpolation="nearest",
    )
    if result.mask[z].any():
        ax.contour(result.mask[z].astype(float), levels=[0.5], colors="lime", linewidths=0.8)
    field_mm = float(patch.meta.get("field_mm", math.nan))
    _, cy, cx = patch.meta.get("centre_index_zyx", (z, math.nan, math.nan))
    if math.isfinite(field_mm) and math.isfinite(cy) and math.isfinite(cx):
        from matplotlib.patches import Rectangle

        # The field the network saw, as a box on the slice.
        hy, hx = field_mm / 2 / image.spacing[1], field_mm / 2 / image.spacing[2]
        ax.add_patch(
            Rectangle((cx - hx, cy - hy), 2 * hx, 2 * hy, fill=False, edgecolor="yellow", linewidth=0.8)
        )
        ax.set_xlim(-0.5, image.shape[2] - 0.5)
        ax.set_ylim(image.shape[1] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"axial slice {z} (anterior up, patient right on the left)", fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    draw_overlay(
        ax,
        centre,
        result.cam,
        patch_mask,
        title=f"patch, {field_mm:.0f} mm field" + (" + Grad-CAM" if result.cam is not None else ""),
    )
    if row["pred_class"] == TOO_SMALL:
        verdict = f"{TOO_SMALL} (smallest axis {row['min_axis_mm']:.1f} mm): not classified"
    else:
        probs = ", ".join(f"P({c}) {row[f'prob_{c}']:.2f}" for c in class_names)
        verdict = f"predicted {row['pred_class']}: {probs}, uncertainty {row['uncertainty']:.2f}"
    fig.suptitle(
        f"{row['lesion_id']}  {verdict}\n"
        f"diameter {row['max_axial_diameter_mm']:.1f} mm, volume {row['volume_ml']:.2f} mL",
        fontsize=9,
    )
    fig.text(0.5, 0.025, OVERLAY_CAPTION, ha="center", fontsize=11, color="darkred", weight="bold")
    fig.tight_layout(rect=(0, 0.06, 1, 0.9))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _source_info(case: _Case) -> dict[str, Any]:
    """Non-identifying facts about an input image (never DICOM patient tags or UIDs)."""
    meta = case.image.meta
    geo = case.image.geometry()
    return {
        "image": case.image_ref,
        "format": meta.get("format"),
        "modality": meta.get("modality"),
        "shape_zyx": geo["shape_zyx"],
        "spacing_zyx_mm": geo["spacing_zyx_mm"],
        "n_lesions": len(case.results),
    }


def _print_table(df: pd.DataFrame, clf: Classifier) -> None:
    print(format_results(df, clf.class_names, clf.positive_class, clf.decision_rule, clf.n_models))


def results_info(
    clf: Classifier, df: pd.DataFrame, min_size_mm: float, inputs: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The JSON record of a prediction run: tool, version, disclaimer, models, inputs, lesion rows."""
    return {
        "tool": "liverlesion",
        "liverlesion_version": __version__,
        "disclaimer": DISCLAIMER,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **clf.describe(),
        "min_size_mm": float(min_size_mm),
        "inputs": inputs,
        **extra,
        "lesions": df.astype(object).where(df.notna(), None).to_dict(orient="records"),
    }


def predict_cli(
    models: Sequence[Path],
    out: Path,
    image: Path | None = None,
    mask: Path | None = None,
    label: int | str | None = None,
    point: str | None = None,
    diameter: float | None = None,
    manifest: Path | None = None,
    series: str | None = None,
    min_size_mm: float = 5.0,
    dicom_sr: bool = False,
    dicom_seg: bool = False,
    gradcam: bool | None = True,
    overwrite: bool = False,
    tolerance: float = 1e-3,
    patient_id: str | None = None,
    device: str = "auto",
    backend: str = "auto",
    threads: int | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """``liverlesion predict``: classify lesions and write results into ``out``.

    Exactly one lesion source: ``mask`` (with ``image``), ``point`` + ``diameter``
    (with ``image``), or ``manifest``. Writes ``results.csv``, ``results.json``,
    ``overlays/<lesion_id>.png`` and, with ``dicom_sr``, ``report.dcm`` (single
    image) or ``reports/<patient>_<n>.dcm`` (manifest); with ``dicom_seg``, the lesion
    masks used as ``segmentation.dcm`` / ``segmentations/<patient>_<n>.dcm`` (DICOM SEG,
    referred to by the SR). ``mask`` may be a DICOM SEG; ``label`` then selects segments
    (see :mod:`liverlesion.dicom_seg`). ``out`` appears complete or not at all.

    ``patient_id`` (``--image`` only) names the lesions ``{patient_id}-L01``, ...
    (default ``case``); with ``manifest`` the ids come from its patient_id column.

    ``device``, ``backend``, ``threads`` and ``batch_size`` go to :meth:`Classifier.load`;
    ``threads=None`` means the free cores. ``gradcam=None``: Grad-CAM with the torch backend,
    none with onnx (a Grad-CAM needs the torch network, whose import is most of a run's time).

    Returns:
        The results table (as written to results.csv).

    Raises:
        UserError: Bad option combination or input; nothing is written.
    """
    from liverlesion.fileio import atomic_dir, write_csv, write_json

    sources = {"--mask": mask is not None, "--point": point is not None, "--manifest": manifest is not None}
    given = [k for k, v in sources.items() if v]
    allowed = "use exactly one of: --image IMG --mask MASK [--label N] | --image IMG --point x,y,z --diameter MM | --manifest CSV"
    if len(given) != 1:
        what = "none of --mask/--point/--manifest" if not given else " and ".join(given)
        raise UserError(f"predict: got {what}; {allowed}")
    if manifest is not None and image is not None:
        raise UserError(
            f"--manifest {manifest} with --image {image}: the manifest names the images; {allowed}"
        )
    if manifest is None and image is None:
        raise UserError(f"{given[0]} needs --image (the CT: DICOM folder/zip or NIfTI); {allowed}")
    if manifest is not None and series is not None:
        raise UserError(f"--series {series}: applies to --image only; with --manifest use its series column")
    if manifest is not None and patient_id is not None:
        raise UserError(
            f"--patient-id {patient_id!r}: applies to --image only; with --manifest the ids come from its patient_id column"
        )
    if patient_id is not None and not patient_id.strip():
        raise UserError(
            "--patient-id '': must not be empty; give an id such as case01, or leave the option out"
        )
    if mask is not None and image is not None and Path(mask).resolve() == Path(image).resolve():
        raise UserError(f"--mask {mask}: is the --image itself; give the lesion mask file")
    from liverlesion.lesions import check_diameter, lesion_source_problem

    problem = lesion_source_problem(
        mask is not None, point is not None, label is not None, diameter is not None, require_one=False
    )
    if problem == "label-without-mask":
        raise UserError(f"--label {label}: selects a lesion in --mask; give --mask too, or drop --label")
    if problem == "point-without-diameter":
        raise UserError(f"--point {point}: also give --diameter MM (the lesion's approximate diameter)")
    if problem == "diameter-without-point":
        raise UserError(
            f"--diameter {diameter}: only used with --point x,y,z; add --point or drop --diameter"
        )
    if diameter is not None:
        check_diameter(diameter, "--diameter")
    xyz = parse_point(point) if point is not None else None
    _check_min_size(min_size_mm)
    from liverlesion.dicom_seg import check_cli_mask_label

    label_given = label
    mask_is_seg, label = check_cli_mask_label(mask, label)
    if dicom_sr or dicom_seg:  # before any compute: every image must be a DICOM series
        from liverlesion.sr import check_sr_inputs

        for flag in ("--dicom-sr",) * dicom_sr + ("--dicom-seg",) * dicom_seg:
            check_sr_inputs(image=image, manifest=manifest, option=flag)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"--out {out}: folder already exists and is not empty; choose another path or pass --overwrite"
        )

    from liverlesion.runtime import resolve_threads

    clf = Classifier.load(
        list(models), device=device, backend=backend, threads=resolve_threads(threads), batch_size=batch_size
    )
    if gradcam is None:
        gradcam = clf.backend == "torch"
    if manifest is not None:
        cases = _predict_manifest(clf, Path(manifest), min_size_mm, gradcam, tolerance)
    else:
        from liverlesion.io import read_volume

        volume = read_volume(image, series=series, kind="image", name="--image")
        seg_labels = None
        if mask_is_seg:
            from liverlesion.dicom_seg import seg_mask, union_if_several

            seg_labels, label = seg_mask(
                mask, volume, label, tolerance=tolerance, name="--mask", image_name="--image"
            )
            mask_vol = union_if_several(seg_labels, label)
        else:
            mask_vol = read_volume(mask, kind="mask", name="--mask") if mask is not None else None
        cases = [
            clf._predict_case(
                volume,
                mask=mask_vol,
                label=label,
                point=xyz,
                diameter_mm=diameter,
                min_size_mm=min_size_mm,
                patient_id=patient_id.strip() if patient_id is not None else "case",
                gradcam=gradcam,
                tolerance=tolerance,
                image_name="--image",
                mask_name="--mask",
                point_name="--point",
                image_ref=str(image),
            )
        ]
        if seg_labels is not None:
            from liverlesion.dicom_seg import segment_of

            for r in cases[0].results:  # refer to each lesion by its segment
                r.lesion.label = r.row["label"] = segment_of(r.mask, seg_labels)
    if dicom_sr or dicom_seg:
        from liverlesion.seg_write import check_seg_source
        from liverlesion.sr import check_sr_source

        for case in cases:
            if dicom_sr:
                check_sr_source(case.image, case.image_ref)
            if dicom_seg:
                check_seg_source(case.image, case.image_ref)

    df = clf._frame([r.row for case in cases for r in case.results])
    inputs = {
        "image": str(image) if image is not None else None,
        "mask": str(mask) if mask is not None else None,
        "label": label_given,
        "dicom_seg": bool(dicom_seg),
        "point_xyz_mm": list(xyz) if xyz is not None else None,
        "diameter_mm": diameter,
        "manifest": str(manifest) if manifest is not None else None,
        "series": series,
        "patient_id": patient_id,
    }
    from liverlesion.domain import format_domain

    domain = clf.domain_check([r for case in cases for r in case.results])
    info = results_info(
        clf, df, min_size_mm, inputs, sources=[_source_info(c) for c in cases], domain_check=domain
    )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_csv(tmp / "results.csv", df)
        write_json(tmp / "results.json", info)
        used: set[str] = set()
        for case in cases:
            for r in case.results:
                name = _sanitize(r.row["lesion_id"])
                while name in used:  # ids differing only in unsafe characters
                    name += "_"
                used.add(name)
                draw_lesion_overlay(r, case.image, tmp / "overlays" / f"{name}.png", clf.class_names)
        if dicom_sr or dicom_seg:
            from liverlesion.seg_write import write_seg
            from liverlesion.sr import write_sr

            counts: dict[str, int] = {}
            for case in cases:
                if not case.results:
                    continue
                if manifest is None:
                    seg_path, sr_path = tmp / "segmentation.dcm", tmp / "report.dcm"
                else:
                    pid = _sanitize(str(case.results[0].row["patient_id"]))
                    counts[pid] = counts.get(pid, 0) + 1
                    seg_path = tmp / "segmentations" / f"{pid}_{counts[pid]}.dcm"
                    sr_path = tmp / "reports" / f"{pid}_{counts[pid]}.dcm"
                seg_ref = None
                if dicom_seg:
                    estimated = [r.row["lesion_id"] for r in case.results if r.lesion.source != "mask"]
                    seg_ref = write_seg(case.image, _masks(case), seg_path, estimated=estimated)
                if dicom_sr:
                    write_sr(
                        _case_frame(clf, case), case.image, sr_path, lesion_masks=_masks(case), seg=seg_ref
                    )
    _print_table(df, clf)
    for line in format_domain(domain):
        print(f"liverlesion predict: {line}", file=sys.stderr if domain["status"] == "shift" else sys.stdout)
    print(f"wrote {out}")
    return df


def _case_frame(clf: Classifier, case: _Case) -> pd.DataFrame:
    return clf._frame([r.row for r in case.results])


def _masks(case: _Case) -> dict[str, np.ndarray]:
    return {r.row["lesion_id"]: r.mask for r in case.results}
