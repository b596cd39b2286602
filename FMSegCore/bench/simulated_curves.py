"""Scribbles and lassos drawn from a reference mask, as a person would draw them on one slice (for benchmarks).

- scribble: a stroke along the medial axis of the structure's section (the path through its interior that stays
  farthest from the border, between the two ends of that interior), sampled at a few control points;
- lasso: a loop around the section, its convex hull two pixels out.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import ConvexHull

from FMSegCore.prompts import CurvePrompt

_STEPS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _section(mask2d: np.ndarray, row: int, col: int) -> np.ndarray:
    """The connected part of a slice mask holding (row, col) (else its largest part)."""
    parts, count = ndimage.label(mask2d)
    if parts[row, col]:
        return parts == parts[row, col]
    sizes = ndimage.sum(mask2d, parts, range(1, count + 1))
    return parts == 1 + int(np.argmax(sizes))


def _graph(pixels: np.ndarray, weight: np.ndarray, shape: tuple[int, int]):
    """The 8-connected graph of ``pixels`` (N, 2); an edge costs its length times ``weight`` at its end."""
    index = np.full(shape, -1)
    index[pixels[:, 0], pixels[:, 1]] = np.arange(len(pixels))
    rows, cols, costs = [], [], []
    for dr, dc in _STEPS:
        target = pixels + (dr, dc)
        ok = (target[:, 0] >= 0) & (target[:, 0] < shape[0]) & (target[:, 1] >= 0) & (target[:, 1] < shape[1])
        ok[ok] = index[target[ok, 0], target[ok, 1]] >= 0
        ends = index[target[ok, 0], target[ok, 1]]
        rows.append(np.flatnonzero(ok))
        cols.append(ends)
        costs.append(np.hypot(dr, dc) * weight[ends])
    n = len(pixels)
    return coo_matrix((np.concatenate(costs), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)).tocsr()


def medial_stroke(mask2d: np.ndarray, row: int, col: int, control_points: int = 8) -> np.ndarray:
    """Control points (rows, cols), shape (M, 2), of a stroke along the medial axis of the section holding
    (row, col): between the two far ends of its interior (pixels at least a quarter of its largest depth from
    the border), along the path that keeps farthest from the border."""
    section = _section(mask2d, row, col)
    depth = ndimage.distance_transform_edt(np.pad(section, 1))[1:-1, 1:-1]
    core = section & (depth >= max(1.0, 0.25 * float(depth.max())))
    core = _section(core, *np.unravel_index(np.argmax(depth), depth.shape))
    pixels = np.argwhere(core)
    start = int(np.argmax(depth[pixels[:, 0], pixels[:, 1]]))
    if len(pixels) < 3:
        return pixels[[start, start]].astype(float)
    plain = _graph(pixels, np.ones(len(pixels)), core.shape)
    first = int(np.argmax(np.where(np.isfinite(d := dijkstra(plain, indices=start)), d, -1)))
    second = int(np.argmax(np.where(np.isfinite(d := dijkstra(plain, indices=first)), d, -1)))
    medial = _graph(pixels, 1.0 / depth[pixels[:, 0], pixels[:, 1]], core.shape)
    _, previous = dijkstra(medial, indices=first, return_predecessors=True)
    path = [second]
    while path[-1] != first and previous[path[-1]] >= 0:
        path.append(int(previous[path[-1]]))
    line = pixels[path[::-1]].astype(float)
    along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(line, axis=0), axis=1))])
    stops = np.linspace(0.0, along[-1], min(control_points, len(line)))
    return np.stack([np.interp(stops, along, line[:, 0]), np.interp(stops, along, line[:, 1])], axis=1)


def hull_loop(mask2d: np.ndarray, row: int, col: int, margin: int = 2) -> np.ndarray:
    """Vertices (rows, cols), shape (M, 2), of a loop around the section holding (row, col): the convex hull of
    its pixels ``margin`` pixels out."""
    section = ndimage.binary_dilation(_section(mask2d, row, col), iterations=margin)
    pixels = np.argwhere(section).astype(float)
    corners = (pixels[:, None, :] + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])).reshape(-1, 2)
    return corners[ConvexHull(corners).vertices]


def scribble_on_slice(reference: np.ndarray, k: int, j: int, i: int, include: bool = True,
                      closed: bool = False, source: Optional[str] = None) -> CurvePrompt:
    """A scribble (or, ``closed``, a lasso) on axial slice ``k`` of a KJI reference mask, around the section
    holding voxel (i, j, k), in continuous IJK."""
    rc = hull_loop(reference[k], j, i) if closed else medial_stroke(reference[k], j, i)
    return CurvePrompt(tuple((float(c), float(r), float(k)) for r, c in rc), include=include, closed=closed,
                       source=source)
