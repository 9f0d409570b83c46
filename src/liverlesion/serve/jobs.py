"""Model jobs run one at a time on a worker thread; clients poll their state (queued, running, done)."""

from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from liverlesion.errors import UserError

__all__ = ["Job", "JobGone", "JobQueue"]

log = logging.getLogger(__name__)

_KEEP = 256  # finished jobs remembered (their results are small JSON)


class JobGone(UserError):
    """The job id is unknown or its result was forgotten (HTTP 404)."""


@dataclass(eq=False)
class Job:
    """One classification request: ``state`` is queued, running, done or error."""

    id: str
    study_id: str
    state: str = "queued"
    stage: str = "waiting for the model"
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    result: Any = None
    error: str | None = None
    status: int = 200  # the HTTP status of the answer, once finished
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def set_stage(self, stage: str) -> None:
        """What the job does now (shown in the page while it runs)."""
        self.stage = stage

    def describe(self, ahead: int = 0) -> dict[str, Any]:
        """The JSON a client polls."""
        now = time.monotonic()
        out: dict[str, Any] = {
            "job_id": self.id,
            "study_id": self.study_id,
            "state": self.state,
            "stage": self.stage if self.state != "queued" else f"queued ({ahead} ahead)",
            "elapsed_s": round((self.finished or now) - self.created, 3),
        }
        if self.state == "done":
            out["result"] = self.result
        if self.state == "error":
            out["error"] = self.error
        return out


class JobQueue:
    """A single worker thread (the model and Grad-CAM hooks are not thread-safe) and its jobs.

    Args:
        max_pending: Jobs queued or running at once; more are refused (HTTP 503).
        lock: Held while a job runs, shared with other model users (the one-shot form).
    """

    def __init__(self, max_pending: int, lock: threading.Lock):
        self.max_pending = int(max_pending)
        self.lock = lock
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="liverlesion-model")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._mutex = threading.Lock()

    def submit(self, study_id: str, work: Callable[[Job], Any]) -> Job:
        """Queue ``work(job)``; its return value becomes ``job.result``.

        Raises:
            UserError: Too many jobs pending (the caller answers 503).
        """
        with self._mutex:
            pending = [j for j in self._jobs.values() if j.state in ("queued", "running")]
            if len(pending) >= self.max_pending:
                raise UserError(
                    f"server busy: {len(pending)} classifications already waiting (--max-concurrent "
                    f"{self.max_pending}); retry in a few seconds"
                )
            job = Job(id=secrets.token_urlsafe(12), study_id=study_id)
            self._jobs[job.id] = job
            while len(self._jobs) > _KEEP + self.max_pending:
                oldest = next(iter(self._jobs.values()))
                if oldest.state in ("queued", "running"):
                    break
                self._jobs.popitem(last=False)
        self._pool.submit(self._run, job, work)
        return job

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        try:
            with self.lock:
                job.state, job.started = "running", time.monotonic()
                job.set_stage("classifying")
                job.result = work(job)
            job.state = "done"
        except UserError as e:
            job.state, job.error, job.status = (
                "error",
                str(e),
                404 if type(e).__name__ == "StudyGone" else 400,
            )
        except Exception as e:
            # Where it failed, not the message: it may quote values from the upload.
            log.error(
                "job failed with %s:\n%s", type(e).__name__, "".join(traceback.format_tb(e.__traceback__))
            )
            job.state, job.status = "error", 500
            job.error = (
                "internal error while classifying; the server log has the details (no patient data is logged)"
            )
        finally:
            job.finished = time.monotonic()
            job.set_stage(job.state)
            job.done.set()

    def get(self, job_id: str) -> tuple[Job, int]:
        """The job and how many jobs are queued before it.

        Raises:
            JobGone: No such job (finished jobs are forgotten after a while).
        """
        with self._mutex:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobGone(
                    f"job {job_id!r}: no such job (finished jobs are kept a short while); classify again"
                )
            ahead = sum(
                1 for j in self._jobs.values() if j.state in ("queued", "running") and j.created < job.created
            )
            return job, ahead

    def shutdown(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._pool.shutdown(wait=False, cancel_futures=True)
