#!/usr/bin/env python3
"""Keep the file listings of ``FMSegSlicer/CMakeLists.txt`` in sync with the source tree.

The module's CMakeLists lists every script and resource explicitly (no GLOB at configure time). The lists
between ``# BEGIN generated: <block>`` and ``# END generated`` are generated from the tree:

- ``FMSegSlicer scripts``: ``FMSegSlicer/*.py`` and ``FMSegSlicer/FMSegSlicerLib/**/*.py``, relative to
  ``FMSegSlicer/``;
- ``FMSegSlicer resources``: every file under ``FMSegSlicer/Resources/``, relative to ``FMSegSlicer/``;
- ``FMSegCore scripts``: ``FMSegCore/**/*.py``, relative to the repository root;
- ``FMSegCore resources``: the files FMSegCore reads at run time, relative to the repository root:
  ``Resources/Models/*`` without the training logs (``*.log.jsonl``, which nothing reads) and
  ``Resources/SampleData/**``.

``__pycache__`` folders, compiled files, hidden files and unfinished downloads (``*.partial``) never count.

Usage::

    python Utilities/cmake_sources.py            # print the generated listings
    python Utilities/cmake_sources.py --check    # exit 1, with one line naming what is missing or extra
    python Utilities/cmake_sources.py --write    # rewrite the listings in place
    python Utilities/cmake_sources.py --root DIR --check   # another tree (tests use a temporary copy)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

#: The CMakeLists holding the generated blocks, relative to the repository root.
CMAKE_FILE = Path("FMSegSlicer") / "CMakeLists.txt"

BEGIN = "# BEGIN generated: "
END = "# END generated"

_IGNORED_DIRS = {"__pycache__"}
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".partial")
#: Resource files kept in the repository but not shipped: training logs, which no run-time code reads.
_NOT_SHIPPED_SUFFIXES = (".log.jsonl",)
#: Characters that a path may hold unquoted in a CMake argument list.
_PLAIN = re.compile(r"[A-Za-z0-9_./+-]+")


def _ignored(relative: Path) -> bool:
    return (any(part in _IGNORED_DIRS or part.startswith(".") for part in relative.parts)
            or relative.name.endswith(_IGNORED_SUFFIXES))


def _files(base: Path, folder: str, pattern: str, recursive: bool) -> list[Path]:
    """Files under ``base / folder`` matching ``pattern``, as paths relative to ``base``."""
    top = base / folder
    if not top.is_dir():
        return []
    found = top.rglob(pattern) if recursive else top.glob(pattern)
    relatives = (path.relative_to(base) for path in found if path.is_file())
    return [relative for relative in relatives if not _ignored(relative)]


def _module_scripts(root: Path) -> list[Path]:
    module = root / "FMSegSlicer"
    return _files(module, ".", "*.py", recursive=False) + _files(module, "FMSegSlicerLib", "*.py", recursive=True)


def _module_resources(root: Path) -> list[Path]:
    return _files(root / "FMSegSlicer", "Resources", "*", recursive=True)


def _core_scripts(root: Path) -> list[Path]:
    return _files(root, "FMSegCore", "*.py", recursive=True)


def _core_resources(root: Path) -> list[Path]:
    models = [path for path in _files(root, "Resources/Models", "*", recursive=False)
              if not path.name.endswith(_NOT_SHIPPED_SUFFIXES)]
    return models + _files(root, "Resources/SampleData", "*", recursive=True)


@dataclass(frozen=True)
class Block:
    """One generated listing: its marker name and how to list its files from the repository root."""

    name: str
    lister: Callable[[Path], list[Path]]

    def expected(self, root: Path) -> list[str]:
        return sorted({path.as_posix() for path in self.lister(root)})


BLOCKS = (
    Block("FMSegSlicer scripts", _module_scripts),
    Block("FMSegSlicer resources", _module_resources),
    Block("FMSegCore scripts", _core_scripts),
    Block("FMSegCore resources", _core_resources),
)


class ListingError(Exception):
    """The CMakeLists cannot be read or lacks a marker block."""


def _quote(path: str) -> str:
    if _PLAIN.fullmatch(path):
        return path
    return '"' + re.sub(r'([\\"$;])', r"\\\1", path) + '"'


def _unquote(item: str) -> str:
    if len(item) >= 2 and item[0] == item[-1] == '"':
        return re.sub(r"\\(.)", r"\1", item[1:-1])
    return item


@dataclass
class _Span:
    begin: int  # index of the BEGIN marker line
    end: int  # index of the END marker line
    indent: str


def _spans(lines: list[str]) -> dict[str, _Span]:
    spans: dict[str, _Span] = {}
    open_name: Optional[str] = None
    open_line = 0
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if open_name is not None:
                raise ListingError(f"line {number + 1}: block '{open_name}' is not closed before the next BEGIN")
            open_name, open_line = stripped[len(BEGIN):].strip(), number
        elif stripped == END:
            if open_name is None:
                raise ListingError(f"line {number + 1}: '{END}' without a BEGIN")
            indent = lines[open_line][: len(lines[open_line]) - len(lines[open_line].lstrip())]
            spans[open_name] = _Span(open_line, number, indent)
            open_name = None
    if open_name is not None:
        raise ListingError(f"block '{open_name}' has no '{END}' line")
    return spans


def _read(root: Path) -> tuple[list[str], dict[str, _Span]]:
    path = root / CMAKE_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except OSError as error:
        raise ListingError(f"cannot read {CMAKE_FILE}: {error.strerror or error}") from error
    spans = _spans(lines)
    absent = [block.name for block in BLOCKS if block.name not in spans]
    if absent:
        raise ListingError("no generated block " + ", ".join(f"'{name}'" for name in absent))
    unknown = sorted(set(spans) - {block.name for block in BLOCKS})
    if unknown:
        raise ListingError("unknown generated block " + ", ".join(f"'{name}'" for name in unknown))
    return lines, spans


def listed(root: Path) -> dict[str, list[str]]:
    """The paths each generated block of ``root``'s CMakeLists lists now."""
    lines, spans = _read(root)
    result = {}
    for block in BLOCKS:
        span = spans[block.name]
        items = []
        for line in lines[span.begin + 1: span.end]:
            text = line.strip()
            if text and not text.startswith("#"):
                items.append(_unquote(text))
        result[block.name] = items
    return result


