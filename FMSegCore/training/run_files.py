"""The files of a training run folder: checkpoints written atomically, the log as JSON lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def save_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` to a partial file, then rename it: a run stopped mid-write keeps its last checkpoint."""
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def append_log(path: Path, record: dict) -> None:
    """One JSON line appended to the run's log."""
    with open(path, "a") as stream:
        stream.write(json.dumps(record) + "\n")
