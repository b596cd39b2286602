"""How many CPU threads FMSeg should use: LiteMedSAM's image encoder (the demo's main cost) timed with one thread,
with every core and with FMSeg's default (:func:`FMSegCore.device.default_threads`: the cores the 1-minute load
average leaves idle), on an idle machine and with other jobs keeping cores busy (busy-loop processes started
here, given a minute so that the load average sees them, as it would see any other job)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Callable, Optional

#: Seconds a busy-loop job runs before the timings, so that the 1-minute load average counts it.
SETTLE_SECONDS = 60.0


def _busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _encoder_seconds(threads: int, repeats: int) -> list[float]:
    import numpy as np
    import torch

    from FMSegCore.models.factory import load_model

    torch.set_num_threads(threads)
    model = load_model("litemedsam", "cpu")
    slice_ = np.random.default_rng(0).normal(0, 300, (256, 256)).astype(np.float32)
    image = model.preprocess(slice_)[None]
    times = []
    with torch.no_grad():
        model.encode(image)  # warm-up
        for _ in range(repeats):
            began = time.perf_counter()
            model.encode(image)
            times.append(time.perf_counter() - began)
    return times


def run_bench(busy_jobs: Sequence[int] = (0, 1), repeats: int = 5, settle: float = SETTLE_SECONDS,
              log: Optional[Callable[[str], None]] = None) -> dict:
    """Medians per condition (``busy_jobs`` other busy processes) and thread setting."""
    import torch

    from FMSegCore.device import default_threads, usable_cores

    cores = usable_cores()
    figures: dict = {"what": "LiteMedSAM image encoder, one 256x256 slice, fp32", "cores": cores,
                     "torch": torch.__version__, "repeats": repeats, "conditions": []}
    for jobs in busy_jobs:
        workers = _busy(jobs)
        try:
            if jobs:
                time.sleep(settle)
            load = os.getloadavg()[0]
            chosen = default_threads(cores, load)
            row: dict = {"busy_jobs": jobs, "loadavg_1min": round(load, 2), "default_threads": chosen,
                         "settings": {}}
            for name, threads in (("one thread", 1), ("every core", cores), ("default", chosen)):
                times = _encoder_seconds(threads, repeats)
                row["settings"][name] = {"threads": threads, "median_s": round(statistics.median(times), 4),
                                         "runs_s": [round(t, 4) for t in times]}
                if log:
                    log(f"{jobs} busy job(s), load {load:.1f}: {name} ({threads}) "
                        f"{statistics.median(times):.2f} s")
            figures["conditions"].append(row)
        finally:
            for worker in workers:
                worker.kill()
                worker.wait()
    return figures
