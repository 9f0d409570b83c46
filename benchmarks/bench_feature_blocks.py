"""Which backbone block's frozen ImageNet features read a lesion best (the `model.features_from` choice).

For a run folder of ``liverlesion baselines`` or ``liverlesion cv`` (its patch cache and
``splits.json``), every top-level Inception block's map is pooled two ways, over the whole patch and
inside the lesion mask only, with the flip views averaged, and read by the radiomics baselines'
logistic regression (``baselines.lr_pipeline``) on the run's own patient folds. The radiomics-style
features, read by the same logistic regression on the same folds, are printed alongside as the
reference. Pooled out-of-fold ROC AUC over every lesion of the cache.

    python benchmarks/bench_feature_blocks.py RUN [--preset quick]

Takes about a minute for 150 lesions at 160 px on 2 CPU cores. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from liverlesion.baselines import lr_pipeline
from liverlesion.config import load_config
from liverlesion.data import load_patch_arrays
from liverlesion.features import cache_radiomics
from liverlesion.inference import tta_flips
from liverlesion.model import build_model
from liverlesion.patch_cache import load_patch, load_patch_index, resolve_patch_dir


def _oof_auc(x: np.ndarray, y: np.ndarray, patients: np.ndarray, splits: dict) -> float:
    p = np.full(len(y), np.nan)
    for fold in splits["splits"]:
        test = np.isin(patients, fold["test_patients"])
        pipe = lr_pipeline(0).fit(x[~test], y[~test])
        p[test] = pipe.predict_proba(x[test])[:, 1]
    return float(roc_auc_score(y, p))


def pooled_block_features(
    model, names: list[str], arrays: list[np.ndarray], masks: list[np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Frozen features of the blocks ``names`` per lesion (lesions x channels), flip views averaged:
    ``(global average, average inside the lesion mask)``."""
    acts: dict[str, torch.Tensor] = {}
    for n in names:
        model.backbone.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o))
    gap: dict[str, list] = {n: [] for n in names}
    roi: dict[str, list] = {n: [] for n in names}
    flips = tta_flips("flips")
    with torch.inference_mode():
        for a, mk in zip(arrays, masks, strict=True):
            x, m = torch.from_numpy(a), torch.from_numpy(mk)[:, None]
            model.feature_map(torch.cat([x if not d else torch.flip(x, dims=d) for d in flips]))
            m = torch.cat([m if not d else torch.flip(m, dims=d) for d in flips])
            for n in names:
                h = acts[n]
                gap[n].append(h.mean((2, 3)).mean(0).double().numpy())
                w = torch.nn.functional.interpolate(m, size=h.shape[2:], mode="area")
                w = w / w.sum((2, 3), keepdim=True).clamp(min=1e-6)
                roi[n].append((h * w).sum((2, 3)).mean(0).double().numpy())
    return {n: np.stack(v) for n, v in gap.items()}, {n: np.stack(v) for n, v in roi.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="folder of a `liverlesion baselines` or `cv` run")
    ap.add_argument("--preset", default="quick", help="config preset whose backbone is measured")
    ap.add_argument("--positive", default="metastasis", help="positive class")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    patch_dir = resolve_patch_dir(next(p for p in (args.run / "patches").iterdir() if p.is_dir()))
    table = load_patch_index(patch_dir)
    splits = json.loads((args.run / "splits.json").read_text())
    cfg = load_config(preset=args.preset, overrides=["model.features_from=last"])
    arrays = load_patch_arrays(patch_dir, table)
    masks = [
        load_patch(patch_dir, str(f), arrays=("mask",))["mask"].astype(np.float32) for f in table["file"]
    ]
    model, init = build_model(cfg.model, num_classes=2, in_chans=int(arrays[0].shape[1]))
    model.eval()
    names = [n for n, _ in model.blocks() if n.startswith(("Mixed", "layer", "stages"))]
    t0 = time.time()
    gap, roi = pooled_block_features(model, names, arrays, masks)
    seconds = time.time() - t0
    y = (table["lesion_class"].astype(str).to_numpy() == args.positive).astype(int)
    patients = table["patient_id"].astype(str).to_numpy()
    rad = cache_radiomics(patch_dir, table, (cfg.patch.window_center, cfg.patch.window_width))
    rad_x = rad.drop(columns="lesion_id").to_numpy(dtype=float)
    print(f"{args.run}: {len(y)} lesions, {len(set(patients))} patients, {cfg.model.backbone} ({init})")
    print(
        f"features of {len(names)} blocks in {seconds:.0f} s; pooled out-of-fold ROC AUC, same folds, same LR"
    )
    print(f"{'block':<12} {'channels':>8} {'whole patch':>12} {'lesion mask':>12}")
    for n in names:
        g, r = gap[n], roi[n]
        print(
            f"{n:<12} {g.shape[1]:>8} {_oof_auc(g, y, patients, splits):>12.3f} "
            f"{_oof_auc(r, y, patients, splits):>12.3f}"
        )
    rad_x = np.where(np.isfinite(rad_x), rad_x, np.nan)
    print(f"{'radiomics':<12} {rad_x.shape[1]:>8} {_oof_auc(rad_x, y, patients, splits):>12.3f}  (reference)")


if __name__ == "__main__":
    main()
