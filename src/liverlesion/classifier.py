"""The ``Classifier``: one checkpoint or an ensemble, classifying the lesions of a CT study.

new study -> ``io.read_volume`` -> lesions (mask, click or manifest, ``lesions.py``)
-> ``patches.extract_patch`` with the checkpoint's own patch settings -> each
ensemble member's temperature-scaled softmax (2-D mode: mean over the lesion's
slice samples) -> mean over members (and their spread) -> class, using the
checkpoint's threshold for the positive class in the binary case.

:meth:`Classifier.classify_case` returns a typed :class:`~liverlesion.results.CaseResult`;
``predict``, ``serve`` and the table-returning :meth:`Classifier.predict` all go through it,
so they give the same numbers.

A lesion whose smallest axis is below ``min_size_mm`` is not classified: the
network was never shown such lesions, and a confident-looking probability on
a few voxels would mislead. It is reported as "too small to characterise".

Outputs are research results, not a diagnosis.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverlesion.case_input import check_ct_volume, check_min_size, mask_volume
from liverlesion.click import lesion_from_click
from liverlesion.config import config_from_dict
from liverlesion.decision import TOO_SMALL, decide
from liverlesion.decision import too_small as is_too_small
from liverlesion.domain import STATS, check_domain, lesion_stats, merge_ranges
from liverlesion.ensemble import Member, load_members
from liverlesion.errors import UserError
from liverlesion.features import radiomics_features
from liverlesion.gradcam import compute_cam
from liverlesion.inference import apply_temperature, ensemble_probs, lesion_logits
from liverlesion.lesion_row import entropy_bits, lesion_row
from liverlesion.lesions import lesion_source_problem, lesions_from_mask
from liverlesion.manifest import read_manifest
from liverlesion.manifest_lesions import iter_manifest_lesions
from liverlesion.model_input import model_input
from liverlesion.patches import extract_patch
from liverlesion.progress import progress_bar
from liverlesion.results import CaseResult, LesionResult, results_table
from liverlesion.runtime import apply_torch_threads
from liverlesion.volume import Volume

__all__ = ["Classifier"]


class Classifier:
    """One checkpoint or an ensemble of checkpoints, ready to classify lesions.

    Use :meth:`load`. All members share class names, input channels and patch
    settings (checked on load).

    Example:
        >>> clf = Classifier.load(["fold_0/model.pt", "fold_1/model.pt"])  # doctest: +SKIP
        >>> df = clf.predict(read_volume("ct/"), mask=read_volume("mask.nii.gz", kind="mask"))  # doctest: +SKIP
    """

    def __init__(
        self, members: list[Member], device: str = "cpu", batch_size: int = 64, threads: int | None = None
    ):
        assert members, "a Classifier needs at least one checkpoint"
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
            ckpt: A ``model.pt`` path or a list of them; a ``cv`` run folder stands for its fold models.
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
        members, device, threads, batch_size = load_members(ckpt, device, backend, threads, batch_size)
        return cls(members, device=device, batch_size=batch_size, threads=threads)

    @property
    def backend(self) -> str:
        """``"onnx"`` (onnxruntime) or ``"torch"``."""
        return self.members[0].backend

    def __repr__(self) -> str:
        pc = self.patch_config
        # several members: each as its folder and name (fold_0/model.pt, fold_1/model.pt, ...)
        names = ", ".join(
            f"{m.path.parent.name}/{m.path.name}" if len(self.members) > 1 else str(m.path)
            for m in self.members
        )
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
        return merge_ranges([m.ckpt.get("training_domain") for m in self.members])

    def domain_check(self, results: Sequence[LesionResult]) -> dict[str, Any]:
        """New lesions' HU/spacing statistics against the checkpoint's training range."""
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

    def member_probs(
        self, patch_image: np.ndarray, extra: np.ndarray | None = None, mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Per-member calibrated class probabilities ``(n_models, n_classes)`` for one lesion's patch.

        Args:
            patch_image: ``(S, C, H, W)`` in ``[0, 1]``; 2-D mode's slice samples are averaged.
            extra: The lesion's fusion features (:meth:`fusion_vector`) for a fusion model.
            mask: The patch's lesion mask ``(S, H, W)``; needed by members that pool inside the
                lesion (checkpoint ``pool``).
        """
        e = None if extra is None else np.asarray(extra, dtype=np.float64)[None]
        out = []
        for m in self.members:
            x = model_input(patch_image, mask, m.pool, self.in_chans)
            logits = lesion_logits(
                m.model, [x], e, tta=self.config.model.tta, batch_size=self.batch_size, device=self.device
            )
            out.append(apply_temperature(logits, m.temperature)[0])
        return np.stack(out)

    def predict_patch(
        self, patch_image: np.ndarray, extra: np.ndarray | None = None, mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Ensemble-mean class probabilities ``(n_classes,)`` for one lesion's patch ``(S, C, H, W)``."""
        return ensemble_probs(self.member_probs(patch_image, extra, mask))

    def decide(self, probs: np.ndarray) -> str:
        """The predicted class for mean probabilities (the checkpoint's decision rule)."""
        return decide(probs, self.class_names, self.positive_class, self.threshold)[0]

    def gradcam(
        self, patch_image: np.ndarray, target_class: str | int, mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Grad-CAM ``(H, W)`` in ``[0, 1]`` on the patch's centre sample, averaged over members.

        ``mask``: the patch's lesion mask ``(S, H, W)``, for members that pool inside the lesion.
        """
        target = self.class_names.index(target_class) if isinstance(target_class, str) else int(target_class)
        x = np.asarray(patch_image, dtype=np.float32)
        s = x.shape[0] // 2  # 2-D mode: the centre slice; 2.5-D: the centre stack
        m_s = None if mask is None else np.asarray(mask)[s : s + 1]
        nets = [m.network(self.device) for m in self.members]
        if self.threads is not None:  # with onnx, torch was imported just now, with a thread per core
            apply_torch_threads(self.threads)
        cams = [
            np.asarray(
                compute_cam(net, model_input(x[s : s + 1], m_s, m.pool, self.in_chans)[0], target),
                dtype=np.float32,
            )
            for m, net in zip(self.members, nets, strict=True)
        ]
        return np.clip(np.mean(cams, axis=0), 0.0, 1.0)

    # ------------------------------------------------------------------ lesions
    def classify_case(
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
    ) -> CaseResult:
        """Classify the lesions of one CT volume: the typed result that every other entry point uses.

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
            gradcam: Also compute each classified lesion's Grad-CAM (:attr:`LesionResult.cam`).
            tolerance: Geometry tolerance (mm) between image and mask.
            image_name: How the image is named in error messages.
            mask_name: How the mask is named in error messages.
            point_name: How the point is named in error messages.
            image_ref: How the image is referred to in the rows' ``image`` column.

        Returns:
            The case: ``case.results[i]`` holds the lesion's row (:func:`~liverlesion.results.result_columns`),
            measurements, mask, patch and Grad-CAM; :meth:`results_frame` of ``case.rows`` is
            :meth:`predict`'s table.

        Raises:
            UserError: Bad volume, mask/point inputs or geometry mismatch.
        """
        check_min_size(min_size_mm)
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
            mask_vol = mask_volume(volume, mask, tolerance, image_name, mask_name)
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
        case = CaseResult(image=volume, image_ref=image_ref)
        case.results = self._classify(volume, items, min_size_mm, gradcam, image_ref)
        return case

    def classify_manifest(
        self,
        manifest: str | os.PathLike,
        min_size_mm: float = 5.0,
        gradcam: bool = False,
        tolerance: float = 1e-3,
        check_image: Callable[[Volume, str], None] | None = None,
    ) -> list[CaseResult]:
        """Classify every lesion of a manifest CSV: one :class:`~liverlesion.results.CaseResult` per image.

        Holds every image in memory; :meth:`iter_manifest_cases` (which ``predict --manifest`` uses) holds
        one at a time. Arguments and checks as there.
        """
        return list(self.iter_manifest_cases(manifest, min_size_mm, gradcam, tolerance, check_image))

    def iter_manifest_cases(
        self,
        manifest: str | os.PathLike,
        min_size_mm: float = 5.0,
        gradcam: bool = False,
        tolerance: float = 1e-3,
        check_image: Callable[[Volume, str], None] | None = None,
    ) -> Iterator[CaseResult]:
        """Classify a manifest's lesions one image at a time, yielding each image's :class:`CaseResult`.

        Every image and mask is read and checked (headers first, then CT check, geometry, lesions) before
        the first lesion is classified, so a bad last row fails at once, not after the others were
        classified. That check reads each image and lets it go; the images are read again to classify
        them, so memory holds one CT at a time (a manifest of hundreds of CTs would not fit in memory).

        Args:
            manifest: The manifest CSV (``lesion_class`` may be empty or absent: new cases).
            min_size_mm: Lesions whose smallest axis is below this are flagged, not classified.
            gradcam: Also compute each classified lesion's Grad-CAM.
            tolerance: Geometry tolerance (mm) between image and mask.
            check_image: Called as ``check_image(image, image_ref)`` on every image in the check,
                before any is classified (e.g. that it is DICOM for ``--dicom-sr``).

        Raises:
            UserError: Bad manifest rows, images or masks (one line naming the row's file), before the
                first case is yielded.
        """
        manifest = Path(manifest)
        check_min_size(min_size_mm)
        table = read_manifest(manifest, need_class=False)  # new cases: no diagnosis needed
        # Each image as the manifest names it (relative to it), as the lesions' own rows do: an absolute
        # path can hold folder names that are patient names.
        as_written = dict(zip(table["image_path"], table["image"], strict=True))

        def ref_of(image: Volume) -> str:
            return as_written.get(str(image.meta.get("source") or ""), "")

        for image, _ in iter_manifest_lesions(table, tolerance, desc="checking inputs"):  # kept by none
            if check_image is not None:
                check_image(image, ref_of(image))
        # each image again, to classify it (its header was checked and it was read in full above)
        images = iter_manifest_lesions(table, tolerance, desc="classifying", check_headers=False)
        return self._classify_images(images, ref_of, min_size_mm, gradcam)

    def _classify_images(self, images, ref_of, min_size_mm: float, gradcam: bool) -> Iterator[CaseResult]:
        for image, items in images:
            ref = ref_of(image)
            case = CaseResult(image=image, image_ref=ref)
            case.results = self._classify(image, items, min_size_mm, gradcam, ref)
            yield case

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
        """Classify the lesions of one CT volume, as a table (:meth:`classify_case`'s arguments).

        Returns:
            One row per lesion (see :func:`~liverlesion.results.result_columns`);
            ``df.attrs["domain_check"]``: the lesions' HU/spacing statistics against the training range;
            with ``gradcam``, ``df.attrs["gradcam"]`` (lesion_id -> (H, W)).

        Raises:
            UserError: Bad volume, mask/point inputs or geometry mismatch.
        """
        case = self.classify_case(
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
        return self._table(case.results, gradcam)

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
            One row per lesion (see :func:`~liverlesion.results.result_columns`); ``true_class`` when the
            manifest has ``lesion_class``; ``df.attrs["domain_check"]``: the lesions' HU/spacing statistics
            against the checkpoint's training range (:func:`liverlesion.domain.check_domain`).

        Raises:
            UserError: Bad manifest rows, images or masks (one line naming the row's file).
        """
        cases = self.iter_manifest_cases(manifest, min_size_mm, gradcam, tolerance)
        return self._table([r for case in cases for r in case.results], gradcam)  # each image let go

    def predict_case(self, volume: Volume, **kwargs: Any) -> CaseResult:
        """The same as :meth:`classify_case` (kept for callers written before it)."""
        return self.classify_case(volume, **kwargs)

    def results_frame(self, rows: list[dict]) -> pd.DataFrame:
        """The results table (:func:`~liverlesion.results.result_columns`, with the decision rule in ``attrs``) of result rows."""
        return results_table(rows, self.class_names, self.positive_class, self.decision_rule, self.n_models)

    def _table(self, results: list[LesionResult], gradcam: bool) -> pd.DataFrame:
        df = self.results_frame([r.row for r in results])
        df.attrs["domain_check"] = self.domain_check(results)
        if gradcam:
            df.attrs["gradcam"] = {r.row["lesion_id"]: r.cam for r in results if r.cam is not None}
        return df

    def _classify(
        self, volume: Volume, items: list, min_size_mm: float, gradcam: bool, image_ref: str
    ) -> list[LesionResult]:
        results = []
        hashes = ";".join(self.checkpoint_hashes)
        # a bar on a terminal only: elsewhere its carriage returns end up in logs, before an error's line
        for lesion, lmask in progress_bar(
            items, "classifying lesions", unit="lesion", enabled=len(items) >= 2, log=False
        ):
            patch = extract_patch(volume, lmask, self.patch_config)
            too_small = is_too_small(lesion.min_axis_mm, min_size_mm)
            probs = np.full(len(self.class_names), np.nan)
            uncertainty = entropy = math.nan
            pred = TOO_SMALL
            cam = None
            if not too_small:
                member = self.member_probs(patch.image, self.fusion_vector(patch, lesion), patch.mask)
                probs = ensemble_probs(member)
                pred = self.decide(probs)
                j = self.class_names.index(pred)
                uncertainty = float(member[:, j].std()) if len(member) > 1 else 0.0
                entropy = entropy_bits(probs)
                if gradcam:
                    cam = self.gradcam(patch.image, j, patch.mask)
            row = lesion_row(
                self,
                lesion,
                patch,
                image_ref,
                pred=pred,
                too_small=too_small,
                probs=probs,
                uncertainty=uncertainty,
                entropy=entropy,
                hashes=hashes,
            )
            dom = lesion_stats(
                lesion.hu_mean,
                lesion.hu_std,
                patch.hu,
                patch.mask,
                float(patch.meta["pixel_mm"]),
                volume.spacing,
            )
            results.append(LesionResult(row=row, lesion=lesion, mask=lmask, patch=patch, cam=cam, domain=dom))
        return results
