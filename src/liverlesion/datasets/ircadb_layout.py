"""The 3D-IRCADb-01 download layout: patient folders, their two parts (folder or zip), structure names.

Finds the ``3Dircadb1.N`` patient folders, indexes each patient's ``PATIENT_DICOM`` and
``MASKS_DICOM`` (a folder or a ``.zip``, with or without a top-level folder of the same name)
before any heavy work, extracts a zipped structure safely, and names the role of each
``MASKS_DICOM`` structure folder. Reading the volumes and building the label maps is
:mod:`liverlesion.datasets.ircadb`.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from liverlesion.errors import UserError
from liverlesion.io import check_zip_members
from liverlesion.io.archive import (
    MAX_UNPACKED_BYTES,
    ZIP_READ_ERRORS,
    cut_short,
    encrypted_members,
    is_torch_archive,
)

__all__ = [
    "PATIENT_PART",
    "MASKS_PART",
    "Part",
    "Patient",
    "find_patients",
    "discover_patients",
    "classify_structure",
]

PATIENT_PART = "PATIENT_DICOM"
MASKS_PART = "MASKS_DICOM"

_PATIENT_RE = re.compile(r"^3dircadb1\.(\d+)$", re.IGNORECASE)
_PATIENT_ZIP_RE = re.compile(r"^3dircadb1\.\d+\.zip$", re.IGNORECASE)
_NUM = r"(?:[ _-]?\d+)?"
_TUMOUR_RE = re.compile(rf"^liver[ _-]?tumou?rs?{_NUM}$", re.IGNORECASE)
_CYST_RE = re.compile(rf"^liver[ _-]?(?:kystes?|kysts?|cysts?){_NUM}$", re.IGNORECASE)
_BARE_TUMOUR_RE = re.compile(rf"^tumou?rs?{_NUM}$", re.IGNORECASE)
_LIVER_RE = re.compile(r"^liver$", re.IGNORECASE)


# --------------------------------------------------------------------------------------
# Finding the parts of the layout (folder or zip)
# --------------------------------------------------------------------------------------


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX" or name.lower() in ("thumbs.db", "desktop.ini")


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


@dataclass
class Part:
    """``PATIENT_DICOM`` or ``MASKS_DICOM`` of one patient, as a folder or a zip.

    ``groups`` maps a folder relative to the part ("" = the part itself, or a
    structure name for masks) to its slice files (paths for a folder, member
    names for a zip).
    """

    path: Path
    name: str
    is_zip: bool
    groups: dict[str, list[str]] = field(default_factory=dict)
    root: Path | None = None  # folder variant: the folder holding the slices/structures

    def structures(self) -> list[str]:
        """Top-level sub-folders that hold files (mask structures), naturally sorted."""
        return sorted((g for g in self.groups if g and "/" not in g), key=_natural_key)

    def describe(self, group: str = "") -> str:
        """How to name this part (or one structure of it) in messages."""
        if self.is_zip:
            return f"{self.path}:{group}" if group else str(self.path)
        base = self.root or self.path
        return str(base / group) if group else str(base)

    def folder(self, group: str, tmp: Path) -> Path:
        """A folder holding the slices of ``group`` (extracted into ``tmp`` for zips)."""
        if not self.is_zip:
            assert self.root is not None
            return self.root / group if group else self.root
        # Write under names we choose, never the archive's paths (no zip-slip).
        # Named after the structure so progress messages say what is being read.
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", group or self.name)[:64] or "slices"
        dest = Path(tempfile.mkdtemp(prefix="zip-", dir=tmp)) / safe
        dest.mkdir()
        try:
            with zipfile.ZipFile(self.path) as zf:
                for i, member in enumerate(self.groups[group]):
                    with (
                        zf.open(member) as fin,
                        open(dest / f"{i:05d}_{PurePosixPath(member).name}", "wb") as fout,
                    ):
                        shutil.copyfileobj(fin, fout)
        except ZIP_READ_ERRORS as e:
            raise UserError(
                f"{self.path}: cannot extract {group or 'slices'} ({e}); re-download the zip"
            ) from e
        return dest


def index_zip(path: Path, name: str) -> Part:
    """Index a part given as a zip, refusing what could not be extracted before any work.

    Raises:
        UserError: Unreadable, unsafe entry names, password-protected, a checkpoint, or a structure that
            would unpack to more than any CT series.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = check_zip_members(zf, name, path)
            if is_torch_archive(zf):
                raise UserError(
                    f"{path}: is a PyTorch file (e.g. a model.pt checkpoint), not the {name} zip of 3D-IRCADb-01; "
                    f"put the {name}.zip from the IRCAD download there"
                )
    except ZIP_READ_ERRORS as e:
        raise UserError(
            f"{path}: not a readable zip file ({e}{cut_short(path, e)}); re-download it or extract it to a {name} folder"
        ) from e
    locked = encrypted_members(infos)
    if locked:
        raise UserError(
            f"{path}: is password-protected ({len(locked)} encrypted entries, e.g. {locked[0].filename!r}); "
            f"extract it with its password to a {name} folder next to it and remove the zip"
        )
    sizes: dict[str, int] = {}
    for i in infos:
        group = str(PurePosixPath(i.filename).parent)
        sizes[group] = sizes.get(group, 0) + i.file_size
    big = max(sizes.items(), key=lambda kv: kv[1], default=("", 0))
    if big[1] > MAX_UNPACKED_BYTES:  # each structure is extracted on its own: bound each
        raise UserError(
            f"{path}: {big[0]!r} would unpack to {big[1] / 2**30:.3g} GiB, more than any CT series "
            f"({MAX_UNPACKED_BYTES / 2**30:.0f} GiB at most: a damaged archive); re-download it"
        )
    members = [i.filename for i in infos]
    parts = [PurePosixPath(m).parts for m in members]
    keep = [(m, p) for m, p in zip(members, parts, strict=True) if p and not any(_is_junk(x) for x in p)]
    # The official zips hold a top-level folder of the same name; tolerate both forms.
    if keep and all(len(p) > 1 and p[0].lower() == name.lower() for _, p in keep):
        keep = [(m, p[1:]) for m, p in keep]
    groups: dict[str, list[str]] = {}
    for member, p in keep:
        groups.setdefault("/".join(p[:-1]), []).append(member)
    return Part(path=path, name=name, is_zip=True, groups=groups)


