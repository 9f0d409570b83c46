"""Where inference runs: device, CPU threads, batch size and backend (torch or onnxruntime).

Torch-free on purpose: ``predict`` and ``serve`` check these settings, and the onnxruntime backend
runs, without importing torch. Torch is only touched when it is already imported (or must be).
"""

from __future__ import annotations

import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

from liverlesion.errors import UserError

BACKENDS = ("auto", "onnx", "torch")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device: str, name: str = "--device") -> str:
    """Normalise ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        UserError: Anything else (one line, with the accepted values).
    """
    text = str(device).strip().lower()
    if not _DEVICE.match(text):
        raise UserError(f"{name} {device!r}: not a device; use cpu, cuda or cuda:N (e.g. cuda:0), or auto")
    return text


def check_backend(backend: str, name: str = "--backend") -> str:
    """Normalise ``auto``, ``onnx`` or ``torch``.

    Raises:
        UserError: Anything else.
    """
    text = str(backend).strip().lower()
    if text not in BACKENDS:
        raise UserError(f"{name} {backend!r}: unknown; choose one of: {', '.join(BACKENDS)}")
    return text


def check_positive_int(value: int | None, name: str, what: str) -> int | None:
    """``None`` (the default) or an integer >= 1.

    Raises:
        UserError: Zero, negative or not an integer.
    """
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise UserError(f"{name} {value}: must be a whole number >= 1 ({what})")
    return int(value)


def runnable_elsewhere(samples: int = 3, interval_s: float = 0.05) -> float | None:
    """Threads runnable on this machine right now besides the caller: the median of a few reads.

    Linux's ``/proc/loadavg`` counts the runnable threads at the moment of reading (its 4th field,
    ``running/total``), the caller among them. None where there is no such file.
    """
    counts = []
    for i in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return None
        counts.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(interval_s)
    return float(statistics.median(counts))


def free_cores() -> int:
    """CPU cores this process may use minus the other work running now, at least 1.

    On a shared machine, asking for more threads than there are idle cores makes every small
    operation wait for a descheduled thread (torch's intra-op pool); fewer threads are faster.
    The other work is read now (:func:`runnable_elsewhere`) rather than from the 1-minute load
    average, which lags: on 2 cores, a run started within a minute or so of another one ending
    would see a load near 2 and keep a single thread for its whole length. Where no instant
    reading exists (not Linux), the load average is used.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    load = runnable_elsewhere()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def resolve_threads(threads: int | None) -> int:
    """The CPU thread count to use: ``threads`` when given, else :func:`free_cores`."""
    return check_positive_int(threads, "--threads", "CPU threads") or free_cores()


def apply_torch_threads(threads: int) -> None:
    """Set torch's intra-op threads, if torch is imported (never imports it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def resolve_torch_device(device: str, name: str = "--device") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; refuse CUDA that is not there (imports torch)."""
    import torch

    device = check_device(device, name)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{name} {device}: no CUDA device is available here; use {name} cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(
                f"{name} {device}: only {torch.cuda.device_count()} CUDA device(s) (0..{torch.cuda.device_count() - 1})"
            )
    return device


def check_accelerator(accelerator: str) -> None:
    """Refuse ``train.accelerator`` gpu / cuda / mps where this machine has none (imports torch).

    Lightning would fail only when the first fold's trainer starts, with its own traceback.
    """
    import torch

    kind = str(accelerator).strip().lower()
    if kind in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"train.accelerator={kind} (--device cuda): no CUDA device is available here; use --device cpu "
            "or --device auto"
        )
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(
            "train.accelerator=mps: no Apple GPU (MPS) is available here; use --device cpu or auto"
        )


def cuda_maybe_present() -> bool:
    """Whether a CUDA device could be present, without importing torch (driver files or env)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")
