"""When to show progress bars.

Bars are drawn only when stderr is a terminal: in logs, CI and pipes tqdm's carriage-return
updates become many lines of noise. ``LIVERLESION_PROGRESS=1`` forces them on, ``=0`` off.
"""

from __future__ import annotations

import os
import sys


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
