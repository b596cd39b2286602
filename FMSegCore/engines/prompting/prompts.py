"""Prompts in voxel index space: boxes (2D on a slice, or 3D ROIs) and include/exclude points per segment.

Coordinates are continuous voxel indices (i, j, k) of the image being segmented: voxel centres sit on whole
numbers. Conversion from Slicer markups (LPS/RAS millimetres) happens in :mod:`FMSegCore.io.markups`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class BoxPrompt:
    """Axis-aligned box between corners ``lo`` and ``hi`` (continuous i, j, k; inclusive voxel centres).

    A box whose extent along one axis is at most one voxel is a 2D box on that slice (``slice_axis``).
    """

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

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

    def voxel_range(self, axis: int) -> tuple[int, int]:
        """First and last whole voxel whose centre lies in the box along ``axis`` (a flat box: its slice)."""
        tolerance = 1e-3
        return int(np.ceil(self.lo[axis] - tolerance)), int(np.floor(self.hi[axis] + tolerance))


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
