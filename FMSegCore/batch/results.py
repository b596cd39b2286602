"""The results table of a cohort run (``results.csv`` in the output folder), keyed by case.

Each row says what became of one case: ``done`` or ``failed`` (with its one-line error), the input's sha256
(with the size and modification time it was computed for, so a rerun hashes only what changed), the task's
sha256, the output, the seconds it took, the mean uncertainty where the method gives one, the volume (ml) of
every structure and the quality-control flags. A rerun skips a case whose row is ``done`` for the same input
and task and whose output is still there; everything else runs again. The table is rewritten atomically after
every case, so a crash loses at most the cases in flight.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from FMSegCore.batch.cases import Case
from FMSegCore.errors import InputError
from FMSegCore.io.atomic import atomic_output

RESULTS_FILE = "results.csv"
DONE, FAILED = "done", "failed"
#: The fixed columns, in order; one ``<structure>_ml`` column per structure follows them.
COLUMNS = ("case", "status", "error", "flags", "output", "overlay", "seconds", "mean_uncertainty", "image",
           "input_sha256", "input_size", "input_mtime_ns", "task_sha256", "worker")
VOLUME_SUFFIX = "_ml"

Row = dict[str, Any]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, or of a folder's files (names and contents, in name order: a DICOM series)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def input_stamp(path: Path) -> tuple[int, int]:
    """Size and modification time (ns) of a file, or of a folder's files together: what a cached hash is for."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    stats = [file.stat() for file in files]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def input_hash(case: Case, previous: Optional[Row]) -> tuple[str, int, int]:
    """The case's input sha256 (its image, and the files of its per-case columns that exist), reused from the
    previous row when the image's size and modification time are unchanged; with that size and time."""
    image = Path(case.image)
    if not image.exists():
        return "", 0, 0
    size, mtime = input_stamp(image)
    extra = sorted(p for value in case.columns.values() for p in value.split(";") if p and Path(p).is_file())
    if extra:
        size += sum(Path(p).stat().st_size for p in extra)
        mtime = max([mtime, *(Path(p).stat().st_mtime_ns for p in extra)])
    if previous and str(previous.get("input_size")) == str(size) and str(previous.get("input_mtime_ns")) == str(mtime):
        return str(previous.get("input_sha256", "")), size, mtime
    digest = file_sha256(image)
    if extra:
        digest = hashlib.sha256((digest + "".join(file_sha256(Path(p)) for p in extra)).encode()).hexdigest()
    return digest, size, mtime


def read_results(path: Path) -> dict[str, Row]:
    """The rows of a results table by case (none when the file does not exist)."""
    if not path.exists():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(path, f"cannot read the results table ({error})") from None
    if rows and "case" not in rows[0]:
        raise InputError(path, "is not an FMSeg results table (no 'case' column)")
    return {row["case"]: row for row in rows}


def volume_column(structure: str) -> str:
    return f"{structure}{VOLUME_SUFFIX}"


def structures_of(rows: Iterable[Row]) -> list[str]:
    """The structures with a volume column in ``rows``, in the order they first appear."""
    names: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key.endswith(VOLUME_SUFFIX) and key not in COLUMNS:
                names.setdefault(key[:-len(VOLUME_SUFFIX)], None)
    return list(names)


def write_results(path: Path, rows: Sequence[Row]) -> None:
    """Write the table atomically: the fixed columns, then one volume column per structure."""
    columns = [*COLUMNS, *(volume_column(name) for name in structures_of(rows))]
    with atomic_output(path) as temporary:
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _cell(row.get(key)) for key in columns})


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def is_done(row: Optional[Row], input_sha256: str, task_sha256: str, folder: Path) -> bool:
    """Whether a previous row covers this case: done, same input and task, its output still there."""
    return bool(row and row.get("status") == DONE and input_sha256 and row.get("input_sha256") == input_sha256
                and row.get("task_sha256") == task_sha256 and row.get("output")
                and (folder / str(row["output"])).exists())


def volumes(row: Row) -> dict[str, float]:
    """The structure volumes (ml) of a row (empty cells left out)."""
    found = {}
    for name in structures_of([row]):
        value = row.get(volume_column(name))
        if value not in (None, ""):
            found[name] = float(value)
    return found
