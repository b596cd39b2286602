"""Prompts in voxel index space: boxes (2D on a slice, or 3D ROIs) and include/exclude points per segment.

Coordinates are continuous voxel indices (i, j, k) of the image being segmented: voxel centres sit on whole
numbers. Conversion from Slicer markups (LPS/RAS millimetres) happens in :mod:`FMSegCore.io.markups`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

Corner = tuple[float, float, float]
#: The corners of a box about its centre, in units of its half size along its own axes: the order every ROI's
#: 8 corners follow (that of itertools.product((0, 1), repeat=3) over the box's axes).
CORNER_SIGNS = np.array(list(itertools.product((-1.0, 1.0), repeat=3)))
#: The 12 edges of a box whose corners follow that order (corners differing along one axis).
BOX_EDGES = tuple((a, b) for a, b in itertools.combinations(range(8), 2) if bin(a ^ b).count("1") == 1)
#: Control-point descriptions (any case, surrounding spaces ignored) that make a markups point an exclude
#: (background) point; every other point includes. One rule for ``.mrk.json`` files and Slicer's nodes.
EXCLUDE_DESCRIPTIONS = ("exclude", "background", "negative")
#: The markups position status (Slicer's names) of a control point whose position is used: "preview" points are
#: still being placed, "undefined" and "missing" ones have no position.
PLACED_STATUS = "defined"


def excludes(description: Optional[str]) -> bool:
    """Whether a control point with this description is an exclude point."""
    return (description or "").strip().lower() in EXCLUDE_DESCRIPTIONS


def is_placed(status: str) -> bool:
    """Whether a control point with this position status (Slicer's name for it) is used as a prompt."""
    return status.strip().lower() == PLACED_STATUS


@dataclass(frozen=True)
class BoxPrompt:
    """Axis-aligned box between corners ``lo`` and ``hi`` (continuous i, j, k; inclusive voxel centres).

    A box whose extent along one axis is at most one voxel is a 2D box on that slice (``slice_axis``).
    An oriented ROI (not aligned with the voxel grid) also keeps its 8 ``corners``: ``lo``/``hi`` enclose it,
    and :meth:`section` gives its much tighter extent on each slice.
    """

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    corners: Optional[tuple[Corner, ...]] = None

    def __post_init__(self) -> None:
        lo = tuple(float(min(a, b)) for a, b in zip(self.lo, self.hi))
        hi = tuple(float(max(a, b)) for a, b in zip(self.lo, self.hi))
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    @property
    def extent(self) -> np.ndarray:
        """Size along i, j, k in voxels."""
        return np.asarray(self.hi) - np.asarray(self.lo)

    def slice_axis(self) -> Optional[int]:
        """The IJK axis (0, 1, 2) along which this box is flat (at most one voxel), or None for a 3D box."""
        flat = [axis for axis in range(3) if self.extent[axis] <= 1.0]
        if not flat:
            return None
        # Prefer K (axial) when several axes are flat, then J, then I.
        return max(flat)

    def section(self, axis: int, index: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """IJK bounds (lo, hi) of the part of the box within slice ``index`` (index +- 0.5 along ``axis``), or
        None when the box misses that slice."""
        if self.corners is None:
            first, last = self.voxel_range(axis)
            if not first <= index <= last:
                return None
            lo, hi = np.array(self.lo), np.array(self.hi)
            lo[axis] = hi[axis] = index
            return lo, hi
        corners = np.asarray(self.corners, dtype=float)
        bottom, top = index - 0.5, index + 0.5
        inside = [c for c in corners if bottom <= c[axis] <= top]
        for a, b in BOX_EDGES:
            start, end = corners[a], corners[b]
            delta = end[axis] - start[axis]
            if abs(delta) < 1e-12:
                continue
            for plane in (bottom, top):
                t = (plane - start[axis]) / delta
                if 0.0 <= t <= 1.0:
                    inside.append(start + t * (end - start))
        if not inside:
            return None
        points = np.asarray(inside)
        lo, hi = points.min(axis=0), points.max(axis=0)
        lo[axis] = hi[axis] = index
        return lo, hi

    def voxel_range(self, axis: int) -> tuple[int, int]:
        """First and last whole voxel whose centre lies in the box along ``axis`` (a flat box: its slice)."""
        tolerance = 1e-3
        return int(np.ceil(self.lo[axis] - tolerance)), int(np.floor(self.hi[axis] + tolerance))


def box_from_corners(corners: Sequence[Sequence[float]], tolerance: float = 1e-3) -> BoxPrompt:
    """The prompt of a ROI given by its 8 IJK corners (in the order of :data:`CORNER_SIGNS`): the enclosing box,
    which keeps the corners when the ROI is not aligned with the voxel axes."""
    points = np.asarray(corners, dtype=float).reshape(8, 3)
    lo, hi = points.min(axis=0), points.max(axis=0)
    edges = [points[b] - points[a] for a, b in BOX_EDGES]
    aligned = all(np.count_nonzero(np.abs(e) > tolerance * max(1.0, float(np.abs(e).max()))) <= 1 for e in edges)
    kept = None if aligned else tuple(tuple(float(v) for v in p) for p in points)
    return BoxPrompt(tuple(lo.tolist()), tuple(hi.tolist()), kept)


@dataclass(frozen=True)
class PointPrompt:
    """A click at continuous voxel index (i, j, k); ``include=False`` marks background (exclude point)."""

    ijk: tuple[float, float, float]
    include: bool = True

    def voxel(self) -> tuple[int, int, int]:
        """Nearest voxel index (i, j, k)."""
        return tuple(int(round(c)) for c in self.ijk)  # type: ignore[return-value]


@dataclass
class SegmentPrompts:
    """All prompts for one named segment (structure)."""

    name: str
    boxes: list[BoxPrompt] = field(default_factory=list)
    points: list[PointPrompt] = field(default_factory=list)
    color: Optional[tuple[float, float, float]] = None

    @property
    def include_points(self) -> list[PointPrompt]:
        return [p for p in self.points if p.include]

    @property
    def exclude_points(self) -> list[PointPrompt]:
        return [p for p in self.points if not p.include]

    def is_empty(self) -> bool:
        return not self.boxes and not self.include_points

    def box_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The (lo, hi) IJK corners enclosing every box of the segment (it must have one)."""
        return np.min([b.lo for b in self.boxes], axis=0), np.max([b.hi for b in self.boxes], axis=0)
