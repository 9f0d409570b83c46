"""Studies kept loaded between clicks: a session store bounded in count and memory, with expiry.

A study is one uploaded CT (and its optional mask) read into memory once, so each click on a lesion
costs only the patch and the network, not the upload and two volume reads. The store holds at most
``max_studies`` studies and ``max_bytes`` of arrays; the least recently used study goes first, and a
study idle for ``ttl_s`` seconds is dropped. Uploaded files never outlive the upload request: the
volumes are read, then the request's private temp folder is removed (see ``viewer.open_study``).
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from liverlesion.errors import UserError
from liverlesion.volume import Volume

__all__ = ["DEFAULT_MAX_STUDIES", "DEFAULT_MAX_STUDY_BYTES", "DEFAULT_STUDY_TTL_S", "Study", "StudyStore"]

DEFAULT_MAX_STUDIES = 4  # studies kept loaded at once (a viewer tab each)
DEFAULT_MAX_STUDY_BYTES = 4 * 1024**3  # arrays of all loaded studies together (a 512x512x900 CT is ~0.9 GB)
DEFAULT_STUDY_TTL_S = 30 * 60.0  # a study idle this long is dropped
_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_FORGET = 256  # ids remembered after they expired, to say "expired" rather than "unknown"


class StudyGone(UserError):
    """The study id is unknown, expired or evicted (HTTP 404)."""


@dataclass(eq=False)
class Study:
    """One loaded CT with its mask and the lesions classified so far.

    Attributes:
        id: Random URL-safe token (the only handle a client has).
        image: The CT in HU.
        labels: Lesion label volume on the CT's grid, or None: a multi-label mask as given; a binary
            mask as its 26-connected components numbered like ``lesions_from_mask`` does.
        mask_kind: ``"labels"``, ``"components"``, ``"segments"`` (a DICOM SEG: segment N is label N) or
            ``""`` (no mask).
        segments: For a DICOM SEG mask, the SegmentLabel of each opened segment by number.
        names: The uploaded file names (``image``, ``mask``), for messages and the JSON record.
        results: lesion_id -> the classifier's lesion result (row, mask, patch, Grad-CAM), in click order.
        n_clicks: Point lesions so far (their ids are ``case-C01``, ...).
        seg: The last DICOM SEG downloaded: ``(SegReference, {lesion_id: result written})``, for the SR.
    """

    id: str
    image: Volume
    labels: Volume | None = None
    mask_kind: str = ""
    segments: dict[int, str] = field(default_factory=dict)
    names: dict[str, str | None] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    n_clicks: int = 0
    seg: tuple[Any, dict[str, Any]] | None = None
    min_size_mm: float = 5.0  # of the latest classification (for the JSON record)
    last_used: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        """Memory held by the study's arrays (image, labels, lesion crops and patches)."""
        n = self.image.array.nbytes + (self.labels.array.nbytes if self.labels is not None else 0)
        for r in self.results.values():
            n += getattr(getattr(r.mask, "crop", None), "nbytes", 0)
            n += getattr(getattr(r.patch, "image", None), "nbytes", 0)
        return int(n)


class StudyStore:
    """Loaded studies by id, bounded in count and bytes, dropped when idle for ``ttl_s``.

    Args:
        max_studies: Most studies at once; adding one more drops the least recently used.
        max_bytes: Most array bytes of all studies together; a study larger than this is refused.
        ttl_s: Seconds a study may stay unused.
        clock: Monotonic seconds (a parameter so tests can move time on).
    """

    def __init__(
        self,
        max_studies: int = DEFAULT_MAX_STUDIES,
        max_bytes: int = DEFAULT_MAX_STUDY_BYTES,
        ttl_s: float = DEFAULT_STUDY_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not (isinstance(max_studies, int) and 1 <= max_studies <= 1000):
            raise UserError(
                f"--max-studies {max_studies!r}: must be a whole number from 1 to 1000 (default {DEFAULT_MAX_STUDIES})"
            )
        if not (ttl_s > 0):
            raise UserError(
                f"--study-ttl-min {ttl_s / 60:g}: must be a positive number of minutes "
                f"(default {DEFAULT_STUDY_TTL_S / 60:g})"
            )
        self.max_studies = int(max_studies)
        self.max_bytes = int(max_bytes)
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self._studies: OrderedDict[str, Study] = OrderedDict()  # least recently used first
        self._gone: deque[str] = deque(maxlen=_FORGET)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._studies)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._studies.values())

    def _expire(self) -> None:
        now = self.clock()
        for sid in [k for k, s in self._studies.items() if now - s.last_used > self.ttl_s]:
            self._drop(sid)

    def _drop(self, sid: str) -> None:
        self._studies.pop(sid, None)
        self._gone.append(sid)

    def add(self, image: Volume, **kw: Any) -> Study:
        """Keep a new study (dropping expired and least recently used ones to make room).

        Raises:
            UserError: The study alone is larger than the store's memory limit.
        """
        study = Study(id=secrets.token_urlsafe(18), image=image, last_used=self.clock(), **kw)
        size = study.nbytes
        if size > self.max_bytes:
            raise UserError(
                f"CT of shape {image.shape} (z, y, x) needs {size / 1024**2:.0f} MiB in memory, over the "
                f"server's study memory of {self.max_bytes / 1024**2:.0f} MiB; crop or resample the CT, or "
                "restart the server with more memory for studies"
            )
        with self._lock:
            self._expire()
            while self._studies and (
                len(self._studies) >= self.max_studies
                or sum(s.nbytes for s in self._studies.values()) + size > self.max_bytes
            ):
                self._drop(next(iter(self._studies)))
            self._studies[study.id] = study
        return study

    def get(self, sid: str) -> Study:
        """The study ``sid``, marked as just used.

        Raises:
            StudyGone: Unknown, expired or evicted (the message says which and what to do).
        """
        with self._lock:
            self._expire()
            study = self._studies.get(sid) if _ID.match(sid or "") else None
            if study is None:
                if sid in self._gone:
                    raise StudyGone(
                        f"study {sid}: expired or closed (studies are kept {self.ttl_s / 60:g} min after last use, "
                        f"at most {self.max_studies} at once); open the CT again"
                    )
                raise StudyGone(f"study {sid!r}: no such study on this server; open the CT again")
            study.last_used = self.clock()
            self._studies.move_to_end(sid)
            return study

    def remove(self, sid: str) -> bool:
        """Forget a study now (its arrays are freed); True when it was there."""
        with self._lock:
            there = sid in self._studies
            if there:
                self._drop(sid)
            return there
