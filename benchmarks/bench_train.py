"""Training throughput of our loop against a bare timm loop, in one run, on the same data.

Usage::

    python benchmarks/bench_train.py [--backbone inception_v3] [--size 80] [--batch 32] [--steps 4]
    python benchmarks/bench_train.py --quick
    python benchmarks/bench_train.py --device cuda [--amp bf16|fp16|none] [--no-channels-last]

* (a) **ours**: what ``liverlesion.train.train_fold`` runs: ``build_model`` (timm backbone + the
  paper's head), the Lightning module ``lightning_modules.LesionModule`` (weighted cross-entropy,
  AdamW with two parameter groups, cosine schedule), the DataLoader from ``_loaders``
  (``PatchDataset`` with the training ``Augment``: flips, rotation, zoom, intensity jitter) and
  the Trainer from ``_trainer`` (early stopping, checkpointing, TensorBoard + CSV loggers,
  progress bar);
* (b) **bare**: ``for x, y in loader: loss.backward(); opt.step()`` with
  ``timm.create_model(backbone, num_classes=0)`` + the same head, AdamW, a DataLoader over a
  ``TensorDataset`` of the same patches in memory (no augmentation).

Both see the same number of patches of the same size, batch size and threads. The first
``--warmup`` steps are timed separately (the first step pays one-off costs: allocator growth,
oneDNN / cuDNN kernel selection, lazy imports in the optimiser) and excluded from the
steady-state images/s. Each DataLoader is also iterated alone (no network) so that the data
cost per batch can be read next to the step time.

On CUDA (``--device cuda``, the default when a GPU is present) both loops run with autocast
(``--amp``, bf16 by default; Lightning's ``bf16-mixed`` / ``16-mixed`` for ours) and
channels_last weights and inputs; ours is also run as ``train_fold`` configures it today
(``precision: auto`` = ``16-mixed``, NCHW). Weights are random: they do not change the speed.
No pass/fail threshold: the script prints the figures and the machine they were measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common
import numpy as np

# ----------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict:
    """CPU, cores, torch threads, load average, accelerator and library versions."""
    import lightning
    import timm
    import torch

    info = _common.machine_info(
        device, timm=timm.__version__, lightning=lightning.__version__, os=platform.platform()
    )
    if device.startswith("cuda"):
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


def print_machine(info: dict) -> None:
    _common.print_machine(info, f"torch {info['torch']}, timm {info['timm']}, lightning {info['lightning']}")


# ----------------------------------------------------------------------------- data


def synthetic_patches(n: int, size: int, chans: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` lesion patches ``(1, C, H, W)`` in [0, 1] (a bright or dark blob on noise) and labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    blob = np.exp(-(xx**2 + yy**2) / 0.03).astype(np.float32)
    labels = np.arange(n) % 2
    arrays = []
    for y in labels:
        base = 0.5 + (0.3 if y else -0.3) * blob
        x = base[None] + rng.normal(0, 0.05, size=(chans, size, size)).astype(np.float32)
        arrays.append(np.clip(x, 0, 1)[None].astype(np.float32))
    return arrays, labels.astype(np.int64)


# ----------------------------------------------------------------------------- loops


def _config(args, precision: str):
    from liverlesion.config import load_config

    cfg = load_config(preset="quick")
    cfg.model.backbone = args.backbone
    cfg.model.weights = "none"
    # the paper's network, as the bare loop builds it: GAP over the last block of 3 image channels
    # (the quick preset's lesion pooling takes a 4th, mask channel, and its lpft recipe trains on
    # cached activations instead)
    cfg.model.pool, cfg.model.features_from, cfg.model.fusion = "global", "last", "none"
    cfg.train.recipe = "end_to_end"
    cfg.patch.size_px = args.size
    cfg.train.batch_size = args.batch
    cfg.train.epochs = 1  # one epoch holds exactly warmup + steps batches
    cfg.train.num_workers = 0  # the default (config.TrainConfig.num_workers)
    cfg.train.accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    cfg.train.devices = "1"
    cfg.train.precision = precision
    return cfg


class BareLoop:
    """The reference: a plain PyTorch loop over the same patches, no framework.

    ``timm.create_model(backbone, num_classes=0)`` (global average pooling) + the paper's head,
    AdamW, plain cross-entropy, a DataLoader over a ``TensorDataset`` held in memory.
    """

    def __init__(self, args, arrays, labels, amp: str, channels_last: bool):
        import timm
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        torch.manual_seed(0)
        t0 = time.perf_counter()
        self.device = args.device
        body = timm.create_model(
            args.backbone, pretrained=False, num_classes=0, in_chans=int(arrays[0].shape[1])
        )
        head = nn.Sequential(
            nn.Linear(body.num_features, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.4),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 2),
        )
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = nn.Sequential(body, head).to(args.device).train().to(memory_format=self.fmt)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=1e-4)
        ds = TensorDataset(torch.from_numpy(np.concatenate(arrays)), torch.from_numpy(labels))
        self.loader = DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=0)
        self.batches = iter(self.loader)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self.build_s = time.perf_counter() - t0

    def step(self) -> None:
        """One training step: next batch, forward, backward, optimiser step."""
        import torch
        import torch.nn.functional as F

        try:
            x, y = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            x, y = next(self.batches)
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
        y = y.to(self.device, non_blocking=True)
        ctx = (
            torch.autocast(device_type="cuda", dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()


def run_bare(args, loop: BareLoop) -> dict:
    """Run the bare loop alone; the device is synchronised only at the warm-up end and at the end."""
    _common.sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loop.step()
    _common.sync(args.device)
    t1 = time.perf_counter()
    for _ in range(args.steps):
        loop.step()
    _common.sync(args.device)
    t2 = time.perf_counter()
    return _result(args, t1 - t0, [(t2 - t1) / args.steps] * args.steps, loop.build_s)


def run_ours(
    args,
    arrays,
    labels,
    precision: str,
    channels_last: bool,
    bare: BareLoop | None = None,
    profile: bool = False,
) -> tuple[dict, dict | None]:
    """Our loop, assembled from train_fold's own pieces; step times from a callback.

    With ``bare``, one bare step runs (and is timed) right after each of our steps, so that both
    loops see the same machine load (other jobs on a shared CPU come and go within seconds).
    Without it, the device is synchronised only at the warm-up end and at the end.
    """
    import lightning.pytorch as pl
    import pandas as pd
    import torch

    from liverlesion.lightning_modules import LesionModule
    from liverlesion.model import build_model
    from liverlesion.train import FoldData, _class_weights, _loaders, _trainer

    cfg = _config(args, precision)
    fit = FoldData(pd.DataFrame({"patient_id": ["p"] * len(arrays)}), arrays, labels)
    val_arrays, val_labels = synthetic_patches(args.batch, args.size, arrays[0].shape[1], seed=1)
    val = FoldData(pd.DataFrame({"patient_id": ["v"] * args.batch}), val_arrays, val_labels)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    t_build = time.perf_counter()
    model, _ = build_model(cfg.model, num_classes=2, in_chans=int(arrays[0].shape[1]))
    if channels_last:
        # train_fold has no such switch: the weights are converted here, and the first conv then
        # returns channels_last activations for NCHW input batches.
        model = model.to(memory_format=torch.channels_last)
    module = LesionModule(model, cfg, _class_weights(labels, 2, cfg.train.class_weighting))
    train_dl, val_dl = _loaders(fit, val, cfg)
    build_s = time.perf_counter() - t_build
    ours_steps: list[float] = []
    bare_steps: list[float] = []
    marks: dict[str, float] = {}
    last = args.warmup + args.steps - 1

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            _common.sync(args.device)
            marks["prev"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if bare is None and batch_idx not in (args.warmup - 1, last):
                return
            _common.sync(args.device)
            now = time.perf_counter()
            ours_steps.append(now - marks["prev"])
            if bare is not None:
                bare.step()
                _common.sync(args.device)
                bare_steps.append(time.perf_counter() - now)
            marks["prev"] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        trainer, _ = _trainer(cfg, Path(tmp))
        trainer.callbacks.append(Clock())
        prof = cProfile.Profile() if profile else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        trainer.fit(module, train_dl, val_dl)
        if prof:
            prof.disable()
        fit_s = time.perf_counter() - t0
    assert trainer.global_step == args.warmup + args.steps, (trainer.global_step, args.warmup + args.steps)
    if bare is None:  # two marks: warm-up total, then all timed steps together
        warm, rest = ours_steps
        ours = _result(args, warm, [rest / args.steps] * args.steps, build_s)
    else:
        ours = _result(args, sum(ours_steps[: args.warmup]), ours_steps[args.warmup :], build_s)
    ours["fit_wall_s"] = fit_s
    if bare is not None and prof is not None:
        ours["note"] = "cProfile also covers the interleaved bare steps"
    if prof:
        ours["profile"] = _profile_text(prof)
    ref = None
    if bare is not None:
        ref = _result(args, sum(bare_steps[: args.warmup]), bare_steps[args.warmup :], bare.build_s)
    return ours, ref


def _result(args, warmup_s: float, steps: list[float], build_s: float) -> dict:
    steady = sum(steps)
    return {
        "build_s": build_s,
        "warmup_s": warmup_s,
        "steady_s": steady,
        "ms_per_step": 1000 * steady / len(steps),
        "median_ms_per_step": 1000 * statistics.median(steps),
        "images_per_s": args.batch * len(steps) / steady,
    }


def time_loader(loader, device: str, n_batches: int, threads: int | None = None) -> float:
    """Milliseconds per batch to draw (and move to ``device``) batches, no network."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        it = iter(loader)
        next(it)  # first batch: sampler start-up
        t0 = time.perf_counter()
        n = 0
        for batch in it:
            batch[0].to(device)
            n += 1
            if n == n_batches:
                break
        _common.sync(device)
        return 1000 * (time.perf_counter() - t0) / max(n, 1)
    finally:
        torch.set_num_threads(old)


