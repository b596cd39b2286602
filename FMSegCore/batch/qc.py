"""Quality-control flags of a cohort: a structure missing from a case, or a volume far from the cohort's median.

The median rule compares each structure's volume with the median over the cohort's done cases that have it; a
volume below the median divided by :data:`VOLUME_FACTOR`, or above it times that factor, is flagged. It needs
:data:`MIN_CASES` cases with the structure (with fewer, the median says little) and is a screen, not a verdict:
anatomy varies (a resected kidney, a big liver), and so does the field of view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import median

from FMSegCore.batch.results import DONE, Row, structures_of, volumes

#: How far (as a ratio) from the cohort's median a structure's volume must be to be flagged.
VOLUME_FACTOR = 2.0
#: The fewest cases with a structure for its median to be used.
MIN_CASES = 3


def cohort_medians(rows: Sequence[Row]) -> dict[str, float]:
    """Median volume (ml) of each structure over the done cases where it is present (non-zero)."""
    done = [row for row in rows if row.get("status") == DONE]
    medians = {}
    for name in structures_of(done):
        present = [v for row in done if (v := volumes(row).get(name, 0.0)) > 0]
        if len(present) >= MIN_CASES:
            medians[name] = median(present)
    return medians


def case_flags(row: Row, medians: dict[str, float]) -> list[str]:
    """What is odd about one done case, among the structures it was segmented for: ``missing <structure>`` and
    ``<structure> <ratio>x median``."""
    if row.get("status") != DONE:
        return []
    flags = []
    for name, volume in volumes(row).items():
        if volume <= 0:
            flags.append(f"missing {name}")
        elif name in medians and abs(math.log(volume / medians[name])) > math.log(VOLUME_FACTOR):
            flags.append(f"{name} {volume / medians[name]:.2g}x median")
    return flags


def flag_rows(rows: Sequence[Row]) -> dict[str, list[str]]:
    """The flags of every case (by case name), from the cohort's medians; written into each row's ``flags``."""
    medians = cohort_medians(rows)
    flags = {}
    for row in rows:
        flags[row["case"]] = case_flags(row, medians)
        row["flags"] = "; ".join(flags[row["case"]])
    return flags
