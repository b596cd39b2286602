"""Prompts from Markups nodes: include/exclude point lists, ROIs (2D when at most a voxel thick) and curves
(scribbles: curve nodes; lassos: closed curve nodes), as the continuous voxel indices the worker expects. No Qt;
MRML only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from FMSegCore.prompts import CORNER_SIGNS, box_from_corners, curve_problem, excludes, is_placed
from FMSegSlicerLib.scene_geometry import from_vtk_matrix, world_to_ijk

Box = tuple[tuple[float, float, float], tuple[float, float, float], Optional[tuple]]  # lo, hi, corners
Point = tuple[tuple[float, float, float], bool]
Curve = tuple[list[tuple[float, float, float]], bool, bool]  # control points, include, closed


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


def _placed(node: Any) -> tuple[np.ndarray, list[str]]:
    """World positions (N, 3) and descriptions of a markups node's placed control points."""
    positions, descriptions = [], []
    for index in range(node.GetNumberOfControlPoints()):
        if not is_placed(node.GetPositionStatusAsString(node.GetNthControlPointPositionStatus(index))):
            continue
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, position)
        positions.append(position)
        descriptions.append(node.GetNthControlPointDescription(index))
    return np.asarray(positions, dtype=float).reshape(-1, 3), descriptions


def curve_prompt(curve_node: Any, volume_node: Any, include: bool = True) -> Curve:
    """A curve node (scribble) or closed curve node (lasso) through its placed control points, straight between
    them, as ``fmseg prompt`` reads its file; it excludes when ``include`` is False or a control point's
    description says exclude. ValueError when it has too few points or (a lasso) no area."""
    positions, descriptions = _placed(curve_node)
    closed = bool(curve_node.IsA("vtkMRMLMarkupsClosedCurveNode"))
    problem = curve_problem(positions, closed)
    if problem:
        raise ValueError(f"{curve_node.GetName()}: {problem}")
    keep = include and not any(excludes(text) for text in descriptions)
    ijk = world_to_ijk(volume_node, positions)
    return [tuple(float(v) for v in p) for p in ijk], keep, closed  # type: ignore[return-value]


def collect_prompts(volume_node: Any, include_points: Optional[Any] = None, exclude_points: Optional[Any] = None,
                    rois: Sequence[Any] = (), include_curves: Sequence[Any] = (),
                    exclude_curves: Sequence[Any] = ()) -> tuple[list[Box], list[Point], list[Curve]]:
    """Boxes, points and curves of one segment from its markups nodes."""
    boxes = [roi_box(roi, volume_node) for roi in rois if roi is not None]
    points = point_prompts(include_points, volume_node, True) + point_prompts(exclude_points, volume_node, False)
    curves = [curve_prompt(node, volume_node, True) for node in include_curves if node is not None]
    curves += [curve_prompt(node, volume_node, False) for node in exclude_curves if node is not None]
    return boxes, points, curves


# ---------------------------------------------------------------------------------------------- prompt nodes

#: The markups class of each prompt the panel places (``panel.PLACING_BUTTONS``'s kinds).
PROMPT_CLASSES = {"box": "vtkMRMLMarkupsROINode", "roi": "vtkMRMLMarkupsROINode",
                  "scribble": "vtkMRMLMarkupsCurveNode", "exclude-scribble": "vtkMRMLMarkupsCurveNode",
                  "lasso": "vtkMRMLMarkupsClosedCurveNode", "exclude-lasso": "vtkMRMLMarkupsClosedCurveNode"}
CURVE_KINDS = ("scribble", "exclude-scribble", "lasso", "exclude-lasso")


def finish_curve(node: Any, kind: str) -> bool:
    """A curve the user has finished placing: an exclude one gets "exclude" as its control points' description
    (so the node saved as a file prompts ``fmseg prompt`` the same way); False when it has too few placed points
    to be a curve, or a lasso no area (the caller removes it)."""
    positions, _ = _placed(node)
    if curve_problem(positions, closed=kind.endswith("lasso")):
        return False
    if kind.startswith("exclude"):
        for index in range(node.GetNumberOfControlPoints()):
            node.SetNthControlPointDescription(index, "exclude")
    return True


def prompt_curves(scene: Any, attribute: str, skip: Optional[Any] = None) -> tuple[list[Any], list[Any]]:
    """(include, exclude) curve and closed curve nodes of ``scene`` whose ``attribute`` names a curve kind, in
    scene order, without ``skip`` (one still being placed)."""
    include, exclude = [], []
    nodes = scene.GetNodesByClass("vtkMRMLMarkupsCurveNode")  # closed curves too (a subclass)
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        kind = node.GetAttribute(attribute)
        if node is not skip and kind in CURVE_KINDS:
            (exclude if kind.startswith("exclude") else include).append(node)
    return include, exclude
