"""Prompts from Markups nodes: include/exclude point lists and ROIs (2D when at most a voxel thick), as the
continuous voxel indices the worker expects. No Qt; MRML only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from FMSegCore.prompts import CORNER_SIGNS, box_from_corners, excludes, is_placed
from FMSegSlicerLib.scene_geometry import from_vtk_matrix, world_to_ijk

Box = tuple[tuple[float, float, float], tuple[float, float, float], Optional[tuple]]  # lo, hi, corners
Point = tuple[tuple[float, float, float], bool]


def roi_box(roi_node: Any, volume_node: Any) -> Box:
    """A ROI as a voxel-index box: (lo, hi) enclosing its 8 corners, and the corners themselves when the ROI is
    not aligned with the volume's grid (the worker then uses its extent on each slice)."""
    half = np.asarray(roi_node.GetSize(), dtype=float) / 2.0
    corners = np.c_[CORNER_SIGNS * half, np.ones(8)] @ from_vtk_matrix(roi_node.GetObjectToWorldMatrix()).T
    box = box_from_corners(world_to_ijk(volume_node, corners[:, :3]))
    return box.lo, box.hi, box.corners


def point_prompts(points_node: Optional[Any], volume_node: Any, include: bool = True) -> list[Point]:
    """The placed control points of a point list (``prompts.is_placed``); in an include list, a point whose
    description says exclude (``prompts.excludes``) excludes: the rule ``fmseg prompt`` applies to files."""
    if points_node is None:
        return []
    prompts: list[Point] = []
    for index in range(points_node.GetNumberOfControlPoints()):
        status = points_node.GetNthControlPointPositionStatus(index)
        if not is_placed(points_node.GetPositionStatusAsString(status)):
            continue
        position = [0.0, 0.0, 0.0]
        points_node.GetNthControlPointPositionWorld(index, position)
        keep = include and not excludes(points_node.GetNthControlPointDescription(index))
        ijk = world_to_ijk(volume_node, np.asarray([position]))[0]
        prompts.append((tuple(float(v) for v in ijk), keep))  # type: ignore[arg-type]
    return prompts


def collect_prompts(volume_node: Any, include_points: Optional[Any] = None, exclude_points: Optional[Any] = None,
                    rois: Sequence[Any] = ()) -> tuple[list[Box], list[Point]]:
    """Boxes and points of one segment from its markups nodes."""
    boxes = [roi_box(roi, volume_node) for roi in rois if roi is not None]
    points = point_prompts(include_points, volume_node, True) + point_prompts(exclude_points, volume_node, False)
    return boxes, points
