"""The cases of a cohort: the scans of a folder, or the rows of a CSV with an ``image`` column.

A folder gives one case per volume file (NIfTI, NRRD, MetaImage) and per sub-folder (a DICOM series), named after
the file without its ending; a CSV gives one case per row (``case`` names it, else the image's name), with the
other columns kept (a per-case prompts file, say). Relative paths in a CSV are read from the CSV's folder. Every
problem (no ``image`` column, an empty cell, two cases of one name, an empty cohort) is one line naming the file.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from FMSegCore.errors import InputError
from FMSegCore.io.atomic import file_ending
from FMSegCore.io.volume import VOLUME_SUFFIXES, PathLike

#: The column of a CSV that holds each case's image.
IMAGE_COLUMN = "image"
#: The optional column of a CSV that names each case.
CASE_COLUMN = "case"
#: Files in a cohort folder that are not scans (results, label files, hidden and unfinished files).
_NOT_SCANS = (".seg.nrrd", ".labels.json", ".csv", ".md", ".txt", ".json", ".partial")


@dataclass(frozen=True)
class Case:
    """One scan of the cohort: its name (the results' key), its image path, and the CSV's other columns."""

    case_id: str
    image: str
    columns: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def column_paths(self, column: str) -> list[str]:
        """The files named in ``column`` (several separated by ``;``), relative to the CSV's folder already."""
        return [part for part in self.columns.get(column, "").split(";") if part]


def case_name(path: Path) -> str:
    """A case's name from its file or folder name: without the ending, characters unsafe in file names as ``_``."""
    ending = file_ending(path) if path.is_file() else ""
    stem = path.name[:len(path.name) - len(ending)] if ending else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "case"


def _is_scan(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith(".") or any(name.endswith(ending) for ending in _NOT_SCANS):
        return False
    if path.is_dir():
        return any(child.is_file() and not child.name.startswith(".") for child in path.iterdir())
    return any(name.endswith(suffix) for suffix in VOLUME_SUFFIXES)


def cases_in_folder(folder: Path) -> list[Case]:
    """One case per volume file and per DICOM sub-folder of ``folder``, sorted by name."""
    return [Case(case_name(path), str(path)) for path in sorted(folder.iterdir()) if _is_scan(path)]


def cases_in_csv(path: Path, required: Sequence[str] = ()) -> list[Case]:
    """One case per row of the CSV ``path``; ``required``: columns besides ``image`` that must exist."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in reader.fieldnames or []]
            rows = [{(key or "").strip(): (value or "").strip() for key, value in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(path, f"cannot read the CSV ({error})") from None
    for column in (IMAGE_COLUMN, *required):
        if column not in columns:
            raise InputError(path, f"no '{column}' column (columns: {', '.join(columns) or 'none'})")
    cases = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        if not row.get(IMAGE_COLUMN):
            raise InputError(path, f"line {number}: the '{IMAGE_COLUMN}' cell is empty")
        for column in required:
            if not row.get(column):
                raise InputError(path, f"line {number}: the '{column}' cell is empty")
        image = path.parent / row[IMAGE_COLUMN]
        others = {key: _resolved(path.parent, value) if key in required else value
                  for key, value in row.items() if key not in (IMAGE_COLUMN, CASE_COLUMN)}
        cases.append(Case(row.get(CASE_COLUMN) or case_name(image), str(image), others))
    return cases


def _resolved(folder: Path, value: str) -> str:
    return ";".join(str(folder / part.strip()) for part in value.split(";") if part.strip())


def read_cases(inputs: PathLike, required: Sequence[str] = ()) -> list[Case]:
    """The cases of a folder or a CSV (``required``: columns a CSV must have; a folder has none, so it is
    refused when any is required). Names are unique; the cohort is not empty."""
    path = Path(inputs)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        if required:
            raise InputError(path, f"a folder has no '{required[0]}' column: give a CSV with '{IMAGE_COLUMN}' and "
                                   f"'{required[0]}' columns")
        cases = cases_in_folder(path)
        what = "no scans (NIfTI, NRRD, MetaImage files or DICOM sub-folders)"
    else:
        if path.suffix.lower() != ".csv":
            raise InputError(path, "give a folder of scans or a .csv file with an 'image' column")
        cases = cases_in_csv(path, required)
        what = "no rows"
    if not cases:
        raise InputError(path, what)
    check_unique(cases, path)
    return cases


def check_unique(cases: Sequence[Case], source: Optional[PathLike]) -> None:
    """Two cases of one name would write one result: refused, naming both images."""
    seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in seen:
            raise InputError(source, f"two cases are named '{case.case_id}' ({seen[case.case_id].image} and "
                                     f"{case.image}): name them in a '{CASE_COLUMN}' column")
        seen[case.case_id] = case
