"""Zip archives of DICOM series: refuse unsafe entries, extract to a private temporary folder."""

from __future__ import annotations

import tempfile
import zipfile
import zlib
from pathlib import Path

from liverlesion.errors import UserError
from liverlesion.io.common import MAX_VOXELS

#: Largest total a zipped series may unpack to: the largest volume read (``MAX_VOXELS``) at 4 bytes a
#: voxel, twice over for headers and stray files. Beyond it the archive is not one CT series (or is a
#: zip bomb, whose entries can claim terabytes while the archive holds kilobytes).
MAX_UNPACKED_BYTES = 8 * MAX_VOXELS

#: What reading a damaged or unusual zip raises: a bad header or CRC (BadZipFile), cut-short data
#: (EOFError), damaged compressed data (zlib.error), an encrypted entry (RuntimeError), a compression
#: method Python cannot read, e.g. Deflate64 (NotImplementedError), and I/O errors.
ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    RuntimeError,
    EOFError,
    ValueError,
    zlib.error,
    NotImplementedError,
)


def unsafe_zip_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry must not be extracted (None when it is safe).

    Entries whose names leave the archive's folder (``..`` parts, absolute paths, drive
    letters, backslash-rooted names) and symbolic links are refused: extracting them
    could write or read outside the target folder.
    """
    import stat

    name = info.filename.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/"):
        return "an absolute path"
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        return "a Windows drive letter"
    if any(p == ".." for p in parts):
        return "a '..' component (it points outside the archive)"
    if any(":" in p for p in parts):
        return "a ':' in a name (a drive or stream name)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def is_torch_archive(zf: zipfile.ZipFile) -> bool:
    """True for the zip ``torch.save`` writes (a checkpoint): it holds a ``data.pkl``."""
    return any(name.rpartition("/")[2] == "data.pkl" for name in zf.namelist())


def encrypted_members(infos: list[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
    """The password-protected entries (bit 0 of an entry's flags), which Python cannot extract."""
    return [i for i in infos if i.flag_bits & 0x1]


def check_zip_members(zf: zipfile.ZipFile, label: str, path: Path) -> list[zipfile.ZipInfo]:
    """The file entries of an open zip, after refusing unsafe entry names (see :func:`unsafe_zip_member`).

    Raises:
        UserError: Naming the first unsafe entry.
    """
    infos = zf.infolist()
    for info in infos:
        why = unsafe_zip_member(info)
        if why is not None:
            raise UserError(
                f"{label}: {path} has an entry {info.filename!r} with {why}; refusing to read the archive: "
                f"re-create the zip from the DICOM folder itself (e.g. zip -r series.zip SERIES_FOLDER)"
            )
    return [i for i in infos if not i.is_dir()]


def cut_short(path: Path, exc: BaseException) -> str:
    """A hint for a zip that begins as one but has no index: a zip's index is its last part, so a file
    cut short (an interrupted download or copy) loses it first."""
    try:
        with open(path, "rb") as f:
            starts_as_zip = f.read(4) == b"PK\x03\x04"
    except OSError:
        return ""
    if isinstance(exc, zipfile.BadZipFile) and starts_as_zip:
        return ": it begins as a zip but its index, the end of the file, is missing, so it was probably cut short"
    return ""


def check_zip(path: Path, label: str) -> None:
    """The checks :class:`extracted_zip` makes before it extracts, from the zip's index alone (no entry
    is decompressed), with the same messages: for a header-only look at the inputs before any is read."""
    try:
        with zipfile.ZipFile(path) as zf:
            _checked_members(zf, path, label, tempfile.gettempdir())
    except ZIP_READ_ERRORS as exc:
        raise _unreadable(path, label, exc) from exc


def _unreadable(path: Path, label: str, exc: BaseException) -> UserError:
    return UserError(
        f"{label}: {path} is not a readable zip file ({exc}{cut_short(path, exc)}); "
        f"re-create it or copy it again, or pass the unzipped folder"
    )


def _checked_members(zf: zipfile.ZipFile, path: Path, label: str, dest: str) -> list[zipfile.ZipInfo]:
    """The entries to extract into ``dest``, after refusing unsafe names, checkpoints, encrypted entries,
    and totals beyond ``MAX_UNPACKED_BYTES`` or the free space in ``dest``."""
    import shutil

    members = check_zip_members(zf, label, path)
    if is_torch_archive(zf):
        raise UserError(
            f"{label}: {path} is a PyTorch file (e.g. a model.pt checkpoint), not a CT "
            f"image or a zipped DICOM series; check which file went to which option (a checkpoint "
            f"is given with --model)"
        )
    locked = encrypted_members(members)
    if locked:
        raise UserError(
            f"{label}: {path} is password-protected ({len(locked)} encrypted entries, e.g. "
            f"{locked[0].filename!r}); unzip it with its password and pass the folder"
        )
    total = sum(i.file_size for i in members)
    if total > MAX_UNPACKED_BYTES:
        raise UserError(
            f"{label}: {path} would unpack to {total / 2**30:.3g} GiB, more than any one CT "
            f"series ({MAX_UNPACKED_BYTES / 2**30:.0f} GiB at most; a damaged archive or not one series); "
            f"unzip it yourself and pass the folder of the one CT series"
        )
    free = shutil.disk_usage(dest).free
    if total > free:
        raise UserError(
            f"{label}: {path} unpacks to {total / 1e9:.1f} GB but the temporary folder "
            f"{tempfile.gettempdir()} has {free / 1e9:.1f} GB free; set TMPDIR to a larger disk or "
            f"pass the unzipped folder"
        )
    return members


class extracted_zip:
    """Context manager: extract a zip to a private temporary folder, removed afterwards.

    Entry names are checked first (no writes or reads outside the temporary folder) and the
    total uncompressed size with ``MAX_UNPACKED_BYTES`` and with the free space there. Python's
    zipfile stops each entry at the size its header gives, so the headers bound what is written.
    """

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label
        self._tmp: str | None = None

    def __enter__(self) -> Path:
        self._tmp = tempfile.mkdtemp(prefix="liverlesion-zip-")  # mode 0700
        try:
            with zipfile.ZipFile(self.path) as zf:
                for info in _checked_members(zf, self.path, self.label, self._tmp):
                    zf.extract(info, self._tmp)
        except ZIP_READ_ERRORS as exc:
            self._cleanup()
            raise _unreadable(self.path, self.label, exc) from exc
        except BaseException:
            self._cleanup()
            raise
        return Path(self._tmp)

    def _cleanup(self) -> None:
        import shutil

        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __exit__(self, *exc_info) -> None:
        self._cleanup()
