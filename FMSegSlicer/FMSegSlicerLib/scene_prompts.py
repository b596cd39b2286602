"""Prompts from Markups nodes: include/exclude point lists and ROIs (2D when at most a voxel thick), as the
continuous voxel indices the worker expects. No Qt; MRML only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from FMSegSlicerLib.scene_geometry import from_vtk_matrix, world_to_ijk

Box = tuple[tuple[float, float, float], tuple[float, float, float]]
Point = tuple[tuple[float, float, float], bool]
EXCLUDE_WORDS = ("exclude", "background", "negative")


def roi_box(roi_node: Any, volume_node: Any) -> Box:
    """The voxel-index box enclosing a (possibly rotated) ROI: its 8 corners' IJK bounds."""
    half = np.asarray(roi_node.GetSize(), dtype=float) / 2.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    corners = np.c_[signs * half, np.ones(8)] @ from_vtk_matrix(roi_node.GetObjectToWorldMatrix()).T
    ijk = world_to_ijk(volume_node, corners[:, :3])
    lo, hi = ijk.min(axis=0), ijk.max(axis=0)
    return tuple(float(v) for v in lo), tuple(float(v) for v in hi)  # type: ignore[return-value]


def point_prompts(points_node: Optional[Any], volume_node: Any, include: bool = True) -> list[Point]:
    """The defined control points of a point list; a point whose description says 'exclude' excludes."""
    if points_node is None:
        return []
    prompts: list[Point] = []
    for index in range(points_node.GetNumberOfControlPoints()):
        if not points_node.GetNthControlPointPositionVisibility(index) and \
                points_node.GetNthControlPointPositionStatus(index) != points_node.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        points_node.GetNthControlPointPositionWorld(index, position)
        description = (points_node.GetNthControlPointDescription(index) or "").strip().lower()
        keep = include and description not in EXCLUDE_WORDS
        ijk = world_to_ijk(volume_node, np.asarray([position]))[0]
        prompts.append((tuple(float(v) for v in ijk), keep))  # type: ignore[arg-type]
    return prompts


def collect_prompts(volume_node: Any, include_points: Optional[Any] = None, exclude_points: Optional[Any] = None,
                    rois: Sequence[Any] = ()) -> tuple[list[Box], list[Point]]:
    """Boxes and points of one segment from its markups nodes."""
    boxes = [roi_box(roi, volume_node) for roi in rois if roi is not None]
    points = point_prompts(include_points, volume_node, True) + point_prompts(exclude_points, volume_node, False)
    return boxes, points
