"""Real MRML without the Slicer application: slicer-core's C++ classes set up the way Slicer does at start-up,
so that ``slicer.util`` helpers and module logics work on real nodes (see ../shared/docs/slicer.md)."""

from __future__ import annotations

import types

import slicer
import vtk

LOGICS = {"Volumes": "vtkSlicerVolumesLogic", "Segmentations": "vtkSlicerSegmentationsModuleLogic",
          "Markups": "vtkSlicerMarkupsLogic"}


def new_scene():
    """A fresh scene wired like Slicer's: application logic, colours, and the volumes/segmentations/markups
    logics registered; ``slicer.mrmlScene``, ``slicer.app`` and ``slicer.modules`` point at it."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    # Without the application there are no colour files to find: the logic says so on stderr; quiet that.
    verbosity = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    try:
        colors.SetMRMLApplicationLogic(app_logic)
        colors.SetMRMLScene(scene)
        colors.AddDefaultColorNodes()
    finally:
        vtk.vtkLogger.SetStderrVerbosity(verbosity)
    app_logic.SetModuleLogic("Colors", colors)
    modules = types.SimpleNamespace()
    keep = [colors]
    for name, cls in LOGICS.items():
        logic = getattr(slicer, cls)()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        setattr(modules, name.lower(), types.SimpleNamespace(logic=lambda logic=logic: logic))
        keep.append(logic)
    slicer.mrmlScene = scene
    slicer.app = types.SimpleNamespace(applicationLogic=lambda: app_logic, mrmlScene=lambda: scene,
                                       _keep=keep)
    slicer.modules = modules
    return scene


def roi_on_grid(volume_node, lo, hi, name="roi"):
    """A ROI aligned with a volume's voxel axes covering the IJK box lo..hi, placed in RAS as Slicer stores it."""
    import numpy as np
    from FMSegSlicerLib.scene_geometry import ijk_to_ras, to_vtk_matrix

    matrix = ijk_to_ras(volume_node)
    spacing = np.asarray(volume_node.GetSpacing())
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    orientation = np.eye(4)
    orientation[:3, :3] = matrix[:3, :3] / spacing
    roi.SetAndObserveObjectToNodeMatrix(to_vtk_matrix(orientation))
    roi.SetCenter(*(matrix @ np.r_[(np.asarray(lo) + np.asarray(hi)) / 2, 1.0])[:3])
    roi.SetSize(*((np.asarray(hi) - np.asarray(lo)) * spacing))
    return roi
