"""Scribbles and lassos in the Slicer module on real MRML (slicer-core): curve and closed curve nodes become the
prompts their saved files give ``fmseg prompt``, the panel's placing helpers, and the Logic sending them with the
other prompts to a real local worker, whose result equals FMSegCore's in-process voxel for voxel."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer")

import slicer  # noqa: E402
import slicer.util  # noqa: E402
from FMSegSlicerLib.logic import FMSegLogic  # noqa: E402
from FMSegSlicerLib.scene_geometry import ijk_to_ras, to_vtk_matrix  # noqa: E402
from FMSegSlicerLib.scene_prompts import collect_prompts, finish_curve, prompt_curves  # noqa: E402
from slicer_scene import new_scene, roi_on_grid  # noqa: E402
from worker_fixtures import ct_case, kidney_roi  # noqa: E402

from FMSegCore.bench.prompt_bench import interior_voxel  # noqa: E402
from FMSegCore.bench.simulated_curves import scribble_on_slice  # noqa: E402
from FMSegCore.engines.prompting.session import PromptSession  # noqa: E402
from FMSegCore.io.markups import prompts_from_markups  # noqa: E402
from FMSegCore.io.volume import Volume  # noqa: E402
from FMSegCore.models.factory import load_model  # noqa: E402
from FMSegCore.prompts import BoxPrompt, CurvePrompt, SegmentPrompts  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0])
ATTRIBUTE = "FMSeg.Prompt"


@pytest.fixture(scope="module")
def scene():
    return new_scene()


@pytest.fixture(scope="module")
def oblique(scene):
    """The bundled CT on an oblique grid (rotated 20 degrees about S, 10 about R), as a node and a Volume."""
    image, labels, names = ct_case()
    a, b = np.radians(20.0), np.radians(10.0)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ \
        np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(image.spacing)
    matrix[:3, 3] = (12.5, -40.0, 7.0)
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(image.array), to_vtk_matrix(matrix), "CT curves")
    volume = Volume(np.ascontiguousarray(image.array), tuple(image.spacing), tuple(LPS @ matrix[:3, 3]),
                    LPS @ rotation)
    return node, volume, labels, names


def curve_node(volume_node, points_ijk, closed=False, name="curve", descriptions=()):
    node = slicer.mrmlScene.AddNewNodeByClass(
        "vtkMRMLMarkupsClosedCurveNode" if closed else "vtkMRMLMarkupsCurveNode", name)
    matrix = ijk_to_ras(volume_node)
    for ijk in points_ijk:
        node.AddControlPoint(*(matrix @ np.r_[ijk, 1.0])[:3])
    for index, text in enumerate(descriptions):
        node.SetNthControlPointDescription(index, text)
    return node


def saved(node, path):
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    return path


def test_curve_nodes_give_the_prompts_their_saved_files_give(oblique, tmp_path):
    node, volume = oblique[:2]
    stroke = [(40.0, 50.0, 60.0), (48.5, 52.0, 60.0), (55.0, 47.25, 60.0)]
    loop = [(30.0, 30.0, 44.0), (50.0, 30.0, 44.0), (40.0, 45.0, 44.0)]
    scribble = curve_node(node, stroke, name="stroke")
    marked = curve_node(node, stroke, name="marked", descriptions=("", " Exclude "))
    lasso = curve_node(node, loop, closed=True, name="loop")
    boxes, points, curves = collect_prompts(node, include_curves=[scribble, marked], exclude_curves=[lasso])
    assert boxes == [] and points == []
    assert [(c[1], c[2]) for c in curves] == [(True, False), (False, False), (False, True)]
    np.testing.assert_allclose(curves[0][0], stroke, atol=1e-6)
    np.testing.assert_allclose(curves[2][0], loop, atol=1e-6)
    for curve_node_, (ijk, include, closed) in zip((scribble, marked), curves[:2]):
        path = saved(curve_node_, tmp_path / f"{curve_node_.GetName()}.mrk.json")
        (read,) = prompts_from_markups(path, volume)[curve_node_.GetName()].curves
        assert read.include == include and read.closed == closed
        np.testing.assert_allclose(read.array(), ijk, atol=1e-4)
    (read,) = prompts_from_markups(saved(lasso, tmp_path / "loop.mrk.json"), volume)["loop"].curves
    assert read.closed and read.include  # the exclude list made it exclude; the file alone says include
    assert read.slice_index(2) == 44 and read.slice_index(0) is None


def test_a_curve_too_short_is_refused_naming_the_node(oblique):
    node = oblique[0]
    dot = curve_node(node, [(40.0, 50.0, 60.0)], name="dot")
    with pytest.raises(ValueError, match="dot: a curve .scribble. needs at least 2"):
        collect_prompts(node, include_curves=[dot])
    flat = curve_node(node, [(40, 50, 60), (44, 50, 60), (48, 50, 60)], closed=True, name="flat lasso")
    with pytest.raises(ValueError, match="flat lasso: the closed curve .lasso. encloses no area"):
        collect_prompts(node, exclude_curves=[flat])


def test_placed_curves_are_found_by_kind_and_exclude_ones_marked_for_their_files(oblique):
    node = oblique[0]
    kinds = {"scribble": curve_node(node, [(1, 2, 3), (4, 5, 3)], name="a"),
             "exclude-scribble": curve_node(node, [(1, 2, 3), (4, 5, 3)], name="b"),
             "lasso": curve_node(node, [(1, 2, 3), (4, 2, 3), (3, 5, 3)], closed=True, name="c"),
             "exclude-lasso": curve_node(node, [(1, 2, 3), (4, 2, 3), (3, 5, 3)], closed=True, name="d")}
    for kind, curve in kinds.items():
        curve.SetAttribute(ATTRIBUTE, kind)
        assert finish_curve(curve, kind)
    unmarked = curve_node(node, [(1, 2, 3), (4, 5, 3)], name="not ours")
    include, exclude = prompt_curves(slicer.mrmlScene, ATTRIBUTE)
    assert include == [kinds["scribble"], kinds["lasso"]] and exclude == [kinds["exclude-scribble"],
                                                                          kinds["exclude-lasso"]]
    assert unmarked not in include + exclude
    assert prompt_curves(slicer.mrmlScene, ATTRIBUTE, skip=kinds["lasso"])[0] == [kinds["scribble"]]
    # Exclude curves now say so in their control points (a saved file excludes too); include ones do not.
    _, _, curves = collect_prompts(node, include_curves=list(kinds.values()))
    assert [c[1] for c in curves] == [True, False, True, False]
    one = curve_node(node, [(1, 2, 3)], name="one point")
    assert not finish_curve(one, "scribble")
    for curve in [*kinds.values(), unmarked, one]:
        slicer.mrmlScene.RemoveNode(curve)


@pytest.fixture(scope="module")
def logic(scene):
    logic = FMSegLogic(scene, device="cpu")
    logic.connect()
    yield logic
    logic.shutdown()


def test_the_logic_sends_curves_with_the_other_prompts_and_matches_fmsegcore(logic, oblique):
    """A 4-slice ROI around the left kidney, an include lasso around it on one slice and an exclude scribble
    across another: the worker's result equals FMSegCore's in-process result for the same prompts."""
    node, volume, labels, names = oblique
    kidney = labels == names["kidney_left"]
    lo, hi = kidney_roi(labels, names)
    roi = roi_on_grid(node, lo, hi, "curves roi")
    k, j, i = interior_voxel(kidney[int(lo[2]):int(hi[2]) + 1])
    k += int(lo[2])
    lasso = scribble_on_slice(kidney, k, j, i, closed=True)
    other = int(hi[2]) if k != int(hi[2]) else int(lo[2])
    rows, cols = np.nonzero(kidney[other])
    across = CurvePrompt(((cols.min() + 1.0, rows.mean(), other), (cols.max() - 1.0, rows.mean(), other)),
                         include=False)
    lasso_node = curve_node(node, lasso.points, closed=True, name="lasso")
    scribble_node = curve_node(node, across.points, name="across")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "curves")
    logic.prompt(node, segmentation, "kidney_left", rois=[roi], include_curves=[lasso_node],
                 exclude_curves=[scribble_node])
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("kidney_left")
    got = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, node).astype(bool)

    _, _, curves = collect_prompts(node, include_curves=[lasso_node], exclude_curves=[scribble_node])
    prompts = SegmentPrompts("kidney_left", [BoxPrompt(lo, hi)], curves=[
        CurvePrompt(tuple(points), include, closed) for points, include, closed in curves])
    session = PromptSession(volume, load_model("litemedsam", "cpu"), "cpu")
    expected = session.segment(prompts)
    assert expected[k].sum() > 50 and np.array_equal(got, expected)
    without = session.segment(SegmentPrompts("the ROI alone", [BoxPrompt(lo, hi)]))
    assert not np.array_equal(without, expected)  # the curves changed the result
