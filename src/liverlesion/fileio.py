"""Atomic file writing: nothing half-written is ever left behind.

Every output file is written to a temporary sibling and renamed into place, so
a crash or a user error leaves either the old file or no file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from liverlesion.errors import UserError

#: Longest file-name stem made from an id (ids come from user-chosen patient ids; most file systems
#: allow 255 bytes per name, and a stem gets suffixes such as ``_2.npz`` or a temporary name's).
MAX_STEM = 96


def safe_name(name: str) -> str:
    """A file-name-safe stem for an id: ``[A-Za-z0-9._-]`` only, at most :data:`MAX_STEM` characters.

    A longer id keeps its start and its end (a lesion id's ``-LNN``) around a short hash of the whole
    id, so two long ids that share their first and last characters still get different stems.
    """
    text = str(name)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "lesion"
    if len(stem) > MAX_STEM:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        head = (MAX_STEM - 12) // 2
        stem = f"{stem[:head]}_{digest}_{stem[-(MAX_STEM - 12 - head) :]}"
    return stem


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    Args:
        path: Final destination.
        suffix: Suffix for the temp file (defaults to the destination's suffixes,
            so writers that dispatch on extension, such as SimpleITK, still work).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file path")
    _check_parents(path, "output file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; outputs should get normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON (indented, NaN-safe as null) atomically."""
    return write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def _clean(obj: Any) -> Any:
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_csv(path: str | os.PathLike, df) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def _check_parents(path: Path, name: str) -> None:
    """Refuse a path whose nearest existing ancestor is a file or not writable."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(
            f"{name} {path}: {parent} exists as a file, not a folder; choose an output path outside it"
        )
    if parent.exists():
        # a real write, not os.access: that says yes to root on read-only mounts and on /proc or /sys
        try:
            fd, probe = tempfile.mkstemp(prefix=".liverlesion-write-check.", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(
                f"{name} {path}: folder {parent} is not writable ({e.strerror}); "
                "choose an output path you can write to"
            ) from None


def check_output_dir(path: str | os.PathLike, name: str = "output folder") -> Path:
    """Refuse an output folder path that cannot become a folder (before any work is done).

    Args:
        path: The output folder (new, empty or, with ``--overwrite``/``--resume``, existing).
        name: How the argument is named in messages (e.g. ``"OUT"`` or ``"--out"``).

    Raises:
        UserError: ``path`` exists as a file, or an ancestor is a file or not writable.
    """
    path = Path(path).expanduser()
    _check_not_dangling(path, name)
    if path.exists() and not path.is_dir():
        raise UserError(
            f"{name} {path}: exists as a file, not a folder; give a new or empty folder path, or move the file away"
        )
    _check_parents(path, name)
    return path


def check_out_spares_inputs(
    path: str | os.PathLike,
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
    name: str = "output folder",
) -> None:
    """Refuse an output folder that is, or holds, one of the inputs (before any work is done).

    :func:`atomic_dir` replaces the output folder as a whole, so with ``--overwrite`` an input inside
    it (a CT next to its results, a dataset imported into its own folder) would be deleted.

    Args:
        path: The output folder.
        inputs: ``(how the input is named, its path)``; None paths are skipped.
        name: How the output argument is named in messages.

    Raises:
        UserError: Naming the output folder and the first input it is or holds.
    """
    out = Path(path).expanduser()
    if not out.exists():  # nothing can lie inside a folder that does not exist yet
        return
    resolved = out.resolve()
    for what, given in inputs:
        if given is None:
            continue
        target = Path(given).expanduser().resolve()
        if target == resolved or target.is_relative_to(resolved):
            raise UserError(
                f"{name} {out}: {'is' if target == resolved else 'holds'} the input {what} {given}; the results "
                "replace the whole output folder (--overwrite would delete the input): give an output folder "
                "outside the inputs"
            )


def _check_not_dangling(path: Path, name: str) -> None:
    """Refuse a symbolic link whose target is missing: nothing can be written through it."""
    if path.is_symlink() and not path.exists():
        raise UserError(
            f"{name} {path}: is a broken symbolic link (to {os.readlink(path)}, which does not exist); "
            "remove the link, create its target, or give another path"
        )


def check_output_file(path: str | os.PathLike, name: str = "output file") -> Path:
    """Refuse an output file path that is a folder or lies under a file (before any work is done).

    Raises:
        UserError: ``path`` is a folder, or an ancestor is a file or not writable.
    """
    path = Path(path).expanduser()
    _check_not_dangling(path, name)
    if path.is_dir():
        raise UserError(f"{name} {path}: is a folder; give a file path, e.g. {path / 'out'}")
    _check_parents(path, name)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to ``path`` on success.

    On failure the temporary directory is removed and ``path`` is untouched.
    """
    path = check_output_dir(path)
    if path.is_symlink():  # a link to a folder: fill the folder it points to, and keep the link
        path = path.resolve()
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UserError(
            f"{path}: output folder already exists and is not empty; choose another path or pass --overwrite"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
