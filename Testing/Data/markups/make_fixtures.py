"""Regenerate the Slicer-written files used by the tests and the demo: markups, and one cropped segmentation.

Needs ``slicer-core`` (real MRML markups nodes and their JSON storage node); the tests themselves do not::

    pip install slicer-core==5.13.31053.0
    python Testing/Data/markups/make_fixtures.py

Every position is derived from the ``ct_abdomen_pelvis`` label map, so the files point at known structures:

- ``points_lps.mrk.json``: point list (LPS) with an include point in the liver and an exclude point in the
  right kidney (control point labels name the structures);
- ``points_ras.mrk.json``: point list saved in RAS, include point in the spleen, exclude point in the stomach;
- ``roi_liver.mrk.json``: ROI box around the liver, aligned with the image axes;
- ``roi_rotated.mrk.json``: ROI centred on the spleen, 60 x 30 x 45 mm, rotated 30 degrees about S;
  ``roi_rotated_ras.mrk.json`` is the same node saved in RAS;
- ``roi_flat.mrk.json``: ROI 1 mm thick (less than a 3 mm slice) across the left kidney;
- ``curve_kidney.mrk.json``: curve (scribble, LPS) along the left kidney's section on the slice of its most
  interior voxel, 0.4 mm off the slice centre; ``curve_stomach_exclude_ras.mrk.json``: curve saved in RAS along
  the stomach there, its first control point described "exclude"; ``lasso_spleen.mrk.json``: closed curve
  (lasso) around the spleen's section on the slice of its most interior voxel;
- ``Resources/SampleData/ct_abdomen_pelvis/prompts/{liver,spleen,kidney_left}.mrk.json``: the demo's prompts,
  one ROI box per structure (5 mm margin), named after the structure;
- ``Testing/Data/segmentations/lungs_cropped.seg.nrrd``: a segmentation saved by Slicer's storage node cropped
  to the extent of its segments (as Slicer does), on the grid of ``ct_chest_small/image.nrrd``: "right lung"
  (label value 1) and "left lung" (2), from values 5 and 6 of ``ct_chest_small/label.nii.gz``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402
from slicer_scene import new_scene  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from FMSegCore.io.volume import Volume, read_volume  # noqa: E402

CASE = ROOT / "Resources" / "SampleData" / "ct_abdomen_pelvis"
FIXTURES = Path(__file__).resolve().parent
DEMO = CASE / "prompts"
CHEST = ROOT / "Resources" / "SampleData" / "ct_chest_small"
CROPPED = ROOT / "Testing" / "Data" / "segmentations" / "lungs_cropped.seg.nrrd"
#: Names and colours (those of Slicer's chest sample segmentation) of the cropped segmentation's segments.
LUNGS = (("right lung", (0.0862745, 0.772549, 0.278431)), ("left lung", (0.772549, 0.0980392, 0.388235)))
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def make_scene() -> tuple[slicer.vtkMRMLScene, dict]:
    """A scene set up as the Slicer application does (``Testing/slicer_scene.py``): the scene and the Markups,
    Segmentations and application logics by name."""
    scene = new_scene()
    logics = {"Markups": slicer.modules.markups.logic(), "Segmentations": slicer.modules.segmentations.logic(),
              "Application": slicer.app.applicationLogic()}
    return scene, logics


def save(node, path: Path, coordinate_system: str = "LPS") -> None:
    node.AddDefaultStorageNode()
    storage = node.GetStorageNode()
    storage.SetCoordinateSystem(storage.GetCoordinateSystemFromString(coordinate_system))
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise RuntimeError(f"Slicer could not write {path}")
    print("wrote", path.relative_to(ROOT))


def interior_point_lps(volume: Volume, labels: np.ndarray, value: int, offset_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """LPS position of the structure's voxel nearest to its centroid, shifted by a sub-voxel offset."""
    ijk = np.argwhere(labels == value)[:, ::-1].astype(float)
    nearest = ijk[np.argmin(np.linalg.norm(ijk - ijk.mean(axis=0), axis=1))]
    return volume.ijk_to_lps(nearest)[0] + np.asarray(offset_mm)


