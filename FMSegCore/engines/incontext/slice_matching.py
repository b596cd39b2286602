"""Which support slices serve which query slices, for 2-D in-context models applied to volumes.

Slices are matched by position along the chosen axis: by relative position (0 at the first slice, 1 at the
last) when support and query are the same scan or share its extent, or in millimetres when supports were
aligned to the query and resampled onto its grid (:mod:`.anatomical`). A query slice at position ``r`` draws
its supports from the support volumes whose labelled extent of the structure (widened by ``tolerance``, in the
same unit) covers ``r``, nearest slices first; elsewhere it stays background. Support examples given as single 2-D slices have no position and match every
query slice. Consecutive query slices are grouped into blocks that share one support set, so the model runs them
in one batch and computes the support part of its first layer once per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class SupportSlice:
    """One labelled slice: which example, which slice (-1 for a 2-D example), where along the axis (or None)."""

    example: int
    index: int
    position: Optional[float]
    area: float


@dataclass
class QueryBlock:
    """Consecutive query slices and the support slices they may use."""

    slices: list[int]
    pool: list[SupportSlice]
    centre: float


def relative_position(index: int, count: int) -> float:
    return index / max(1, count - 1)


def slice_position(index: int, count: int, spacing_mm: Optional[float] = None) -> float:
    """Where slice ``index`` of ``count`` lies: millimetres along the axis when ``spacing_mm`` is given (slices
    on a common physical grid), else its relative position."""
    return index * spacing_mm if spacing_mm else relative_position(index, count)


def labelled_extents(slices: list[SupportSlice]) -> dict[int, tuple[float, float]]:
    """Per example, the positions of its first and last labelled slice (position-free slices are left out)."""
    extents: dict[int, tuple[float, float]] = {}
    for s in slices:
        if s.position is not None:
            low, high = extents.get(s.example, (s.position, s.position))
            extents[s.example] = (min(low, s.position), max(high, s.position))
    return extents


def candidates_near(slices: list[SupportSlice], position: float, tolerance: float,
                    extents: Optional[dict[int, tuple[float, float]]] = None) -> list[SupportSlice]:
    """The support slices a query slice at ``position`` may use: every position-free slice, and all slices of
    each example whose labelled extent (first to last labelled slice, widened by ``tolerance``) covers it. An
    example labelled only on every few slices therefore still serves the unlabelled slices in between.
    ``extents``: :func:`labelled_extents` of ``slices``, when the caller has it already."""
    extents = labelled_extents(slices) if extents is None else extents
    covering = {example for example, (low, high) in extents.items()
                if low - tolerance - 1e-9 <= position <= high + tolerance + 1e-9}
    return [s for s in slices if s.position is None or s.example in covering]


def query_blocks(slices: list[SupportSlice], query_count: int, tolerance: float, block_size: int,
                 spacing_mm: Optional[float] = None) -> list[QueryBlock]:
    """Group the query slices that have candidates into blocks of up to ``block_size`` consecutive slices
    (positions in millimetres when ``spacing_mm`` is given, see :func:`slice_position`)."""
    extents = labelled_extents(slices)
    positions = [slice_position(q, query_count, spacing_mm) for q in range(query_count)]
    candidates = [candidates_near(slices, positions[q], tolerance, extents) for q in range(query_count)]
    blocks: list[QueryBlock] = []
    current: list[int] = []

    def close() -> None:
        if current:
            centre = float(np.mean([positions[q] for q in current]))
            pool = {s: None for q in current for s in candidates[q]}
            blocks.append(QueryBlock(list(current), list(pool), centre))
            current.clear()

    for query in range(query_count):
        if candidates[query]:
            if current and (query != current[-1] + 1 or len(current) >= block_size):
                close()
            current.append(query)
        else:
            close()
    close()
    return blocks


def choose_supports(pool: list[SupportSlice], centre: Optional[float], size: int, member: int,
                    rng: np.random.Generator) -> list[SupportSlice]:
    """Member 0: the ``size`` slices nearest ``centre`` (largest first when positions tie or are unknown).

    Other members: a random subset of the ``max(2 * size, size + 2)`` nearest, so ensemble members differ but
    stay close to the query; a pool no larger than ``size`` is resampled with replacement.
    """
    if not pool:
        return []

    def distance(s: SupportSlice) -> float:
        return 0.0 if s.position is None or centre is None else abs(s.position - centre)

    ranked = sorted(pool, key=lambda s: (distance(s), -s.area, s.example, s.index))
    if member == 0:
        return ranked[:size]
    nearest = ranked[:max(2 * size, size + 2)]
    if len(nearest) <= size:
        picks = rng.choice(len(nearest), size=len(nearest), replace=True)
    else:
        picks = rng.choice(len(nearest), size=size, replace=False)
    return [nearest[int(p)] for p in sorted(picks)]
