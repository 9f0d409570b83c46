"""Export time and inference latency: PyTorch eager vs onnxruntime vs TorchScript, in one run.

Usage::

    python benchmarks/bench_export.py [--backbone inception_v3] [--size 80] [--batches 1 32] [--repeat 5]
    python benchmarks/bench_export.py --quick
    python benchmarks/bench_export.py --device cuda

For an untrained checkpoint made by ``build_model`` + ``save_checkpoint`` it times

* ``liverlesion.export.export_model`` to ONNX and to TorchScript (the whole call: checkpoint
  load, tracing / export, metadata, ONNX checker, atomic write), next to ``load_checkpoint``
  alone (the part every export, and every ``predict``, pays first);
* inference per batch and per patch on the same random input, batch 1 and 32: the reference
  **PyTorch eager** (``export.ProbabilityModel`` around the loaded ``LesionNet``, under
  ``torch.inference_mode``), **onnxruntime** (``InferenceSession`` of the exported file,
  ``intra_op_num_threads`` = torch's thread count) and **TorchScript** (``torch.jit.load`` of the
  exported file); the three runtimes take turns within each repeat, after untimed warm-up calls
  (TorchScript's profiling executor optimises during its first calls);
* the largest absolute difference of each runtime's probabilities from eager's.

The checkpoint's temperature is set so that the probabilities are not saturated at 0 / 1 (a
difference of saturated outputs would say nothing). No pass/fail threshold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common
import numpy as np

CLASSES = ["cyst", "metastasis"]


# ----------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict:
    """CPU, cores, torch threads, load average, accelerator and library versions."""
    import onnx
    import onnxruntime

    return _common.machine_info(
        device,
        onnx=onnx.__version__,
        onnxruntime=onnxruntime.__version__,
        ort_providers=onnxruntime.get_available_providers(),
    )


def print_machine(info: dict) -> None:
    _common.print_machine(
        info,
        f"torch {info['torch']}, onnx {info['onnx']}, onnxruntime {info['onnxruntime']} "
        f"(providers {', '.join(info['ort_providers'])})",
    )


# ----------------------------------------------------------------------------- setup


def make_checkpoint(path: Path, backbone: str, size: int, in_chans: int) -> tuple[Path, float]:
    """An untrained checkpoint whose temperature keeps the probabilities away from 0 and 1."""
    import torch

    from liverlesion.config import load_config
    from liverlesion.model import build_model, save_checkpoint

    cfg = load_config(preset="quick")
    cfg.model.backbone = backbone
    cfg.model.weights = "none"
    cfg.patch.size_px = size
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, num_classes=len(CLASSES), in_chans=in_chans)
    calibrate_batchnorm(model, in_chans, size)
    with torch.inference_mode():
        logits = model(torch.rand(8, in_chans, size, size, generator=torch.Generator().manual_seed(1)))
    temperature = float((logits - logits.mean(dim=1, keepdim=True)).abs().max()) + 1e-3
    save_checkpoint(path, model, cfg, CLASSES, in_chans, temperature=temperature, threshold=0.5, fold=0)
    return path, temperature


def calibrate_batchnorm(model, in_chans: int, size: int, batches: int = 2) -> None:
    """Fill BatchNorm running statistics from a few random batches, then switch to eval.

    A freshly initialised network in eval mode normalises with mean 0 / variance 1, so its
    activations grow layer after layer (logits of ~1e5 for inception_v3); differences between
    runtimes would then be measured on numbers no trained model produces.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    g = torch.Generator().manual_seed(2)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(16, in_chans, size, size, generator=g))
    model.eval()