def box_lps(volume: Volume, labels: np.ndarray, value: int, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre (LPS) and size (mm, along the image axes) of the structure's bounding box plus a margin."""
    ijk = np.argwhere(labels == value)[:, ::-1]
    lo, hi = ijk.min(axis=0), ijk.max(axis=0)
    centre = volume.ijk_to_lps((lo + hi) / 2.0)[0]
    size = (hi - lo) * np.asarray(volume.spacing) + 2 * margin_mm
    return centre, size


def add_points(scene, name: str, points: list[tuple[str, np.ndarray, str]]):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    for label, lps, description in points:
        index = node.AddControlPoint(*(LPS_TO_RAS @ lps), label)
        node.SetNthControlPointDescription(index, description)
    return node


def add_roi(scene, name: str, centre_lps, size_mm, axes_lps):
    """ROI node with its axes (columns, in LPS) turned into Slicer's RAS object-to-node matrix."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    node.CreateDefaultDisplayNodes()
    matrix = vtk.vtkMatrix4x4()
    axes_ras = LPS_TO_RAS @ np.asarray(axes_lps, dtype=float)
    centre_ras = LPS_TO_RAS @ np.asarray(centre_lps, dtype=float)
    for row in range(3):
        for column in range(3):
            matrix.SetElement(row, column, axes_ras[row, column])
        matrix.SetElement(row, 3, centre_ras[row])
    node.SetAndObserveObjectToNodeMatrix(matrix)
    node.SetSize(*[float(s) for s in size_mm])
    return node


def rotation_about_s(degrees: float) -> np.ndarray:
    angle = math.radians(degrees)
    return np.array([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0, 0, 1]])


def write_cropped_segmentation(scene, logic) -> None:
    """The lungs of the chest CT, saved by Slicer cropped to their extent."""
    image = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "image")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    image.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(CHEST / "image.nrrd"))
    if not storage.ReadData(image):
        raise RuntimeError("Slicer could not read image.nrrd")

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(CHEST / "label.nii.gz")))  # same grid as image.nrrd
    lungs = np.where(np.isin(labels, [5, 6]), labels - 4, 0).astype(np.uint8)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lungs")
    matrix = vtk.vtkMatrix4x4()
    image.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    data = vtk.vtkImageData()
    data.SetDimensions(lungs.shape[::-1])
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(data.GetPointData().GetScalars())[:] = lungs.ravel()
    labelmap.SetAndObserveImageData(data)

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lungs")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(image)
    if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
        raise RuntimeError("Slicer could not import the label map")
    segments = segmentation.GetSegmentation()
    for index, (name, color) in enumerate(LUNGS):
        segments.GetNthSegment(index).SetName(name)
        segments.GetNthSegment(index).SetColor(*color)

    segmentation.AddDefaultStorageNode()
    writer = segmentation.GetStorageNode()
    writer.SetCropToMinimumExtent(True)
    writer.SetFileName(str(CROPPED))
    if not writer.WriteData(segmentation):
        raise RuntimeError(f"Slicer could not write {CROPPED}")
    print("wrote", CROPPED.relative_to(ROOT))



def add_curve(scene, name: str, volume: Volume, ijk, closed: bool = False, description: str = "",
              offset_mm=(0.0, 0.0, 0.0)):
    """A curve node (closed: a closed curve node) through IJK control points of ``volume``."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode" if closed else "vtkMRMLMarkupsCurveNode", name)
    node.CreateDefaultDisplayNodes()
    for lps in volume.ijk_to_lps(np.asarray(ijk, dtype=float)) + np.asarray(offset_mm):
        node.AddControlPoint(*(LPS_TO_RAS @ lps))
    if description:
        node.SetNthControlPointDescription(0, description)
    return node


def write_curves(scene, volume: Volume, labels: np.ndarray, value: dict) -> None:
    """Scribbles and a lasso drawn from the label map as the benchmark draws them."""
    from FMSegCore.bench.prompt_bench import interior_voxel
    from FMSegCore.bench.simulated_curves import scribble_on_slice

    for structure, file, closed, description, system in (
            ("kidney_left", "curve_kidney.mrk.json", False, "", "LPS"),
            ("stomach", "curve_stomach_exclude_ras.mrk.json", False, "exclude", "RAS"),
            ("spleen", "lasso_spleen.mrk.json", True, "", "LPS")):
        mask = labels == value[structure]
        curve = scribble_on_slice(mask, *interior_voxel(mask), closed=closed)
        node = add_curve(scene, file.split(".")[0], volume, curve.points, closed, description, (0.0, 0.0, 0.4))
        save(node, FIXTURES / file, coordinate_system=system)


def main() -> None:
    volume = read_volume(CASE / "image.nii.gz")
    labels = read_volume(CASE / "label.nii.gz", allow_empty=True).array
    value = {name: int(v) for v, name in json.loads((CASE / "labels.json").read_text()).items()}
    axes = np.asarray(volume.direction, dtype=float)
    scene, logics = make_scene()

    liver = interior_point_lps(volume, labels, value["liver"], (0.7, -0.4, 0.9))
    kidney_right = interior_point_lps(volume, labels, value["kidney_right"], (-0.6, 0.5, -1.1))
    points = [("liver", liver, ""), ("kidney_right", kidney_right, "exclude")]
    save(add_points(scene, "points_lps", points), FIXTURES / "points_lps.mrk.json")

    spleen = interior_point_lps(volume, labels, value["spleen"], (1.2, 0.3, -0.5))
    stomach = interior_point_lps(volume, labels, value["stomach"], (-0.2, 1.1, 0.6))
    points = [("spleen", spleen, "include"), ("stomach", stomach, " Exclude ")]
    save(add_points(scene, "points_ras", points), FIXTURES / "points_ras.mrk.json", coordinate_system="RAS")

    centre, size = box_lps(volume, labels, value["liver"], margin_mm=3.0)
    save(add_roi(scene, "roi_liver", centre, size, axes), FIXTURES / "roi_liver.mrk.json")

    centre, _ = box_lps(volume, labels, value["spleen"], margin_mm=0.0)
    rotated = add_roi(scene, "roi_rotated", centre, (60.0, 30.0, 45.0), rotation_about_s(30.0))
    save(rotated, FIXTURES / "roi_rotated.mrk.json")
    save(rotated, FIXTURES / "roi_rotated_ras.mrk.json", coordinate_system="RAS")

    centre, size = box_lps(volume, labels, value["kidney_left"], margin_mm=3.0)
    size[2] = 1.0
    centre[2] += 0.4  # off the slice centre: the prompt must snap to the nearest slice
    save(add_roi(scene, "roi_flat", centre, size, axes), FIXTURES / "roi_flat.mrk.json")

    DEMO.mkdir(exist_ok=True)
    for structure in ("liver", "spleen", "kidney_left"):
        centre, size = box_lps(volume, labels, value[structure], margin_mm=5.0)
        save(add_roi(scene, structure, centre, size, axes), DEMO / f"{structure}.mrk.json")

    write_curves(scene, volume, labels, value)
    write_cropped_segmentation(scene, logics["Segmentations"])


if __name__ == "__main__":
    main()
