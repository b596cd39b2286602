"""The JSON file a benchmark command writes: its ``--output`` option (default under ``Resources/Benchmarks/``),
checked before the run, and written atomically after it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from FMSegCore.errors import InputError
from FMSegCore.zoo.cache import resources_dir


def add_output_option(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument("--output", type=Path, default=resources_dir() / "Benchmarks" / default_name,
                        help="the JSON file written (atomically)")


def check_output_folder(path: Path) -> None:
    if not path.parent.is_dir():
        raise InputError(path, f"output folder {path.parent} does not exist")


def write_figures(path: Path, figures: Any) -> None:
    """Write ``figures`` as indented JSON, atomically, and say where."""
    from FMSegCore.io.atomic import atomic_output

    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"Wrote {path}")
