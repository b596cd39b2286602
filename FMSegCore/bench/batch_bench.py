"""Cohort throughput (``fmseg bench batch``): scans per minute of ``fmseg batch`` on this machine, the local engine
beside Ray with the same workers, and each one's fixed cost per run and overhead per scan.

The cohort is built from the bundled abdominal CT: copies cut to other fields of view and resampled to other
spacings (a speed cohort: the task is made from the same CT, so its Dice would say nothing). Each run is a fresh
``fmseg batch`` process, as a user starts it; a one-scan run of each engine gives its fixed cost (start-up, model
load, Ray's start), so that the overhead per scan is what remains of a cohort run's time besides the fixed cost
and the cases' own time (read, segment, write, overlay, as each worker records it).
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from FMSegCore.zoo.cache import resources_dir

CT = resources_dir() / "SampleData" / "ct_abdomen_pelvis"
#: The structures of the benchmark's task.
STRUCTURES = ("liver", "spleen", "kidney_left", "kidney_right")
#: Spacings (mm) and slab fractions the cohort's copies cycle through.
SPACINGS = (3.0, 3.5, 4.0, 4.5)
SLABS = ((0.0, 1.0), (0.2, 0.9), (0.1, 0.7), (0.3, 1.0))


def build_cohort(folder: Path, scans: int) -> list[dict[str, Any]]:
    """``scans`` copies of the bundled CT with varied field of view and spacing; what each one is."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(CT / "image.nii.gz"))
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for index in range(scans):
        spacing = SPACINGS[index % len(SPACINGS)]
        low, high = SLABS[(index // len(SPACINGS) + index) % len(SLABS)]
        depth = image.GetSize()[2]
        slab = image[:, :, int(low * depth):max(int(high * depth), int(low * depth) + 16)]
        size = [max(8, int(round(n * s / spacing))) for n, s in zip(slab.GetSize(), slab.GetSpacing())]
        copy = sitk.Resample(slab, size, sitk.Transform(), sitk.sitkLinear, slab.GetOrigin(), [spacing] * 3,
                             slab.GetDirection(), -1000.0)
        sitk.WriteImage(copy, str(folder / f"scan{index:03d}.nii.gz"))
        made.append({"scan": f"scan{index:03d}", "spacing_mm": spacing, "shape_ijk": list(copy.GetSize())})
    return made


def _run(command: Sequence[str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return seconds


def _case_seconds(folder: Path) -> list[float]:
    with (folder / "results.csv").open(newline="") as handle:
        return [float(row["seconds"]) for row in csv.DictReader(handle) if row["status"] == "done"]


def time_engine(engine: str, cohort: Path, single: Path, task: Path, workers: int, work: Path) -> dict[str, Any]:
    """One engine's figures: fixed cost (a one-scan run's time less its case), the cohort run's time, scans per
    minute, mean case time and the overhead per scan."""
    base = [sys.executable, "-m", "FMSegCore", "batch", "--task", str(task), "--device", "cpu", "--engine", engine,
            "--workers", str(workers), "--no-progress"]
    one_folder, all_folder = work / f"{engine}_one", work / f"{engine}_all"
    one_wall = _run([*base, "--inputs", str(single), "--output", str(one_folder)])
    fixed = one_wall - sum(_case_seconds(one_folder))
    wall = _run([*base, "--inputs", str(cohort), "--output", str(all_folder)])
    cases = _case_seconds(all_folder)
    mean_case = sum(cases) / len(cases)
    overhead = (wall - fixed) * workers / len(cases) - mean_case
    return {"engine": engine, "workers": workers, "scans": len(cases), "wall_s": round(wall, 2),
            "scans_per_minute": round(60.0 * len(cases) / wall, 2), "fixed_cost_s": round(fixed, 2),
            "mean_case_s": round(mean_case, 2), "overhead_per_scan_s": round(overhead, 2),
            "one_scan_wall_s": round(one_wall, 2)}


def projection(case_seconds: float, overhead: float, fixed: float, scans: int,
               workers: Sequence[int]) -> list[dict[str, Any]]:
    """What ``N`` workers would do on ``scans`` scans, each worker taking ``case_seconds`` + ``overhead`` per scan
    (a projection from the measured costs, not a measurement)."""
    rows = []
    for count in workers:
        per_scan = case_seconds + max(overhead, 0.0)
        hours = (fixed + per_scan * -(-scans // count)) / 3600.0
        rows.append({"workers": count, "scans_per_minute": round(60.0 * count / per_scan, 1),
                     f"hours_for_{scans}_scans": round(hours, 2)})
    return rows


def run_bench(scans: int = 8, workers: int = 2, engines: Sequence[str] = ("local", "ray"),
              gpu_case_seconds: Optional[float] = None, project: Sequence[int] = (1, 4, 16, 64),
              project_scans: int = 800, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Build the cohort and the task, time each engine, and project a cluster's throughput."""
    from FMSegCore.cli.incontext3d import task_to_file
    from FMSegCore.device import usable_cores

    log = log or (lambda line: None)
    with tempfile.TemporaryDirectory(prefix="fmseg-bench-batch-") as temporary:
        work = Path(temporary)
        made = build_cohort(work / "cohort", scans)
        (work / "single").mkdir()
        os.link(work / "cohort" / "scan000.nii.gz", work / "single" / "scan000.nii.gz")
        task = work / "task.fmseg-task"
        task_to_file([(CT / "image.nii.gz", CT / "label.nii.gz")], task, labels=list(STRUCTURES), device="cpu",
                     progress=False)
        results = []
        for engine in engines:
            log(f"timing the {engine} engine ({workers} workers, {scans} scans)...")
            results.append(time_engine(engine, work / "cohort", work / "single", task, workers, work))
            log(f"  {results[-1]}")
    figures: dict[str, Any] = {
        "command": f"fmseg bench batch --scans {scans} --workers {workers}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": usable_cores(),
                    "python": platform.python_version()},
        "method": f"task file of iris-fmseg ({', '.join(STRUCTURES)}), device cpu",
        "cohort": made, "engines": results,
    }
    # a cluster runs the ray engine: its measured costs, where it was timed
    cpu = next((r for r in results if r["engine"] == "ray"), results[0])
    figures["projection"] = {
        "note": "projected, not measured: N workers each taking the measured case time of one CPU worker here "
                f"plus the measured overhead per scan ({cpu['engine']} engine); a GPU worker's case time is "
                "shorter (give it with --gpu-case-seconds)",
        "cpu_workers": projection(cpu["mean_case_s"], cpu["overhead_per_scan_s"], cpu["fixed_cost_s"],
                                  project_scans, project)}
    if gpu_case_seconds:
        figures["projection"]["gpu_case_s"] = gpu_case_seconds
        figures["projection"]["gpu_workers"] = projection(gpu_case_seconds, cpu["overhead_per_scan_s"],
                                                          cpu["fixed_cost_s"], project_scans, project)
    return figures