def _index_folder(path: Path, name: str) -> Part:
    root = path
    entries = [e for e in root.iterdir() if not _is_junk(e.name)]
    # A zip extracted into a folder of its own name: PATIENT_DICOM/PATIENT_DICOM/...
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() == name.lower():
        root = entries[0]
        entries = [e for e in root.iterdir() if not _is_junk(e.name)]
    groups: dict[str, list[str]] = {}
    files = sorted(str(e) for e in entries if e.is_file())
    if files:
        groups[""] = files
    for d in entries:
        if d.is_dir():
            sub = sorted(str(f) for f in d.iterdir() if f.is_file() and not _is_junk(f.name))
            if sub:
                groups[d.name] = sub
    return Part(path=path, name=name, is_zip=False, groups=groups, root=root)


def _find_part(patient_dir: Path, name: str) -> Part:
    children = {c.name.lower(): c for c in patient_dir.iterdir()}
    folder = children.get(name.lower())
    archive = children.get(f"{name.lower()}.zip")
    if folder is not None and folder.is_dir():
        part = _index_folder(folder, name)
    elif archive is not None and archive.is_file():
        part = index_zip(archive, name)
    else:
        raise UserError(
            f"{patient_dir}: no {name} folder or {name}.zip found; expected the 3D-IRCADb-01 layout "
            f"3Dircadb1.N/{name}[.zip] as downloaded from IRCAD"
        )
    top = [PurePosixPath(f).name for f in part.groups.get("", [])]
    zips = [f for f in top if f.lower().endswith(".zip")]
    if zips and (name == MASKS_PART and not part.structures() or len(zips) == len(top)):
        # zips inside the part (MASKS_DICOM/livertumor01.zip, PATIENT_DICOM/PATIENT_DICOM.zip) are not read
        raise UserError(
            f"{part.path}: holds zip files ({', '.join(sorted(zips)[:3])}{', ...' if len(zips) > 3 else ''}) "
            f"where {'structure folders' if name == MASKS_PART else 'DICOM slices'} are expected; extract each "
            f"into a folder of its own name ({name}/"
            f"{'<structure>/image_0, ...' if name == MASKS_PART else 'image_0, image_1, ...'})"
        )
    if name == PATIENT_PART and not part.groups.get(""):
        raise UserError(
            f"{part.path}: no DICOM slices found at its top level (found folders: "
            f"{', '.join(sorted(part.groups)) or 'none'}); expected {name}/image_0, image_1, ..."
        )
    if name == MASKS_PART and not part.structures():
        raise UserError(
            f"{part.path}: no structure folders found; expected {name}/<structure>/image_0, ... "
            f"(e.g. {name}/liver, {name}/livertumor01)"
        )
    return part


