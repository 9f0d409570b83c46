"""Progress display: bars on a terminal, at most a line per stage elsewhere (logs, CI, pipes).

Bars are drawn only when stderr is a terminal: in logs, CI and pipes tqdm's carriage-return
updates become many lines of noise. ``LIVERLESION_PROGRESS=1`` forces them on, ``=0`` off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def progress_disabled(stream=None) -> bool:
    """True unless progress bars should be drawn on ``stream`` (default: stderr)."""
    forced = os.environ.get("LIVERLESION_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on", "always"):
        return False
    if forced in ("0", "false", "no", "off", "never"):
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError, OSError):  # closed or replaced stream
        return True


def is_terminal() -> bool:
    """True when progress bars should be drawn (stderr is a terminal, or forced)."""
    return not progress_disabled()


def progress_bar(
    items: Iterable[T],
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    total: int | None = None,
    log: bool = True,
) -> Iterator[T]:
    """A tqdm bar on a terminal; elsewhere one line when the stage starts (none with ``log=False``)."""
    if enabled and is_terminal():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False)
        return
    if enabled and log:
        n = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
        units = unit if n == 1 or unit.endswith("s") else f"{unit}s"  # "30 lesions", "1 lesion"
        print(f"{desc}{f' ({n} {units})' if n is not None else ''} ...", file=sys.stderr, flush=True)
    yield from items


def lightning_progress(enabled: bool) -> list[Any]:
    """Lightning callbacks for a progress bar (only on a terminal)."""
    if not (enabled and is_terminal()):
        return []
    from lightning.pytorch.callbacks import TQDMProgressBar

    return [TQDMProgressBar(refresh_rate=1)]
