"""One case of a cohort run, in three steps that both engines share: read the scan, segment it, write the
result (the label map on the scan's grid, atomically, and the overlay PNG) and the case's row of the results
table. Any problem with a case becomes its one-line error in that row: the run goes on with the others."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from FMSegCore.batch.cases import Case
from FMSegCore.batch.methods import CaseSegmentation, Segmenter
from FMSegCore.batch.results import DONE, FAILED, Row, volume_column
from FMSegCore.errors import FMSegError
from FMSegCore.io.volume import Volume

#: The sub-folder of the output folder that holds the overlay PNGs.
QC_FOLDER = "qc"


@dataclass(frozen=True)
class CaseJob:
    """What a worker needs for one case: the case, where its results go, and the keys of its row."""

    case: Case
    folder: str
    output_name: str
    input_sha256: str
    input_size: int
    input_mtime_ns: int
    task_sha256: str
    overlays: bool = True
    started: float = field(default=0.0, compare=False)

    def row(self, **values: Any) -> Row:
        return {"case": self.case.case_id, "image": self.case.image, "input_sha256": self.input_sha256,
                "input_size": self.input_size, "input_mtime_ns": self.input_mtime_ns,
                "task_sha256": self.task_sha256, "worker": worker_name(), **values}


def worker_name() -> str:
    """This process on this host (what the results table's ``worker`` column says)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def one_line(error: BaseException, source: str) -> str:
    """A failure as one line naming the file: FMSeg's own errors already do; others get the image's name."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, FMSegError):
        return text
    return f"{source}: {type(error).__name__}: {text}"


def failed(job: CaseJob, error: BaseException, seconds: float = 0.0) -> Row:
    return job.row(status=FAILED, error=one_line(error, job.case.image), seconds=round(seconds, 2))


def read_case(job: CaseJob) -> Volume:
    from FMSegCore.io.volume import read_volume

    return read_volume(job.case.image)


def write_case(job: CaseJob, image: Volume, result: CaseSegmentation, seconds: float) -> Row:
    """Write the label map (and overlay) of one case; its row with the volume (ml) of every structure and the
    mean uncertainty inside the segmented voxels (the whole scan where nothing was segmented)."""
    from FMSegCore.io.labelmap import write_labelmap

    write_labelmap(np.asarray(result.labels), image, Path(job.folder) / job.output_name, list(result.segments),
                   overwrite=True)
    return done_row(job, image, result, seconds)


def done_row(job: CaseJob, image: Volume, result: CaseSegmentation, seconds: float) -> Row:
    """The row of a case whose result is written already (``job.output_name``, by :func:`write_case` or by
    another writer, such as Slicer's storage node in ``Examples/slicer_batch_cohort.py``): the volume (ml) of
    every structure of ``result`` (its label map on ``image``'s grid), the mean uncertainty inside the segmented
    voxels (the whole scan where nothing was segmented) and the overlay PNG (drawn here when ``job.overlays``)."""
    labels = np.asarray(result.labels)
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=max((s.value for s in result.segments),
                                                                          default=0) + 1)
    values: Row = {volume_column(s.name): round(float(counts[s.value]) * voxel_ml, 3) for s in result.segments}
    uncertainty = None
    if result.uncertainty is not None:
        inside = labels > 0
        spread = np.asarray(result.uncertainty, dtype=np.float64)
        uncertainty = float(spread[inside].mean() if inside.any() else spread.mean())
    overlay = _write_overlay(job, image, labels, result) if job.overlays else ""
    return job.row(status=DONE, error="", output=job.output_name, overlay=overlay,
                   seconds=round(seconds, 2), mean_uncertainty=uncertainty, **values)


def _write_overlay(job: CaseJob, image: Volume, labels: np.ndarray, result: CaseSegmentation) -> str:
    from FMSegCore.io.overlay import write_overlay_png

    name = f"{QC_FOLDER}/{job.case.case_id}.png"
    (Path(job.folder) / QC_FOLDER).mkdir(exist_ok=True)
    write_overlay_png(image, labels, {s.value: s.name for s in result.segments}, Path(job.folder) / name,
                      colors={s.value: s.color for s in result.segments}, slices=3)
    return name


def run_case(segmenter: Segmenter, job: CaseJob) -> Row:
    """Read, segment and write one case; its row (``failed`` with the one-line error on any problem)."""
    began = time.perf_counter()
    try:
        image = read_case(job)
        result = segmenter.segment(image, job.case)
        return write_case(job, image, result, time.perf_counter() - began)
    except Exception as error:  # noqa: BLE001 - one bad scan must not stop the cohort: it is recorded
        return failed(job, error, time.perf_counter() - began)


def check_overlays_possible() -> Optional[str]:
    """Why overlay PNGs cannot be drawn here (matplotlib missing), or None."""
    try:
        from FMSegCore.io.overlay import require_matplotlib

        require_matplotlib()
    except FMSegError as error:
        return str(error)
    return None
