"""Prompts in voxel index space: boxes (2D on a slice, or 3D ROIs), include/exclude points and include/exclude
curves (scribbles: open curves; lassos: closed curves) per segment.

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


@dataclass(frozen=True)
class CurvePrompt:
    """A curve through control points at continuous voxel indices (i, j, k), in drawing order: a scribble (open)
    or a lasso (``closed``: its last point joins its first). ``include=False`` marks an exclude curve. ``source``
    (the file it came from) and ``label`` only serve messages."""

    points: tuple[Corner, ...]
    include: bool = True
    closed: bool = False
    source: Optional[str] = field(default=None, compare=False)
    label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", tuple(tuple(float(v) for v in p) for p in self.points))

    @property
    def kind(self) -> str:
        return "lasso" if self.closed else "scribble"

    def describe(self) -> str:
        sign = "include" if self.include else "exclude"
        return f"{sign} {self.kind}" + (f" '{self.label}'" if self.label else "")

    def array(self) -> np.ndarray:
        """The control points, shape (N, 3)."""
        return np.asarray(self.points, dtype=float).reshape(-1, 3)

    def slice_index(self, axis: int) -> Optional[int]:
        """The slice perpendicular to IJK ``axis`` the curve lies on (its points within one voxel along it, as a
        2D box), or None."""
        along = self.array()[:, axis]
        if along.max() - along.min() > 1.0:
            return None
        return int(round(float(along.mean())))

    def slice_axis(self) -> Optional[int]:
        """The IJK axis along which the curve is flat (K first, then J, then I), or None."""
        flat = [axis for axis in range(3) if self.slice_index(axis) is not None]
        return max(flat) if flat else None

    def polyline(self) -> np.ndarray:
        """The vertices in order, the first repeated at the end for a lasso, shape (M, 3)."""
        points = self.array()
        return np.vstack([points, points[:1]]) if self.closed else points

    def sample(self, spacing: Sequence[float] = (1.0, 1.0, 1.0), step_mm: float = 5.0,
               max_points: int = 12) -> list[PointPrompt]:
        """Points along the curve (straight between control points), evenly spaced about ``step_mm`` apart given
        the voxel ``spacing`` (i, j, k), at most ``max_points``; a scribble's ends are among them. They carry the
        curve's include/exclude."""
        line = self.polyline()
        lengths = np.linalg.norm(np.diff(line, axis=0) * np.asarray(spacing, dtype=float), axis=1)
        total = float(lengths.sum())
        along = np.concatenate([[0.0], np.cumsum(lengths)])
        if self.closed:
            count = int(np.clip(np.ceil(total / step_mm), 3, max_points))
            stops = np.arange(count) * total / count
        else:
            count = int(np.clip(np.ceil(total / step_mm) + 1, 2, max_points))
            stops = np.linspace(0.0, total, count)
        ijk = np.stack([np.interp(stops, along, line[:, axis]) for axis in range(3)], axis=1)
        return [PointPrompt(tuple(float(v) for v in p), include=self.include) for p in ijk]  # type: ignore[misc]


def curve_problem(points: Sequence[Sequence[float]], closed: bool) -> Optional[str]:
    """What makes these control points unusable as a curve (a scribble needs two distinct points; a lasso three
    that enclose an area), or None. Any coordinates: the check does not depend on their units."""
    array = np.asarray(points, dtype=float).reshape(-1, 3)
    distinct = len(np.unique(array, axis=0)) if len(array) else 0
    needed = 3 if closed else 2
    if distinct < needed:
        what = "closed curve (lasso)" if closed else "curve (scribble)"
        return f"a {what} needs at least {needed} distinct control points, this one has {distinct}"
    if closed:
        ring = np.vstack([array, array[:1]])
        area = 0.5 * np.linalg.norm(np.cross(ring[:-1] - array.mean(axis=0), ring[1:] - array.mean(axis=0)).sum(axis=0))
        perimeter = float(np.linalg.norm(np.diff(ring, axis=0), axis=1).sum())
        if area <= 1e-6 * perimeter ** 2:
            return "the closed curve (lasso) encloses no area: its control points lie on one line"
    return None


