"""Geometry between Slicer nodes and FMSegCore: a volume node's grid in ITK's LPS convention, world (RAS)
positions to voxel indices, and new volume nodes on an existing grid. No Qt; MRML only."""

from __future__ import annotations

from typing import Any

import numpy as np
import vtk

from FMSegCore.server.client import geometry

LPS_FLIP = np.diag([-1.0, -1.0, 1.0])


def from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A 4x4 numpy array of a vtkMatrix4x4."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def to_vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A vtkMatrix4x4 of a 4x4 array."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    """The node's own IJK -> RAS matrix (4x4), before any parent transform."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return from_vtk_matrix(matrix)


def world_to_node(node: Any) -> np.ndarray:
    """World -> node coordinates: the inverse of the node's parent transforms (linear ones only)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ValueError(f"{node.GetName()}: its non-linear transform must be hardened before segmenting")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformFromWorld(matrix)
    return from_vtk_matrix(matrix)


def volume_meta(volume_node: Any) -> dict[str, Any]:
    """The grid of a volume node as FMSegCore expects it: spacing, origin and direction in LPS (ITK)."""
    matrix = ijk_to_ras(volume_node)
    spacing = np.asarray(volume_node.GetSpacing(), dtype=float)
    direction_ras = matrix[:3, :3] / spacing
    return geometry(spacing, LPS_FLIP @ matrix[:3, 3], LPS_FLIP @ direction_ras, volume_node.GetName() or "")


def world_to_ijk(volume_node: Any, points_ras: np.ndarray) -> np.ndarray:
    """Continuous (i, j, k) voxel indices of world RAS points (N, 3)."""
    points = np.atleast_2d(np.asarray(points_ras, dtype=float))
    homogeneous = np.c_[points, np.ones(len(points))]
    to_ijk = np.linalg.inv(ijk_to_ras(volume_node)) @ world_to_node(volume_node)
    return (homogeneous @ to_ijk.T)[:, :3]


def add_volume_like(reference: Any, array_kji: np.ndarray, name: str, scene: Any) -> Any:
    """A new scalar volume node holding ``array_kji`` on ``reference``'s grid (and under its transform)."""
    import slicer.util

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(to_vtk_matrix(ijk_to_ras(reference)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_kji))
    parent = reference.GetParentTransformNode()
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node