def data_only(args, arrays, labels) -> dict:
    """Per-batch cost of each loop's DataLoader alone (our augmentation vs plain tensors)."""
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from liverlesion.train import FoldData, _loaders

    cfg = _config(args, "32-true")
    fit = FoldData(pd.DataFrame({"patient_id": ["p"] * len(arrays)}), arrays, labels)
    ours, _ = _loaders(fit, fit, cfg)
    bare = DataLoader(
        TensorDataset(torch.from_numpy(np.concatenate(arrays)), torch.from_numpy(labels)),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
    )
    n = max(len(arrays) // args.batch - 1, 1)
    return {
        "ours_ms_per_batch": time_loader(ours, args.device, n),
        "ours_1thread_ms_per_batch": time_loader(ours, args.device, n, threads=1),
        "bare_ms_per_batch": time_loader(bare, args.device, n),
        "threads": torch.get_num_threads(),
    }


def _profile_text(prof: cProfile.Profile, top: int = 25) -> str:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


# ----------------------------------------------------------------------------- driver


def _quiet_lightning() -> None:
    # Lightning's banner lines ("GPU available", "LOCAL_RANK") and data-loader hints are noise here.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*TensorBoard.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = _common.model_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="batch size (default: %(default)s)")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steady-state steps per loop (default: 4; cuda 30)"
    )
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed warm-up steps per loop (default: 1; cuda 5)"
    )
    ap.add_argument("--chans", type=int, default=3, help="input channels (2.5-D, k=1: 3)")
    ap.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda[:N]")
    ap.add_argument(
        "--amp", choices=["bf16", "fp16", "none"], default=None, help="autocast on cuda (default: bf16)"
    )
    ap.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last weights and inputs (default: on for cuda)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument(
        "--quick", action="store_true", help="1 warm-up + 2 steps, batch 8 (cpu): under a minute on 2 cores"
    )
    ap.add_argument("--profile", action="store_true", help="cProfile our loop and print the top functions")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    _common.resolve_device(ap, args)
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.batch = 8 if args.batch == 32 and not cuda else args.batch
        args.steps = args.steps or (2 if not cuda else 10)
        args.warmup = args.warmup or (1 if not cuda else 3)
    args.steps = args.steps or (30 if cuda else 4)
    args.warmup = args.warmup or (5 if cuda else 1)
    if args.amp is None:
        args.amp = "bf16" if cuda else "none"
    if args.channels_last is None:
        args.channels_last = cuda
    for name in ("size", "batch", "steps", "warmup", "chans"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if not cuda and args.amp != "none":
        ap.error(f"--amp {args.amp}: autocast is measured on cuda only; drop --amp on cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_lightning()
    cuda = args.device.startswith("cuda")
    info = _common.start_run(args, argv, machine_info)
    n = args.batch * (args.warmup + args.steps)
    arrays, labels = synthetic_patches(n, args.size, args.chans)
    amp_prec = {"bf16": "bf16-mixed", "fp16": "16-mixed", "none": "32-true"}[args.amp]
    fmt = "channels_last" if args.channels_last else "NCHW"
    print(
        f"{args.backbone}, {args.chans}x{args.size}x{args.size} patches, batch {args.batch}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per loop, random weights, num_workers 0, "
        + ("loops run one after the other" if cuda else "steps interleaved (ours, bare, ours, ...)"),
        flush=True,
    )
    bare_name = f"(b) bare timm loop [{args.amp}, {fmt}]"
    ours_name = f"(a) ours: train_fold pieces [{amp_prec}, {fmt}]"
    runs: list[tuple[str, dict]] = []
    bare = BareLoop(args, arrays, labels, args.amp, args.channels_last)
    if cuda:
        # A dedicated GPU: each loop alone, synchronised only at the ends (no per-step sync that
        # would stop the CPU from preparing the next batch while the GPU computes).
        runs.append((bare_name, run_bare(args, bare)))
        ours, _ = run_ours(args, arrays, labels, amp_prec, args.channels_last)
        runs.append((ours_name, ours))
        today, _ = run_ours(args, arrays, labels, "auto", False, profile=args.profile)
        runs.append(("(a') ours as train_fold runs today [auto=16-mixed, NCHW]", today))
    else:
        # A shared CPU: load from other jobs changes within seconds, so the loops alternate step by step.
        ours, ref = run_ours(
            args, arrays, labels, amp_prec, args.channels_last, bare=bare, profile=args.profile
        )
        runs += [(bare_name, ref), (ours_name, ours)]
    data = data_only(args, arrays, labels)
    info["load_avg_after"] = _common.load_avg()

    print()
    print_machine(info)
    print()
    ref = runs[0][1]
    header = f"{'loop':<56} {'images/s':>9} {'ms/step':>9} {'median':>9} {'warm-up s':>10} {'vs bare':>8}"
    rule = _common.print_header(header)
    for name, r in runs:
        ratio = ref["images_per_s"] / r["images_per_s"]
        print(
            f"{name:<56} {r['images_per_s']:>9.1f} {r['ms_per_step']:>9.1f} {r['median_ms_per_step']:>9.1f} "
            f"{r['warmup_s']:>10.2f} {ratio:>7.2f}x"
        )
    print(rule)
    print(
        "vs bare: bare images/s / this loop's images/s (1.00x: as fast as bare; 2.00x: takes twice as long)"
    )
    print(
        f"images/s and ms/step over the {args.steps} timed steps; median: median step"
        + (" (= mean: not timed per step on cuda)" if cuda else "")
        + f"; warm-up s: the first {args.warmup} step(s), not in images/s"
    )
    for name, r in runs:
        if "fit_wall_s" in r:
            print(
                f"{name.split(':')[0].split(' ours')[0]} trainer.fit wall {r['fit_wall_s']:.1f} s (Trainer start, "
                f"all steps, 1 validation pass, 2 checkpoint writes); model + loaders built in {r['build_s']:.1f} s"
            )
    print(
        f"DataLoader alone, ms per batch of {args.batch}: ours (PatchDataset + Augment) "
        f"{data['ours_ms_per_batch']:.1f} with {data['threads']} torch threads, "
        f"{data['ours_1thread_ms_per_batch']:.1f} with 1; bare (TensorDataset) {data['bare_ms_per_batch']:.1f}"
    )
    for name, r in runs:
        if "profile" in r:
            print(f"\ncProfile of {name} (trainer.fit, top functions by own time; {r.get('note', '')}):")
            print(r["profile"])
    _common.write_results(
        args.json,
        info,
        args,
        runs={name: {k: v for k, v in r.items() if k != "profile"} for name, r in runs},
        data_only=data,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