@dataclass
class Patient:
    number: int
    path: Path
    image: Part
    masks: Part

    @property
    def patient_id(self) -> str:
        return f"ircadb1_{self.number:02d}"


def find_patients(src: str | Path) -> list[tuple[int, Path]]:
    """List the ``3Dircadb1.N`` patient folders of ``src`` as ``(N, path)``, sorted by N.

    Args:
        src: One ``3Dircadb1.N`` folder, or a folder holding several.

    Raises:
        UserError: ``src`` is neither.
    """
    src = Path(src)
    expected = "expected a 3Dircadb1.N patient folder or a folder holding 3Dircadb1.1, 3Dircadb1.2, ..."
    if not src.exists():
        raise UserError(f"{src}: not found; {expected}")
    if not src.is_dir():
        hint = " (unzip it first)" if src.suffix.lower() == ".zip" else ""
        raise UserError(f"{src}: is a file{hint}; {expected}")
    m = _PATIENT_RE.match(src.name)
    if m:
        return [(int(m.group(1)), src)]
    names = {c.name.lower() for c in src.iterdir()}
    if {
        PATIENT_PART.lower(),
        f"{PATIENT_PART.lower()}.zip",
        MASKS_PART.lower(),
        f"{MASKS_PART.lower()}.zip",
    } & names:
        raise UserError(
            f"{src}: looks like one patient but the folder name {src.name!r} does not say which; "
            f"rename it to 3Dircadb1.N (N = patient number, used for the patient_id)"
        )
    found: dict[int, Path] = {}
    for child in src.iterdir():
        mc = _PATIENT_RE.match(child.name)
        if mc and child.is_dir():
            n = int(mc.group(1))
            if n in found:
                raise UserError(f"{src}: patient {n} appears twice ({found[n].name}, {child.name}); keep one")
            found[n] = child
    if not found:
        zips = sorted(c.name for c in src.iterdir() if _PATIENT_ZIP_RE.match(c.name))
        if zips:
            raise UserError(f"{src}: holds zipped patients ({', '.join(zips[:3])}, ...); unzip them first")
        raise UserError(f"{src}: no 3Dircadb1.N folders in it; {expected}")
    return sorted(found.items())


def discover_patients(src: str | Path) -> list[Patient]:
    # Index every patient before any heavy work, so a broken patient 17 fails in seconds.
    return [
        Patient(n, p, _find_part(p, PATIENT_PART), _find_part(p, MASKS_PART)) for n, p in find_patients(src)
    ]


def classify_structure(name: str) -> str | None:
    """The role of a ``MASKS_DICOM`` structure folder name.

    Returns:
        ``"metastasis"``, ``"cyst"``, ``"tumor"`` (bare tumour mask, kept only
        inside the liver), ``"liver"``, or ``None`` for structures we ignore.
    """
    if _TUMOUR_RE.match(name):
        return "metastasis"
    if _CYST_RE.match(name):
        return "cyst"
    if _BARE_TUMOUR_RE.match(name):
        return "tumor"
    if _LIVER_RE.match(name):
        return "liver"
    return None