def runtimes(args, ckpt: Path, onnx_file: Path, ts_file: Path) -> dict:
    """name -> callable(batch tensor on CPU) -> probabilities as a numpy array."""
    import onnxruntime as ort
    import torch

    from liverlesion.export import ProbabilityModel
    from liverlesion.model import load_checkpoint

    dev = args.device
    model, meta = load_checkpoint(ckpt)
    eager = ProbabilityModel(model, float(meta["temperature"])).eval().to(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
        scripted = torch.jit.load(str(ts_file), map_location=dev).eval()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    providers = ["CPUExecutionProvider"]
    if dev.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    sess = ort.InferenceSession(str(onnx_file), opts, providers=providers)
    ort_where = "CUDA EP" if sess.get_providers()[0] == "CUDAExecutionProvider" else "CPU EP"

    def run_eager(x):
        with torch.inference_mode():
            return eager(x.to(dev, non_blocking=True)).cpu().numpy()

    def run_ts(x):
        with torch.inference_mode():
            return scripted(x.to(dev, non_blocking=True)).cpu().numpy()

    def run_ort(x):
        return sess.run(["probabilities"], {"image": x.numpy()})[0]

    return {
        "PyTorch eager (reference)": run_eager,
        f"onnxruntime ({ort_where})": run_ort,
        "TorchScript (torch.jit.load)": run_ts,
    }


# ----------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = _common.model_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--chans", type=int, default=3, help="input channels (2.5-D, k=1: 3)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default: 1 32)")
    ap.add_argument(
        "--repeat", type=int, default=5, help="timed repeats per runtime and batch (default: %(default)s)"
    )
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda[:N]")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch / onnxruntime CPU threads (default: torch's)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 warm-up + 1 timed round: under a minute on 2 quiet cores"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    _common.resolve_device(ap, args)
    if args.quick:
        args.repeat, args.warmup = min(args.repeat, 1), min(args.warmup, 1)
    for name in ("size", "chans", "repeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.warmup < 0 or any(b < 1 for b in args.batches):
        ap.error("--warmup must be >= 0 and every --batches value >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from liverlesion.export import export_model
    from liverlesion.model import load_checkpoint

    info = _common.start_run(args, argv, machine_info)
    print(
        f"{args.backbone}, input {args.chans}x{args.size}x{args.size}, batches {args.batches}, "
        f"{args.warmup} warm-up + {args.repeat} timed rounds, random weights",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp_name:
        tmp = Path(tmp_name)
        ckpt, temperature = make_checkpoint(tmp / "model.pt", args.backbone, args.size, args.chans)
        export_s: dict[str, float] = {}
        t0 = time.perf_counter()
        load_checkpoint(ckpt)
        export_s["load_checkpoint alone (reference)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        onnx_file = export_model(ckpt, "onnx", tmp / "model.onnx")
        export_s["export_model(format='onnx')"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ts_file = export_model(ckpt, "torchscript", tmp / "model.pt.ts")
        export_s["export_model(format='torchscript')"] = time.perf_counter() - t0
        sizes = {"onnx": onnx_file.stat().st_size, "torchscript": ts_file.stat().st_size}
        fns = runtimes(args, ckpt, onnx_file, ts_file)
        failed: dict[str, str] = {}
        results = {}
        for b in args.batches:
            x = torch.rand(b, args.chans, args.size, args.size, generator=torch.Generator().manual_seed(b))
            outs = {}
            for name, fn in list(fns.items()):
                try:
                    outs[name] = fn(x)
                except Exception as e:  # e.g. a traced graph that does not move to the device
                    if name == next(iter(fns)):
                        raise
                    failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                    del fns[name]
            ref = next(iter(outs.values()))
            times = _common.timed_rounds(
                [(n, lambda fn=fn, x=x: fn(x)) for n, fn in fns.items()],
                args.repeat,
                args.device,
                args.warmup,
            )
            results[b] = {
                name: {"seconds": times[name], "max_abs_diff": float(np.abs(outs[name] - ref).max())}
                for name in fns
            }
    info["load_avg_after"] = _common.load_avg()

    print()
    print_machine(info)
    print(
        f"temperature {temperature:.3g} (keeps probabilities unsaturated); files: ONNX {sizes['onnx'] / 2**20:.1f} MB, "
        f"TorchScript {sizes['torchscript'] / 2**20:.1f} MB"
    )
    print()
    _common.print_header(f"{'export step':<44} {'s':>8}")
    for name, s in export_s.items():
        print(f"{name:<44} {s:>8.2f}")
    print()
    header = (
        f"{'batch':>5}  {'runtime':<30} {'ms/batch':>9} {'min':>8} {'ms/patch':>9} {'patches/s':>10} "
        f"{'vs eager':>9} {'max |diff|':>11}"
    )
    rule = _common.print_header(header)
    for b, rows in results.items():
        ref = statistics.median(next(iter(rows.values()))["seconds"])
        for name, r in rows.items():
            med = statistics.median(r["seconds"])
            print(
                f"{b:>5}  {name:<30} {1000 * med:>9.2f} {1000 * min(r['seconds']):>8.2f} {1000 * med / b:>9.2f} "
                f"{b / med:>10.1f} {med / ref:>8.2f}x {r['max_abs_diff']:>11.2e}"
            )
        print(rule)
    for name, err in failed.items():
        print(f"{name}: failed, left out ({err})")
    print(
        "median of the timed rounds; vs eager: this runtime's median / eager's (below 1: faster than eager)"
    )
    print("max |diff|: largest absolute difference of the class probabilities from eager's, same input")
    _common.write_results(
        args.json,
        info,
        args,
        temperature=temperature,
        export_s=export_s,
        file_bytes=sizes,
        inference={str(b): rows for b, rows in results.items()},
        failed=failed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
