"""A cohort run from start to end: check everything, skip what an earlier run did, segment the rest with the
chosen engine, keep the results table current after every case, then flag and report.

The output folder belongs to one task: ``batch.json`` records the task's sha256, and a folder holding results of
another task (or files that are not FMSeg results) is refused unless ``overwrite``. Outputs never replace an
input. The run's exit status says whether any case of the cohort failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from FMSegCore.batch.cases import Case, read_cases
from FMSegCore.batch.casework import CaseJob, check_overlays_possible
from FMSegCore.batch.methods import PROMPTS, MethodPlan, MethodSpec, plan_method
from FMSegCore.batch.qc import flag_rows
from FMSegCore.batch.report import REPORT_FILE, write_report
from FMSegCore.batch.results import (
    DONE,
    FAILED,
    RESULTS_FILE,
    Row,
    input_hash,
    is_done,
    read_results,
    write_results,
)
from FMSegCore.errors import InputError
from FMSegCore.io.atomic import atomic_output
from FMSegCore.options import Batch, option

MANIFEST_FILE = "batch.json"
PARQUET_FILE = "results.parquet"
ENGINES: tuple[str, ...] = option(Batch, "engine").choices or ()
FORMATS: tuple[str, ...] = option(Batch, "format").choices or ()
#: What FMSeg itself writes in an output folder (anything else there is someone's data).
_OURS = (MANIFEST_FILE, RESULTS_FILE, PARQUET_FILE, REPORT_FILE, "qc")


@dataclass
class BatchSettings:
    """What ``fmseg batch`` was asked: inputs, output folder, method, engine and its workers, device, format."""

    inputs: str
    output: str
    spec: MethodSpec
    engine: str = Batch.engine
    workers: Optional[int] = Batch.workers  # None: one per GPU, else one
    gpus_per_worker: float = Batch.gpus_per_worker
    device: str = Batch.device
    format: str = Batch.format
    overwrite: bool = False
    address: Optional[str] = None
    progress: Optional[bool] = None
    threads: Optional[int] = None  # per worker; None: the usable threads shared out


@dataclass
class BatchSummary:
    """How a run ended: the cohort's rows, and how many cases were done now, skipped as done, failed."""

    rows: list[Row]
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    report: Optional[Path] = None
    results: Optional[Path] = None
    extras: dict[str, str] = field(default_factory=dict)


def worker_devices(device: str, workers: Optional[int]) -> list[str]:
    """One device per worker: on CUDA the GPUs in turn (default: one worker per GPU), elsewhere one device."""
    from FMSegCore.device import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        import torch

        gpus = torch.cuda.device_count()
        return [f"cuda:{i % gpus}" for i in range(workers or gpus)]
    return [str(resolved)] * (workers or 1)


def threads_per_worker(workers: int, requested: Optional[int] = None) -> int:
    from FMSegCore.device import chosen_threads

    return requested or max(1, chosen_threads()[0] // workers)


def check_folder(folder: Path, plan: MethodPlan, overwrite: bool, inputs: Path) -> None:
    """The output folder may hold only this task's results (unless ``overwrite``), and is not the inputs'."""
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "is a file; the output must be a folder")
    if not folder.parent.exists():
        raise InputError(folder, f"the folder above it ({folder.parent}) does not exist")
    if inputs.is_dir() and folder.exists() and folder.resolve() == inputs.resolve():
        raise InputError(folder, "is the inputs' folder: write the results to another folder")
    if not folder.exists() or overwrite:
        return
    manifest = folder / MANIFEST_FILE
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(manifest, "damaged (not JSON); remove it or use --overwrite") from None
        if previous.get("task_sha256") != plan.task_sha256:
            raise InputError(folder, f"holds results of another task ({previous.get('method', 'unknown')}); "
                                     "choose another folder, or --overwrite to replace them")
    elif any(not path.name.startswith(".") for path in folder.iterdir()):
        raise InputError(folder, "holds files that are not FMSeg batch results; choose an empty or new folder "
                                 "(or --overwrite)")


def output_name(case: Case, fmt: str) -> str:
    return f"{case.case_id}{fmt}"


def check_outputs(cases: Sequence[Case], folder: Path, fmt: str) -> None:
    """No output may be an input file (a scan or a per-case file inside the output folder)."""
    for case in cases:
        target = folder / output_name(case, fmt)
        sources = [case.image, *(p for value in case.columns.values() for p in value.split(";") if p)]
        for source in sources:
            if Path(source).exists() and target.exists() and os.path.samefile(target, source):
                raise InputError(target, f"the result of case '{case.case_id}' would replace its input")


