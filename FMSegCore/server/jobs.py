"""Long jobs (in-context segmentation, adaptation, automatic segmentation) run one at a time in a background
thread; each reports progress and can be cancelled between steps."""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from FMSegCore.errors import FMSegError
from FMSegCore.progress import Progress

STATES = ("queued", "running", "done", "failed", "cancelled")


class JobCancelled(FMSegError):
    """Raised inside a job's work when its cancellation was requested."""


@dataclass
class Job:
    """A job's state as clients see it, plus its results (JSON and named array frames)."""

    kind: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: str = "queued"
    done: float = 0.0
    total: float = 0.0
    message: str = ""
    loss: Optional[float] = None
    #: the seconds left the work last estimated (None: unknown), and when it did (time.monotonic())
    remaining: Optional[float] = None
    reported: float = 0.0
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    frames: dict[str, bytes] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def progress(self, update: Progress) -> None:
        """Record progress (an empty message keeps the last one); raises :class:`JobCancelled` once cancellation
        was requested."""
        self.done, self.total = float(update.step), float(update.total)
        if update.message:
            self.message = update.message
        self.loss, self.remaining, self.reported = update.loss, update.remaining, time.monotonic()
        self.check()

    def check(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled("cancelled")

    def cancel(self) -> None:
        self._cancel.set()
        if self.state == "queued":
            self.state = "cancelled"

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def snapshot(self) -> Progress:
        """The job's progress now: seconds since it started running, the last estimate of the seconds left
        (less the time since it was made; none once the job ended)."""
        now = time.time()
        elapsed = 0.0 if self.started is None else (self.finished or now) - self.started
        remaining = None
        if self.remaining is not None and self.state in ("queued", "running"):
            remaining = max(0.0, self.remaining - (time.monotonic() - self.reported))
        return Progress(self.done, self.total, self.message, self.loss, elapsed, remaining)

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state, **self.snapshot().to_json(),
                "error": self.error, "result": self.result, "arrays": sorted(self.frames)}


class JobRunner:
    """Runs jobs in submission order on one background thread (one model at a time on the device)."""

    def __init__(self, keep: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmseg-job")
        self.jobs: dict[str, Job] = {}
        self.keep = keep
        self._lock = threading.Lock()  # request threads submit and look up at once

    def submit(self, kind: str, work: Callable[[Job], dict[str, Any]]) -> Job:
        job = Job(kind)
        with self._lock:
            self.jobs[job.id] = job
            self._forget_old()
        self._pool.submit(self._run, job, work)
        return job

    def get(self, job_id: str) -> Optional[Job]:
        return self.jobs.get(job_id)

    def _run(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        if job.cancelled:
            job.state, job.finished = "cancelled", time.time()
            return
        job.state, job.started = "running", time.time()
        try:
            job.result = work(job) or {}
            job.state = "done"
        except Exception as error:  # a job's failure is reported to its client, never kills the worker
            if job.cancelled or type(error).__name__ == "Cancelled":
                job.state, job.message = "cancelled", "cancelled"
            else:
                job.state = "failed"
                job.error = str(error) if isinstance(error, FMSegError) else f"{type(error).__name__}: {error}"
                if not isinstance(error, FMSegError):
                    traceback.print_exc()
        finally:
            job.finished = time.time()

    def _forget_old(self) -> None:
        finished = sorted((j for j in self.jobs.values() if j.finished), key=lambda j: j.finished or 0)
        for job in finished[: max(0, len(self.jobs) - self.keep)]:
            del self.jobs[job.id]

    def shutdown(self) -> None:
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
