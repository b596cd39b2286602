"""One rule for markups points, whether they come from a ``.mrk.json`` file (``fmseg prompt``, headless
scripts) or from a Slicer node (the module): which points exclude, and which are skipped as not placed."""

from __future__ import annotations

import numpy as np
import pytest

from FMSegCore.io.markups import prompts_from_markups
from FMSegCore.io.volume import Volume
from FMSegCore.prompts import excludes, is_placed

pytest.importorskip("slicer")

import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402
from FMSegSlicerLib.scene_geometry import ijk_to_ras, to_vtk_matrix  # noqa: E402
from FMSegSlicerLib.scene_prompts import point_prompts  # noqa: E402
from slicer_scene import new_scene  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0])


def test_descriptions_and_statuses():
    assert excludes("exclude") and excludes(" Background ") and excludes("NEGATIVE")
    assert not excludes("") and not excludes(None) and not excludes("kidney, not background")
    assert is_placed("defined") and not any(map(is_placed, ("preview", "undefined", "missing")))


def test_a_saved_point_list_gives_the_module_and_the_file_the_same_points(tmp_path):
    new_scene()
    array = np.zeros((6, 20, 20), dtype=np.int16)
    ijk_to_ras_matrix = np.eye(4)
    ijk_to_ras_matrix[:3, :3] = np.diag([1.5, 1.5, 3.0])
    ijk_to_ras_matrix[:3, 3] = (4.0, -8.0, 2.0)
    volume_node = slicer.util.addVolumeFromArray(array, to_vtk_matrix(ijk_to_ras_matrix), "image")
    volume = Volume(array, (1.5, 1.5, 3.0), tuple(LPS @ ijk_to_ras_matrix[:3, 3]), LPS)
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "kidney")
    matrix = ijk_to_ras(volume_node)
    for ijk in [(2, 3, 1), (5, 5, 2), (7, 2, 3), (9, 9, 4), (11, 4, 5), (3, 12, 0)]:
        ras = matrix @ np.r_[ijk, 1.0]
        points.AddControlPointWorld(vtk.vtkVector3d(*ras[:3]))
    points.SetNthControlPointDescription(1, " Background ")
    points.SetNthControlPointDescription(2, "negative")
    points.SetNthControlPointDescription(3, "Exclude")
    points.SetNthControlPointPosition(4, *ras[:3], points.PositionPreview)  # still being placed
    points.UnsetNthControlPointPosition(5)
    points.SetNthControlPointVisibility(0, False)  # hidden but placed: still a prompt
    storage = points.CreateDefaultStorageNode()
    path = tmp_path / "kidney.mrk.json"
    storage.SetFileName(str(path))
    assert storage.WriteData(points)

    from_node = point_prompts(points, volume_node, include=True)
    (segment,) = prompts_from_markups(path, volume).values()
    from_file = [(p.ijk, p.include) for p in segment.points]
    assert [include for _, include in from_node] == [True, False, False, False]
    assert [include for _, include in from_file] == [include for _, include in from_node]
    assert np.allclose([ijk for ijk, _ in from_file], [ijk for ijk, _ in from_node], atol=1e-4)
    assert np.allclose([ijk for ijk, _ in from_node], [(2, 3, 1), (5, 5, 2), (7, 2, 3), (9, 9, 4)], atol=1e-4)
