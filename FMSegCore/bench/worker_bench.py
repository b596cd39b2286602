"""What the worker adds to a prompt: the same prompts in-process and through a real worker process over
HTTP on 127.0.0.1, paired, with identical results required; plus volume upload times."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from FMSegCore.bench.prompt_bench import corrective_click, dice
from FMSegCore.prompts import BoxPrompt, PointPrompt, SegmentPrompts
from FMSegCore.server.client import WorkerClient, geometry


@dataclass
class Pairs:
    """Paired timings (ms) of one kind of prompt."""

    in_process: list[float] = field(default_factory=list)
    worker: list[float] = field(default_factory=list)
    worker_compute: list[float] = field(default_factory=list)
    response_bytes: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        overhead = [w - i for w, i in zip(self.worker, self.in_process)]
        transport = [w - c for w, c in zip(self.worker, self.worker_compute)]
        return {"count": len(overhead),
                "in_process_ms": round(statistics.median(self.in_process), 1),
                "worker_ms": round(statistics.median(self.worker), 1),
                "overhead_ms_median": round(statistics.median(overhead), 1),
                "overhead_ms_max": round(max(overhead), 1),
                "transport_ms_median": round(statistics.median(transport), 1),
                "transport_ms_max": round(max(transport), 1),
                "response_kb_median": round(statistics.median(self.response_bytes) / 1024, 1)}


def _wire(prompts: SegmentPrompts) -> dict[str, Any]:
    return {"boxes": [(b.lo, b.hi, b.corners) for b in prompts.boxes], "points": [(p.ijk, p.include) for p in prompts.points]}


def run_worker_bench(client: WorkerClient, session_local: Any, case: tuple, structures: list[str],
                     clicks: int = 5, progress=print) -> dict[str, Any]:
    """Box prompt then corrective clicks per structure, each timed in-process and through the worker; ``case`` is
    (image, label volume, names by value) as :func:`FMSegCore.bench.prompt_bench.load_case` returns it."""
    image, labels, names = case
    by_name = {name: value for value, name in names.items()}
    began = time.perf_counter()
    volume_id = client.upload_volume(image.array, geometry(image.spacing, image.origin, image.direction))
    upload_ms = (time.perf_counter() - began) * 1000
    session_id = client.open_session(volume_id, precision="fp32" if session_local.autocast_dtype is None else "auto")
    kinds = {"first box (encodes and propagates)": Pairs(), "corrective click (decoder only)": Pairs()}
    identical = True
    dices: dict[str, float] = {}
    for name in structures:
        reference = labels.array == by_name[name]
        slices = np.flatnonzero(reference.any(axis=(1, 2)))
        middle = int(slices[len(slices) // 2])
        rows, cols = np.flatnonzero(reference[middle].any(1)), np.flatnonzero(reference[middle].any(0))
        prompts = SegmentPrompts(name, boxes=[BoxPrompt((cols[0], rows[0], middle), (cols[-1], rows[-1], middle))])
        points: list[PointPrompt] = []
        applied = 0
        for step in range(clicks + 1):
            applied = step
            kind = kinds["first box (encodes and propagates)" if step == 0 else "corrective click (decoder only)"]
            began = time.perf_counter()
            local = session_local.segment(prompts)
            kind.in_process.append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            remote, info = client.prompt(session_id, name, **_wire(prompts))
            kind.worker.append((time.perf_counter() - began) * 1000)
            kind.worker_compute.append(info["seconds"] * 1000)
            kind.response_bytes.append(int(info.get("bytes", 0)))
            identical &= bool(np.array_equal(local, remote))
            click = corrective_click(local, reference)
            if click is None:
                break
            points.append(click)
            prompts = SegmentPrompts(name, prompts.boxes, list(points))
        dices[name] = round(dice(local, reference), 3)
        progress(f"{name}: Dice {dices[name]:.3f} after {applied} click(s)")
    return {"volume_shape_ijk": list(image.shape_ijk), "volume_mb": round(image.array.nbytes / 2**20, 1),
            "upload_ms": round(upload_ms, 1), "identical_results": identical, "dice_after_clicks": dices,
            "kinds": {kind: pairs.summary() for kind, pairs in kinds.items() if pairs.worker}}


def upload_speed(client: WorkerClient, shape_kji: tuple[int, int, int] = (300, 512, 512)) -> dict[str, Any]:
    """Seconds to send a large int16 volume (raw and zlib) to the worker."""
    rng = np.random.default_rng(0)
    array = (rng.normal(0, 300, size=shape_kji)).astype(np.int16)
    figures = {"shape_kji": list(shape_kji), "mb": round(array.nbytes / 2**20, 1)}
    for compress in (False, True):
        began = time.perf_counter()
        volume_id = client.upload_volume(array, geometry((1, 1, 1), (0, 0, 0), np.eye(3)), compress=compress)
        figures["zlib_s" if compress else "raw_s"] = round(time.perf_counter() - began, 2)
        client.remove_volume(volume_id)
    return figures