def write_manifest(folder: Path, plan: MethodPlan, settings: BatchSettings) -> None:
    content = {"format": "fmseg-batch", "version": 1, "task_sha256": plan.task_sha256, "method": plan.description,
               "structures": [s.name for s in plan.structures] if plan.structures else None,
               "output_format": settings.format, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_output(folder / MANIFEST_FILE) as temporary:
        temporary.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")


def plan_jobs(cases: Sequence[Case], folder: Path, previous: dict[str, Row], plan: MethodPlan, fmt: str,
              overlays: bool) -> tuple[list[CaseJob], list[str]]:
    """The cases to run (with their input hashes) and the names of those an earlier run did already."""
    jobs, skipped = [], []
    for case in cases:
        digest, size, mtime = input_hash(case, previous.get(case.case_id))
        if is_done(previous.get(case.case_id), digest, plan.task_sha256, folder):
            skipped.append(case.case_id)
            continue
        jobs.append(CaseJob(case, str(folder), output_name(case, fmt), digest, size, mtime, plan.task_sha256,
                            overlays))
    return jobs, skipped


def run_batch(settings: BatchSettings) -> BatchSummary:
    """Run a cohort (see the module's docstring); bad input is one :class:`InputError` before any work."""
    began = time.perf_counter()
    if settings.engine not in ENGINES:
        raise InputError(None, f"unknown engine {settings.engine!r} (use {', '.join(ENGINES)})")
    if settings.format not in FORMATS:
        raise InputError(None, f"unknown format {settings.format!r} (use {', '.join(FORMATS)})")
    if settings.workers is not None and settings.workers < 1:
        raise InputError(None, f"--workers must be at least 1, not {settings.workers}")
    if settings.engine == "ray":
        from FMSegCore.batch.ray_engine import check_address, require_ray

        require_ray()
        check_address(settings.address or os.environ.get("RAY_ADDRESS"))
    folder, inputs = Path(settings.output), Path(settings.inputs)
    required = [settings.spec.prompts_column] if settings.spec.kind == PROMPTS else []
    cases = read_cases(inputs, [c for c in required if c])
    plan = plan_method(settings.spec)
    check_folder(folder, plan, settings.overwrite, inputs)
    ray_engine = settings.engine == "ray"
    # Ray: each actor resolves the device on its own node (the driver may have no GPU)
    devices = [settings.device] * (settings.workers or 1) if ray_engine else worker_devices(settings.device,
                                                                                            settings.workers)
    check_outputs(cases, folder, settings.format)
    folder.mkdir(exist_ok=True)
    previous = {} if settings.overwrite else read_results(folder / RESULTS_FILE)
    overlay_problem = check_overlays_possible()
    if overlay_problem:
        print(f"Note: no overlay thumbnails ({overlay_problem})", file=sys.stderr)
    jobs, skipped = plan_jobs(cases, folder, previous, plan, settings.format, overlay_problem is None)
    write_manifest(folder, plan, settings)
    rows: dict[str, Row] = dict(previous)
    summary = BatchSummary([], skipped=len(skipped))
    threads = threads_per_worker(len(devices), settings.threads)
    print(f"Cohort: {len(cases)} case(s); {len(skipped)} done before, {len(jobs)} to run; {plan.description}",
          file=sys.stderr, flush=True)
    bar = _Progress(len(jobs), settings.progress)

    def record(row: Row) -> None:
        rows[row["case"]] = row
        write_results(folder / RESULTS_FILE, list(rows.values()))
        bar.update(row)

    try:
        if settings.engine == "local":
            from FMSegCore.batch.local_engine import run_local

            summary.extras["workers"] = (f"{len(devices)} worker process(es) on {', '.join(sorted(set(devices)))}, "
                                         f"{threads} CPU thread(s) each")
            run_local(jobs, settings.spec, devices, threads, record)
        else:
            from FMSegCore.batch.ray_engine import run_ray

            summary.extras["workers"] = run_ray(jobs, settings.spec, settings.workers, settings.gpus_per_worker,
                                                settings.device, threads, record, settings.address)
    finally:
        bar.close()
        cohort = [rows[c.case_id] for c in cases if c.case_id in rows]
        # rows of cases no longer in the cohort: done ones stay (their outputs are there), failed ones go
        others = [row for name, row in rows.items()
                  if name not in {c.case_id for c in cases} and row.get("status") == DONE]
        flag_rows(cohort + others)
        write_results(folder / RESULTS_FILE, cohort + others)
    summary.rows = cohort
    summary.done = bar.done
    summary.failed = sum(row.get("status") == FAILED for row in cohort)
    summary.results = folder / RESULTS_FILE
    summary.report = write_report(folder, cohort + others, plan.description)
    if settings.engine == "ray":
        summary.extras["parquet"] = str(write_parquet(folder / PARQUET_FILE, cohort + others))
    summary.seconds = time.perf_counter() - began
    return summary


def write_parquet(path: Path, rows: Sequence[Row]) -> Path:
    """The results table as Parquet too (what Ray users read back with ``ray.data.read_parquet``)."""
    import pandas

    from FMSegCore.batch.results import COLUMNS, structures_of, volume_column

    columns = [*COLUMNS, *(volume_column(name) for name in structures_of(rows))]
    frame = pandas.DataFrame([{key: row.get(key, "") for key in columns} for row in rows], columns=columns)
    frame = frame.astype(str)
    with atomic_output(path) as temporary:
        frame.to_parquet(temporary, index=False)
    return path


class _Progress:
    """Cases done and failed, and scans per minute, on a bar (or a line every few seconds off a terminal)."""

    def __init__(self, total: int, show: Optional[bool]) -> None:
        from FMSegCore.progress import progress_bar, show_progress

        self.bar = progress_bar(show_progress(show), total=total, unit="scan", desc="Cohort")
        self.began, self.done, self.failed = time.perf_counter(), 0, 0

    def update(self, row: Row) -> None:
        if row.get("status") == DONE:
            self.done += 1
        else:
            self.failed += 1
        minutes = max(time.perf_counter() - self.began, 1e-6) / 60.0
        self.bar.set_postfix(refresh=False, done=self.done, failed=self.failed,
                             **{"scans/min": f"{(self.done + self.failed) / minutes:.1f}"})
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