def rasterise_curve(curve: CurvePrompt, axis: int, shape_rc: tuple[int, int]) -> np.ndarray:
    """A curve drawn on a slice perpendicular to IJK ``axis`` (rows, cols as :func:`in_plane`), as a boolean mask
    of ``shape_rc``: a scribble's pixels along it (8-connected), a lasso filled (with its outline). The curve's
    coordinate along ``axis`` is ignored: check :meth:`CurvePrompt.slice_index` first."""
    rows, cols = in_plane(axis)
    vertices = curve.polyline()[:, [rows, cols]]
    mask = np.zeros(shape_rc, dtype=bool)
    for start, end in zip(vertices[:-1], vertices[1:]):
        steps = max(int(np.ceil(2 * np.abs(end - start).max())), 1)
        line = np.rint(start + np.linspace(0.0, 1.0, steps + 1)[:, None] * (end - start)).astype(int)
        inside = (line[:, 0] >= 0) & (line[:, 0] < shape_rc[0]) & (line[:, 1] >= 0) & (line[:, 1] < shape_rc[1])
        mask[line[inside, 0], line[inside, 1]] = True
    if curve.closed:
        mask |= _polygon_fill(vertices, shape_rc)
    return mask


def _polygon_fill(vertices: np.ndarray, shape_rc: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside a closed polygon (even-odd rule); ``vertices`` (M, 2) row, col, closed."""
    mask = np.zeros(shape_rc, dtype=bool)
    low = np.maximum(np.floor(vertices.min(axis=0)).astype(int), 0)
    high = np.minimum(np.ceil(vertices.max(axis=0)).astype(int), np.asarray(shape_rc) - 1)
    if np.any(high < low):
        return mask
    rr, cc = np.mgrid[low[0]:high[0] + 1, low[1]:high[1] + 1].astype(float)
    inside = np.zeros(rr.shape, dtype=bool)
    for (r0, c0), (r1, c1) in zip(vertices[:-1], vertices[1:]):
        if r0 == r1:
            continue
        crosses = (r0 > rr) != (r1 > rr)
        inside ^= crosses & (cc < c0 + (rr - r0) * (c1 - c0) / (r1 - r0))
    mask[low[0]:high[0] + 1, low[1]:high[1] + 1] = inside
    return mask


def in_plane(axis: int) -> tuple[int, int]:
    """The IJK axes along the rows and the columns of a slice perpendicular to ``axis`` (as the engines slice)."""
    others = [a for a in (0, 1, 2) if a != axis]
    return others[1], others[0]


@dataclass
class SegmentPrompts:
    """All prompts for one named segment (structure)."""

    name: str
    boxes: list[BoxPrompt] = field(default_factory=list)
    points: list[PointPrompt] = field(default_factory=list)
    color: Optional[tuple[float, float, float]] = None
    curves: list[CurvePrompt] = field(default_factory=list)

    @property
    def include_points(self) -> list[PointPrompt]:
        return [p for p in self.points if p.include]

    @property
    def exclude_points(self) -> list[PointPrompt]:
        return [p for p in self.points if not p.include]

    def is_empty(self) -> bool:
        """No box, include point or include curve to start from."""
        return not self.boxes and not self.include_points and not any(c.include for c in self.curves)

    def box_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The (lo, hi) IJK corners enclosing every box of the segment (it must have one)."""
        return np.min([b.lo for b in self.boxes], axis=0), np.max([b.hi for b in self.boxes], axis=0)


AXIS_NAMES = ("I", "J", "K")


def slicing_axis(prompts: SegmentPrompts, default: int) -> int:
    """The axis a 2-D model slices a segment along: ``default``, unless the segment has 2D boxes or curves and they
    all lie flat on another axis (several: K, then J, then I). A 3D box keeps ``default``."""
    flat: Optional[set[int]] = None
    for shape in [*prompts.boxes, *prompts.curves]:
        axes = {axis for axis in range(3) if _is_flat(shape, axis)}
        flat = axes if flat is None else flat & axes
    if not flat or default in flat:
        return default
    return max(flat)


def _is_flat(shape: BoxPrompt | CurvePrompt, axis: int) -> bool:
    if isinstance(shape, CurvePrompt):
        return shape.slice_index(axis) is not None
    return bool(shape.extent[axis] <= 1.0)


def off_slice_problem(curve: CurvePrompt, axis: int) -> Optional[str]:
    """Why a 2-D model cannot use this curve on slices perpendicular to IJK ``axis`` (it does not lie on one of
    them), or None."""
    if curve.slice_index(axis) is not None:
        return None
    along = curve.array()[:, axis]
    name = AXIS_NAMES[axis]
    return (f"{curve.describe()} does not lie on one slice across the {name} axis, which this 2-D model slices "
            f"along (its points span {name.lower()} = {along.min():.1f} to {along.max():.1f}); draw it in one "
            "slice view")
