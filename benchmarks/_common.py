"""Helpers shared by the benchmark scripts: machine description, timing, option handling, tables.

The scripts run as ``python benchmarks/bench_*.py``, so this folder is on ``sys.path`` and they
import this module as ``_common``. Heavy libraries (torch) are imported inside the functions:
``bench_io_patches.py`` workers must start without them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded; None where the OS has none."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_info() -> dict:
    """CPU model, cores, and the cores this process may run on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable}


def machine_info(device: str, **versions) -> dict:
    """CPU, cores, torch threads, load average, accelerator and library versions.

    Args:
        device: The torch device the benchmark runs on (``cpu``, ``cuda``, ``cuda:N``).
        **versions: Further entries (library versions), in the order given, after torch's.

    Returns:
        A JSON-ready dict; ``gpu`` is added on CUDA devices.
    """
    import torch

    info = {
        **cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": load_avg(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
    }
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
    return info


def print_machine(info: dict, libraries: str) -> None:
    """Print the machine, device and command lines of ``info`` (from :func:`machine_info`).

    Args:
        info: The machine description, with ``command`` and ``load_avg_after`` set.
        libraries: What follows ``Python X.Y.Z, `` on the device line (library versions).
    """
    print(
        f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"torch threads {info['torch_threads']}, load avg {info['load_avg_1_5_15']} -> {info.get('load_avg_after')}"
    )
    gpu = info.get("gpu", "") + (f", cuDNN {info['cudnn']}" if "cudnn" in info else "")
    dev = info["device"] + (f" ({gpu})" if "gpu" in info else "")
    print(f"device: {dev}; Python {info['python']}, {libraries}")
    print(f"command: {info['command']}")


def command_line(argv: list[str] | None) -> str:
    """The command that started this run, as it could be typed again."""
    return "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])


# ----------------------------------------------------------------------------- options


def model_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the ``--backbone`` and ``--size`` options that come first."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--backbone", default="inception_v3", help="timm backbone (default: %(default)s)")
    ap.add_argument(
        "--size", type=int, default=80, help="patch side in px (default: %(default)s, the quick preset)"
    )
    return ap


def lpft_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options of the lpft speed benchmarks: preset, lesions, repeats, weights, JSON output."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--lesions", type=int, default=24, help="random lesions to cache")
    ap.add_argument("--repeats", type=int, default=repeats, help="alternating repeats of each variant")
    ap.add_argument("--weights", default=None, help="model.weights (default: the preset's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    return ap


def lpft_setup(args: argparse.Namespace):
    """The preset's network and random lesions for the lpft speed benchmarks.

    Returns ``(cfg, model, init, n_top, arrays)``: ``arrays`` are ``args.lesions`` model inputs of
    random pixels, each with a disc as its lesion mask where the model pools inside the lesion.
    """
    import numpy as np

    from liverlesion import lpft
    from liverlesion.config import load_config
    from liverlesion.model import build_model
    from liverlesion.model_input import takes_mask
    from liverlesion.run_checks import resolve_init

    cfg = load_config(
        preset=args.preset, overrides=[f"model.weights={args.weights}"] if args.weights else None
    )
    imagenet, init = resolve_init(cfg)
    model, _ = build_model(cfg.model, num_classes=2, in_chans=3, imagenet=imagenet)
    n_top, _ = lpft.n_top_blocks(model, cfg)
    size, stacks = cfg.patch.size_px, 2 * cfg.patch.stacks + 1
    chans = 3 + int(takes_mask(model.pool))
    rng = np.random.default_rng(0)
    arrays = []
    for _ in range(args.lesions):
        a = rng.random((stacks, chans, size, size), dtype=np.float32)
        if chans > 3:  # a lesion mask: a disc in the middle
            yy, xx = np.mgrid[:size, :size]
            a[:, -1] = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 5) ** 2).astype(np.float32)
        arrays.append(a)
    return cfg, model, init, n_top, arrays


def resolve_device(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Turn ``--device auto`` into ``cuda`` or ``cpu``; refuse a CUDA device torch cannot see."""
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(
            f"--device {args.device}: no CUDA device visible to torch {torch.__version__}; use --device cpu"
        )


def start_run(args: argparse.Namespace, argv: list[str] | None, describe: Callable[[str], dict]) -> dict:
    """Apply ``--threads``, then describe the machine (``describe(device)``) and the command line.

    Returns:
        The machine description, with ``command`` set.
    """
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = describe(args.device)
    info["command"] = command_line(argv)
    return info


def write_json(path: Path, payload: dict) -> None:
    """Write the ``--json`` results file."""
    path.write_text(json.dumps(payload, indent=2) + "\n")


def write_results(path: Path | None, info: dict, args: argparse.Namespace, **results) -> None:
    """Write ``{"machine": info, "settings": the options, **results}`` to ``path`` (``--json``), if given."""
    if path is None:
        return
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(path, {"machine": info, "settings": options, **results})


# ----------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    """Wait for queued CUDA work, so that a timer around it measures it (no-op on CPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rounds(
    fns: list[tuple[str, Callable[[], object]]], repeat: int, device: str, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (round robin) ``warmup + repeat`` times.

    The first ``warmup`` rounds are not timed. Interleaving puts the load of other jobs on a
    shared machine on every function alike.
    """
    out: dict[str, list[float]] = {name: [] for name, _ in fns}
    for rnd in range(warmup + repeat):
        for name, fn in fns:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if rnd >= warmup:
                out[name].append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- tables


def print_header(header: str) -> str:
    """Print a table's header line and the rule under it; return the rule (to close the table)."""
    rule = "-" * len(header)
    print(header)
    print(rule)
    return rule