def expected(root: Path) -> dict[str, list[str]]:
    """The paths each generated block should list, from the files present under ``root``."""
    return {block.name: block.expected(root) for block in BLOCKS}


def differences(root: Path) -> list[str]:
    """Descriptions of what each block misses or lists in excess; empty when the CMakeLists is in sync."""
    now, wanted = listed(root), expected(root)
    problems = []
    for block in BLOCKS:
        have, want = set(now[block.name]), set(wanted[block.name])
        missing, extra = sorted(want - have), sorted(have - want)
        duplicated = sorted({item for item in now[block.name] if now[block.name].count(item) > 1})
        if missing:
            problems.append(f"{block.name}: missing {_names(missing)}")
        if extra:
            problems.append(f"{block.name}: listed but absent {_names(extra)}")
        if duplicated:
            problems.append(f"{block.name}: listed twice {_names(duplicated)}")
    return problems


def _names(paths: list[str], limit: int = 10) -> str:
    shown = ", ".join(paths[:limit])
    return shown if len(paths) <= limit else f"{shown} and {len(paths) - limit} more"


def render(paths: Iterable[str], indent: str) -> list[str]:
    return [f"{indent}{_quote(path)}\n" for path in paths]


def write(root: Path) -> bool:
    """Rewrite the generated blocks of ``root``'s CMakeLists; whether the file changed."""
    lines, spans = _read(root)
    wanted = expected(root)
    # Replace from the last block up so that earlier line indexes stay valid.
    for block in sorted(BLOCKS, key=lambda item: spans[item.name].begin, reverse=True):
        span = spans[block.name]
        lines[span.begin + 1: span.end] = render(wanted[block.name], span.indent)
    text = "".join(lines)
    path = root / CMAKE_FILE
    if text == path.read_text(encoding="utf-8"):
        return False
    path.write_text(text, encoding="utf-8")
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when the listings differ from the tree")
    mode.add_argument("--write", action="store_true", help="rewrite the listings from the tree")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="repository root (default: the checkout holding this script)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        if args.check:
            problems = differences(root)
            if problems:
                print(f"{CMAKE_FILE} is out of date ({'; '.join(problems)}): "
                      f"run python Utilities/cmake_sources.py --write")
                return 1
            print(f"{CMAKE_FILE} lists every script and resource")
            return 0
        if args.write:
            changed = write(root)
            print(f"{CMAKE_FILE} {'rewritten' if changed else 'already up to date'}")
            return 0
    except ListingError as error:
        print(f"{CMAKE_FILE}: {error}")
        return 1
    for name, paths in expected(root).items():
        print(f"{BEGIN}{name}")
        print("".join(render(paths, "")), end="")
        print(END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
