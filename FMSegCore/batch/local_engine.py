"""The ``local`` engine: a pool of worker processes on this machine, each loading the model once.

Workers share nothing (``spawn``, so no torch state is inherited); each takes a device from the list (one per GPU
on a GPU machine) and runs one case at a time, so when a worker dies (out of memory, say) the cases it held are
known: they are recorded as failed and the others go on in a fresh pool.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Optional

from FMSegCore.batch.casework import CaseJob, failed, run_case
from FMSegCore.batch.methods import MethodSpec, Segmenter
from FMSegCore.batch.results import Row
from FMSegCore.errors import FMSegError, ModelError

_SEGMENTER: Optional[Segmenter] = None
_LOAD_ERROR: Optional[str] = None


class WorkerDied(RuntimeError):
    """A worker process ended while it held a case."""


def _start(spec: MethodSpec, devices: Any, threads: int) -> None:
    """Pool initializer: take a device, load the model (a failure is kept and reported with the first case)."""
    global _SEGMENTER, _LOAD_ERROR
    from FMSegCore.batch.methods import build_segmenter

    device = devices.get()
    try:
        _SEGMENTER = build_segmenter(spec, device, threads)
    except Exception as error:  # noqa: BLE001 - reported to the driver, which stops the run with it
        _LOAD_ERROR = str(error) if isinstance(error, FMSegError) else f"{type(error).__name__}: {error}"


def _work(job: CaseJob) -> Row:
    if _SEGMENTER is None:
        raise ModelError(f"the worker could not load the model: {_LOAD_ERROR}")
    return run_case(_SEGMENTER, job)


def run_local(jobs: Sequence[CaseJob], spec: MethodSpec, devices: Sequence[str], threads: int,
              on_row: Callable[[Row], None]) -> None:
    """Segment ``jobs`` with one worker per entry of ``devices``; ``on_row`` gets each case's row as it ends.
    A model that cannot be loaded stops the run with a :class:`ModelError` (nothing of it is recorded)."""
    context = multiprocessing.get_context("spawn")
    pending = list(jobs)
    while pending:
        queue = context.Queue()
        for device in devices:
            queue.put(device)
        with ProcessPoolExecutor(len(devices), mp_context=context, initializer=_start,
                                 initargs=(spec, queue, threads)) as pool:
            pending = _drain(pool, pending, len(devices), on_row)


def _drain(pool: ProcessPoolExecutor, pending: list[CaseJob], workers: int,
           on_row: Callable[[Row], None]) -> list[CaseJob]:
    """Feed the pool one case per worker at a time; the cases left when the pool broke (none when all ran)."""
    running: dict[Future, CaseJob] = {}
    queue = list(pending)
    while queue or running:
        while queue and len(running) < workers:
            job = queue.pop(0)
            running[pool.submit(_work, job)] = job
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            job = running.pop(future)
            try:
                on_row(future.result())
            except BrokenProcessPool:
                lost = [job, *running.values()]
                for held in lost:
                    on_row(failed(held, WorkerDied(f"the worker process died while segmenting it (out of "
                                                   f"memory?); {len(lost)} case(s) were in flight")))
                return queue
    return []
