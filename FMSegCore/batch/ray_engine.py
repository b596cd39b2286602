"""The ``ray`` engine: Ray Data over the case list, a pool of actors that each hold the model.

Reading a scan and writing its results run as Ray tasks around the actors (``map`` before and after
``map_batches``), so the actors only segment; ``num_gpus`` per actor puts one model on each GPU of a cluster.
``ray.init()`` starts a local Ray on this machine; an address (``--address``, or ``RAY_ADDRESS``) joins a cluster,
whose nodes must see the inputs and the output folder at the same paths (shared storage).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

from FMSegCore.batch.casework import CaseJob, failed, read_case, write_case
from FMSegCore.batch.methods import MethodSpec
from FMSegCore.batch.results import Row
from FMSegCore.errors import FMSegError, InputError, ModelError

#: CPUs a read or write task asks Ray for (small: they wait on disks, and must fit beside the actors).
IO_TASK_CPUS = 0.25


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part used
    except ImportError:
        raise FMSegError("the ray engine needs Ray: pip install 'fmseg[ray]' (or use --engine local)") from None
    return ray


def check_address(address: Optional[str], timeout: float = 5.0) -> None:
    """A cluster address that does not answer is refused in one line before Ray tries for minutes."""
    if not address or address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(None, f"Ray address {address!r}: give HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as error:
        raise InputError(None, f"Ray address {address}: nothing answers there ({error.strerror or error})") from None


def start_ray(address: Optional[str], cpus: int) -> Any:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray with ``cpus`` CPUs; quiet."""
    ray = require_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    check_address(address)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # Ray's C++ notes about its own internals
    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if address is None:
            options["num_cpus"] = cpus
        ray.init(address=address, **options)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray


def _read(item: dict[str, Any]) -> dict[str, Any]:
    """Read one scan (a Ray task); the seconds each step takes add up to the case's time (queueing excluded)."""
    job: CaseJob = pickle.loads(item["job"])
    began = time.perf_counter()
    try:
        volume, row = pickle.dumps(read_case(job)), b""
    except Exception as error:  # noqa: BLE001 - recorded in the case's row
        volume, row = b"", pickle.dumps(failed(job, error))
    return {"job": item["job"], "volume": volume, "row": row, "seconds": time.perf_counter() - began}


class _Segment:
    """A Ray actor that loads the model once and segments the scans it is given."""

    def __init__(self, spec: MethodSpec, device: str, threads: int) -> None:
        from FMSegCore.batch.methods import build_segmenter

        if device.lower().startswith("cuda:"):
            device = "cuda"  # Ray shows each actor only its own GPU(s), from cuda:0
        self.segmenter = build_segmenter(spec, device, threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows, results, seconds = list(batch["row"]), [], list(batch["seconds"])
        for index, (job_bytes, volume_bytes) in enumerate(zip(batch["job"], batch["volume"])):
            results.append(b"")
            if rows[index]:  # the scan could not be read
                continue
            job, began = pickle.loads(job_bytes), time.perf_counter()
            try:
                results[index] = pickle.dumps(self.segmenter.segment(pickle.loads(volume_bytes), job.case))
            except Exception as error:  # noqa: BLE001 - recorded in the case's row
                rows[index] = pickle.dumps(failed(job, error))
            seconds[index] = float(seconds[index]) + time.perf_counter() - began
        return {"job": list(batch["job"]), "volume": list(batch["volume"]), "row": rows, "seconds": seconds,
                "result": results}


def _write(item: dict[str, Any]) -> dict[str, Any]:
    """Write one case's results (a Ray task) and give its row."""
    job: CaseJob = pickle.loads(item["job"])
    if item["row"]:
        return {"row": item["row"]}
    began = time.perf_counter()
    try:
        image, result = pickle.loads(item["volume"]), pickle.loads(item["result"])
        row = write_case(job, image, result, 0.0)
        row["seconds"] = round(float(item["seconds"]) + time.perf_counter() - began, 2)
        return {"row": pickle.dumps(row)}
    except Exception as error:  # noqa: BLE001 - recorded in the case's row
        return {"row": pickle.dumps(failed(job, error))}


def ray_workers(ray: Any, workers: Optional[int], gpus_per_worker: float, device: str) -> tuple[int, float]:
    """Actors and GPUs per actor on the cluster Ray runs: GPUs only where the cluster has them and the device
    allows CUDA (``cuda`` asked on a cluster without GPUs is refused: the actors would wait forever); default
    actors: one per ``gpus_per_worker`` GPUs, else one."""
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    wants_cuda = device.lower().startswith("cuda")
    if wants_cuda and gpus < max(gpus_per_worker, 1e-9):
        raise InputError(None, f"--device {device}: the Ray cluster has {gpus:g} GPU(s)")
    cpu_only = device.lower() != "auto" and not wants_cuda  # cpu or mps
    if cpu_only or gpus == 0 or gpus_per_worker <= 0:
        return workers or 1, 0.0
    if gpus < gpus_per_worker:
        raise InputError(None, f"--gpus-per-worker {gpus_per_worker:g}: the Ray cluster has {gpus:g} GPU(s)")
    return workers or max(1, int(gpus // gpus_per_worker)), gpus_per_worker


def run_ray(jobs: Sequence[CaseJob], spec: MethodSpec, workers: Optional[int], gpus_per_worker: float, device: str,
            threads: int, on_row: Callable[[Row], None], address: Optional[str] = None) -> str:
    """Segment ``jobs`` with actors (:func:`ray_workers`); ``on_row`` gets each case's row as it ends; what ran
    where, as a line. An actor that cannot load the model stops the run with a :class:`ModelError`."""
    ray = start_ray(address, cpus=(workers or 1) * threads + 1)
    actors, gpus = ray_workers(ray, workers, gpus_per_worker, device)
    where = f"{actors} actor(s), {gpus:g} GPU(s) and {threads} CPU thread(s) each"
    if not jobs:
        return where
    items = [{"job": pickle.dumps(job)} for job in jobs]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset = dataset.map(_read, num_cpus=IO_TASK_CPUS)
    dataset = dataset.map_batches(_Segment, fn_constructor_args=(spec, device if gpus else "cpu", threads),
                                  batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                                  num_gpus=gpus or None, num_cpus=threads, batch_format="numpy")
    dataset = dataset.map(_write, num_cpus=IO_TASK_CPUS)
    try:
        for item in dataset.iter_rows():
            on_row(pickle.loads(item["row"]))
    except ray.exceptions.RayError as error:
        cause = getattr(error, "cause", None) or error
        text = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise ModelError(f"the Ray run stopped: {text}") from None
    return where
