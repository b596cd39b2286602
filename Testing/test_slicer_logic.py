"""The module's Logic on real MRML (slicer-core) with a real local worker process: geometry (RAS/IJK, oblique
directions), prompts from Markups, results checked voxel by voxel against FMSegCore run in-process, undo,
in-context from scene pairs, adaptation with progress/cancel, and a crashed worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")

import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402
from FMSegSlicerLib.logic import Cancelled, FMSegLogic, WorkerCrashed  # noqa: E402
from FMSegSlicerLib.scene_geometry import ijk_to_ras, to_vtk_matrix, volume_meta, world_to_ijk  # noqa: E402
from slicer_scene import new_scene, roi_on_grid  # noqa: E402
from worker_fixtures import CT_CASE, ct_case, kidney_roi  # noqa: E402

from FMSegCore.engines.prompting.session import PromptSession  # noqa: E402
from FMSegCore.io.colors import default_color, distinct_colors  # noqa: E402
from FMSegCore.io.terminology import terminology_entry  # noqa: E402
from FMSegCore.io.volume import Volume, read_volume  # noqa: E402
from FMSegCore.models.factory import load_model  # noqa: E402
from FMSegCore.prompts import BoxPrompt, PointPrompt, SegmentPrompts  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0])


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def add_oblique_volume(array: np.ndarray, spacing, name: str, degrees=(20.0, 10.0)) -> tuple:
    """A scalar volume node on an oblique grid; the same grid as an FMSegCore Volume (LPS)."""
    direction_ras = _rotation(*degrees)
    ijk_to_ras_matrix = np.eye(4)
    ijk_to_ras_matrix[:3, :3] = direction_ras @ np.diag(spacing)
    ijk_to_ras_matrix[:3, 3] = (12.5, -40.0, 7.0)
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(array), to_vtk_matrix(ijk_to_ras_matrix), name)
    volume = Volume(np.ascontiguousarray(array), tuple(spacing), tuple(LPS @ ijk_to_ras_matrix[:3, 3]),
                    LPS @ direction_ras)
    return node, volume


def point_list(node, points_ijk, name):
    markups = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    matrix = ijk_to_ras(node)
    for ijk in points_ijk:
        ras = matrix @ np.r_[ijk, 1.0]
        markups.AddControlPointWorld(vtk.vtkVector3d(*ras[:3]))
    return markups


@pytest.fixture(scope="module")
def scene():
    return new_scene()


@pytest.fixture(scope="module")
def logic(scene):
    logic = FMSegLogic(scene, device="cpu")
    info = logic.connect()
    assert info["device"] == "cpu"
    yield logic
    logic.shutdown()


@pytest.fixture(scope="module")
def case():
    return ct_case()


@pytest.fixture(scope="module")
def oblique(scene, case):
    image, labels, names = case
    node, volume = add_oblique_volume(image.array, image.spacing, "CT oblique")
    return node, volume, labels, names


@pytest.fixture(scope="module")
def local_model():
    return load_model("litemedsam", "cpu")


def _segment_array(segmentation, name, volume_node):
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume_node).astype(bool)


# ------------------------------------------------------------------------------------------------ geometry


def test_volume_geometry_is_what_fmsegcore_reads_from_the_same_file(scene):
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(CT_CASE / "image.nii.gz"), "CT")
    volume = read_volume(CT_CASE / "image.nii.gz")
    meta = volume_meta(node)
    assert np.allclose(meta["spacing"], volume.spacing, atol=1e-5)
    assert np.allclose(meta["origin"], volume.origin, atol=1e-4)
    assert np.allclose(np.reshape(meta["direction"], (3, 3)), volume.direction, atol=1e-6)
    assert np.array_equal(slicer.util.arrayFromVolume(node), volume.array)


def test_a_roi_along_ras_axes_on_an_oblique_grid_keeps_its_corners(oblique):
    from FMSegSlicerLib.scene_prompts import roi_box

    node = oblique[0]
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ras roi")
    roi.SetCenter(*(ijk_to_ras(node) @ np.array([60.0, 50.0, 50.0, 1.0]))[:3])
    roi.SetSize(30.0, 20.0, 15.0)
    lo, hi, corners = roi_box(roi, node)
    assert corners is not None and len(corners) == 8
    assert np.allclose(np.min(corners, axis=0), lo) and np.allclose(np.max(corners, axis=0), hi)
    aligned = roi_on_grid(node, (50, 40, 45), (70, 60, 55), "aligned")
    lo, hi, corners = roi_box(aligned, node)
    assert corners is None and np.allclose(lo, (50, 40, 45)) and np.allclose(hi, (70, 60, 55))


def test_the_logic_imports_without_torch():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); "
            "import FMSegSlicerLib.logic, FMSegSlicerLib.dependencies, FMSegSlicerLib.scene_prompts; print('ok')")
    result = subprocess.run([sys.executable, "-c", code, str(root / "FMSegSlicer")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-1000:]


def test_world_positions_map_to_the_voxels_fmsegcore_computes_on_an_oblique_grid(oblique):
    node, volume = oblique[:2]
    meta = volume_meta(node)
    assert np.allclose(np.reshape(meta["direction"], (3, 3)), volume.direction)
    assert not np.allclose(np.abs(volume.direction), np.eye(3), atol=0.1)  # really oblique
    ijk = np.array([[0, 0, 0], [10.5, 20.25, 30.0], [121, 100, 111]])
    ras = (np.c_[ijk, np.ones(3)] @ ijk_to_ras(node).T)[:, :3]
    assert np.allclose(world_to_ijk(node, ras), ijk, atol=1e-6)
    assert np.allclose(volume.lps_to_ijk(ras * [-1, -1, 1]), ijk, atol=1e-6)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -3.0, 2.0)
    transform.SetMatrixTransformToParent(to_vtk_matrix(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    try:  # a volume moved by a transform: world points are taken back into its frame
        assert np.allclose(world_to_ijk(node, ras + shift[:3, 3]), ijk, atol=1e-6)
    finally:
        node.SetAndObserveTransformNodeID(None)


# ------------------------------------------------------------------------------------------------ prompting


def test_roi_prompt_gives_fmsegcores_result_voxel_for_voxel_with_names_colours_and_terminology(
        logic, oblique, local_model):
    node, volume, labels, names = oblique
    lo, hi = kidney_roi(labels, names)
    roi = roi_on_grid(node, lo, hi)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    segment_id = logic.prompt(node, segmentation, "kidney_left", rois=[roi])

    expected = PromptSession(volume, local_model, "cpu").segment(SegmentPrompts("kidney_left", [BoxPrompt(lo, hi)]))
    got = _segment_array(segmentation, "kidney_left", node)
    assert expected.sum() > 500
    assert np.array_equal(got, expected)
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "kidney_left"
    assert segment.GetTerminology() == terminology_entry("kidney_left")
    assert "SCT^18639004^Left kidney" in segment.GetTerminology()


def test_include_and_exclude_points_refine_like_fmsegcore(logic, oblique, local_model):
    node, volume, labels, names = oblique
    spleen = labels == names["spleen"]
    k = int(np.median(np.nonzero(spleen)[0]))
    j, i = np.argwhere(spleen[k]).mean(axis=0)
    include = point_list(node, [(i, j, k)], "include")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "points")
    logic.prompt(node, segmentation, "spleen", include_points=include)
    session = PromptSession(volume, local_model, "cpu")
    first = session.segment(SegmentPrompts("spleen", points=[PointPrompt((i, j, k))]))
    assert np.array_equal(_segment_array(segmentation, "spleen", node), first)

    kk, jj, ii = np.argwhere(first)[0]
    exclude = point_list(node, [(ii, jj, kk)], "exclude")
    logic.prompt(node, segmentation, "spleen", include_points=include, exclude_points=exclude)
    second = session.segment(SegmentPrompts("spleen", points=[PointPrompt((i, j, k)),
                                                               PointPrompt((float(ii), float(jj), float(kk)), False)]))
    got = _segment_array(segmentation, "spleen", node)
    assert np.array_equal(got, second) and not got[kk, jj, ii]
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1  # the same segment, updated


def test_users_segments_are_never_lost_and_one_undo_restores_each_step(logic, oblique):
    node, _, labels, names = oblique
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
    mine = segmentation.GetSegmentation().AddEmptySegment("my_work", "my_work", (0.1, 0.9, 0.1))
    drawn = np.zeros(labels.shape, dtype=np.uint8)
    drawn[40:44, 30:60, 30:60] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, mine, node)
    lo, hi = kidney_roi(labels, names, slices=2)
    roi = roi_on_grid(node, lo, hi, "undo roi")

    logic.prompt(node, segmentation, "kidney_left", rois=[roi])
    after_first = _segment_array(segmentation, "kidney_left", node)
    logic.prompt(node, segmentation, "my_work", rois=[roi])  # overwrites the user's segment of that name
    assert not np.array_equal(_segment_array(segmentation, "my_work", node), drawn.astype(bool))
    assert logic.undo(segmentation)
    assert np.array_equal(_segment_array(segmentation, "my_work", node), drawn.astype(bool))
    assert np.array_equal(_segment_array(segmentation, "kidney_left", node), after_first)
    assert logic.undo(segmentation)
    assert segmentation.GetSegmentation().GetSegmentIdBySegmentName("kidney_left") == ""
    assert np.array_equal(_segment_array(segmentation, "my_work", node), drawn.astype(bool))
    color = segmentation.GetSegmentation().GetSegment(mine).GetColor()
    assert np.allclose(color, (0.1, 0.9, 0.1))
    assert not logic.undo(segmentation)  # nothing more of FMSeg's to undo


def test_new_segments_get_the_colours_fmseg_writes_in_files(logic, oblique):
    node, _, labels, names = oblique
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "colours")
    roi = roi_on_grid(node, *kidney_roi(labels, names, slices=2), "colour roi")
    for name in ("liver", "kidney_left"):
        logic.prompt(node, segmentation, name, rois=[roi])
    shown = [segmentation.GetSegmentation().GetNthSegment(n).GetColor() for n in range(2)]
    # the kidney's usual colour is close to the liver's: Slicer, like a written file, shows another one
    assert np.allclose(shown, distinct_colors(["liver", "kidney_left"]), atol=1e-6)
    assert not np.allclose(shown[1], default_color("kidney_left", 2), atol=1e-3)


def test_async_prompt_touches_the_scene_only_when_its_result_is_collected(logic, oblique):
    node, _, labels, names = oblique
    lo, hi = kidney_roi(labels, names, slices=2)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "async")
    pending = logic.prompt_async(node, segmentation, "kidney_left", rois=[roi_on_grid(node, lo, hi, "a")])
    deadline = time.monotonic() + 120
    while not pending.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pending.done()
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0  # not yet applied
    segment_id = pending.result()
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "kidney_left"
    assert pending.result() == segment_id  # applied once


def test_bad_requests_say_what_to_do(logic, oblique):
    node = oblique[0]
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bad")
    with pytest.raises(ValueError, match="place a box, a ROI or an include point"):
        logic.prompt(node, segmentation, "x")
    with pytest.raises(ValueError, match="choose a scalar volume"):
        logic.prompt(None, segmentation, "x", rois=[])
    with pytest.raises(ValueError, match="no adapter to save"):
        FMSegLogic(slicer.mrmlScene).save_adapter("/tmp/x.pt")


def test_a_released_volume_leaves_the_worker_and_is_sent_again_when_used(logic, scene, case):
    image, labels, names = case
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(image.array), name="released")
    roi = roi_on_grid(node, *kidney_roi(labels, names))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "released result")
    held = logic.client.info()
    logic.prompt(node, segmentation, "kidney_left", rois=[roi])
    first = _segment_array(segmentation, "kidney_left", node)
    used = logic.client.info()
    assert (used["volumes"], used["sessions"]) == (held["volumes"] + 1, held["sessions"] + 1)
    logic.release_volume(node)
    freed = logic.client.info()
    assert (freed["volumes"], freed["sessions"]) == (held["volumes"], held["sessions"])
    logic.release_volume(node)  # nothing held any more: nothing to do
    logic.release_volume(None)
    logic.prompt(node, segmentation, "kidney_left", rois=[roi])  # uploaded again, same result
    assert logic.client.info()["volumes"] == held["volumes"] + 1
    assert first.sum() > 500 and np.array_equal(_segment_array(segmentation, "kidney_left", node), first)
    logic.release_volume(node)
    scene.RemoveNode(segmentation)
    scene.RemoveNode(roi)
    scene.RemoveNode(node)


# ------------------------------------------------------------------------------------------------ pairs


def _pair(scene, image, labels, names, slices, structures, label="pair"):
    node, _ = add_oblique_volume(image.array[slices], image.spacing, f"{label} volume")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{label} segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
    ids = []
    for structure in structures:
        segment_id = segmentation.GetSegmentation().AddEmptySegment(structure, structure, (0.8, 0.3, 0.2))
        mask = (labels[slices] == names[structure]).astype(np.uint8)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, node)
        ids.append(segment_id)
    return node, segmentation, ids


def test_incontext_from_scene_pairs_with_uncertainty_matches_fmsegcore(logic, scene, case):
    from FMSegCore.engines.incontext.session import InContextSession, InContextSettings
    from FMSegCore.engines.incontext.support import SupportSet, example_from_arrays
    from FMSegCore.io.labelmap import SegmentInfo

    image, labels, names = case
    liver = np.flatnonzero((labels == names["liver"]).any(axis=(1, 2)))
    support_slices, query_slices = liver[::6][:5], liver[len(liver) // 2 + 1: len(liver) // 2 + 3]
    support = _pair(scene, image, labels, names, support_slices, ["liver", "spleen"], "support")
    query_node, query_volume = add_oblique_volume(image.array[query_slices], image.spacing, "query")
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "incontext")
    result = logic.run_incontext(query_node, target, [support], support_size=4, ensemble=2, uncertainty=True,
                                 match="index")

    support_labels = np.zeros(support_slices.shape + labels.shape[1:], dtype=np.int32)
    support_labels[labels[support_slices] == names["liver"]] = 1
    support_labels[labels[support_slices] == names["spleen"]] = 2
    example = example_from_arrays(image.array[support_slices], support_labels,
                                  [SegmentInfo(1, "liver", (0.8, 0.3, 0.2)), SegmentInfo(2, "spleen", (0.8, 0.3, 0.2))])
    present = [v for v in (1, 2) if (support_labels == v).any()]
    expected = InContextSession(load_model("universeg-fmseg", "cpu"), SupportSet([example]), present, axis=2,
                                settings=InContextSettings(support_size=4, ensemble=2), device="cpu"
                                ).segment_volume(query_volume.array, uncertainty=True)
    for segment in expected.segments:
        assert np.array_equal(_segment_array(target, segment.name, query_node), expected.labels == segment.value)
    assert len(result["segments"]) == len(present)
    held = logic.client.info()["volumes"]
    logic.run_incontext(query_node, target, [support], support_size=4, match="index")
    assert logic.client.info()["volumes"] == held  # supports' label maps are dropped once read, images reused
    uncertainty = result["uncertainty_node"]
    assert uncertainty is not None and uncertainty.IsA("vtkMRMLScalarVolumeNode")
    assert np.allclose(slicer.util.arrayFromVolume(uncertainty), expected.uncertainty, atol=1e-6)
    assert np.allclose(ijk_to_ras(uncertainty), ijk_to_ras(query_node))


@pytest.fixture
def worker_with_own_cache(scene, monkeypatch, tmp_path):
    """A worker serving on 127.0.0.1 in this process, its model cache a throw-away folder (Tyche's weights cannot
    be fetched here: tests import the fixture's), and a Logic connected to it."""
    from worker_fixtures import TOKEN, running_worker

    from FMSegCore.server.service import Service

    cache = tmp_path / "cache"
    monkeypatch.setenv("FMSEG_CACHE_DIR", str(cache))
    with running_worker(service=Service("cpu")) as server:
        remote = FMSegLogic(scene)
        remote.connect(server.url, TOKEN, device="cpu")
        try:
            yield remote, cache
        finally:
            remote.shutdown()


def _files(folder):
    return sorted((str(path), path.stat().st_size) for path in folder.rglob("*")) if folder.exists() else []


def test_weights_imported_by_hand_are_checked_by_the_worker_and_a_wrong_file_changes_nothing(
        worker_with_own_cache, tmp_path):
    from reference_fixtures import official_checkpoint

    from FMSegCore.server.client import WorkerError

    logic, cache = worker_with_own_cache
    good = tmp_path / "tyche_v1_model_weights_CVPR.pt"
    good.write_bytes(official_checkpoint("tyche"))
    other_family = tmp_path / "universeg.pt"
    other_family.write_bytes(official_checkpoint("universeg", wrapping=None))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:20_000])
    before = _files(cache)
    for wrong, problem in ((other_family, "not a Tyche checkpoint"), (truncated, "cannot read")):
        with pytest.raises(WorkerError, match=problem) as refused:
            logic.import_weights("tyche", str(wrong))
        assert "\n" not in str(refused.value) and refused.value.status == 400
        assert _files(cache) == before  # nothing installed, nothing left behind
    assert not {m["id"]: m for m in logic.models()}["tyche"]["available"]
    with pytest.raises(ValueError, match="no such file"):
        logic.import_weights("tyche", str(tmp_path / "absent.pt"))

    pending = logic.import_weights_async("tyche", str(good))
    info = pending.result(timeout=120)
    assert info["model"] == "tyche" and info["verified"] is False
    assert Path(info["path"]).read_bytes() == good.read_bytes() and Path(info["path"]).is_relative_to(cache)
    assert {m["id"]: m for m in info["models"]}["tyche"]["available"]  # the cards, listed again
    with pytest.raises(WorkerError, match="already installed"):
        logic.import_weights("tyche", str(good))
    assert logic.import_weights("tyche", str(good), replace=True)["model"] == "tyche"


def test_tyche_candidates_become_segmentation_nodes_of_their_own(worker_with_own_cache, scene, case):
    from reference_fixtures import TYCHE_CENTRED, official_checkpoint

    from FMSegCore.engines.incontext.session import InContextSession, InContextSettings
    from FMSegCore.engines.incontext.support import SupportSet, example_from_arrays
    from FMSegCore.io.labelmap import SegmentInfo

    logic, _ = worker_with_own_cache
    logic.client.import_weights("tyche", official_checkpoint("tyche", shifts=TYCHE_CENTRED))
    image, labels, names = case
    liver = np.flatnonzero((labels == names["liver"]).any(axis=(1, 2)))
    support_slices, query_slices = liver[::6][:5], liver[len(liver) // 2 + 1: len(liver) // 2 + 3]
    support = _pair(scene, image, labels, names, support_slices, ["liver"], "tyche support")
    query_node, query_volume = add_oblique_volume(image.array[query_slices], image.spacing, "tyche query")
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tyche result")
    result = logic.run_incontext(query_node, target, [support], support_size=2, model="tyche", candidates=2,
                                 match="index")

    nodes = result["candidate_nodes"]
    assert [node.GetName() for node in nodes] == ["tyche result candidate 1", "tyche result candidate 2"]
    example = example_from_arrays(image.array[support_slices], (labels[support_slices] == names["liver"]).astype(int),
                                  [SegmentInfo(1, "liver", (0.8, 0.3, 0.2))])
    expected = InContextSession(load_model("tyche", "cpu"), SupportSet([example]), [1], axis=2, device="cpu",
                                settings=InContextSettings(support_size=2, candidates=2)
                                ).segment_volume(query_volume.array)
    drawn = [_segment_array(node, "liver", query_node) for node in nodes]
    assert all(np.array_equal(got, want == 1) for got, want in zip(drawn, expected.candidates))
    assert drawn[0].any() and (drawn[0] != drawn[1]).any()  # two plausible, different segmentations
    assert np.array_equal(_segment_array(target, "liver", query_node), expected.labels == 1)
    for node in nodes:
        segment = node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName("liver"))
        assert np.allclose(segment.GetColor(), (0.8, 0.3, 0.2))  # the support's colour
        assert not node.GetDisplayNode().GetVisibility()  # hidden: the result stays readable
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    again = logic.run_incontext(query_node, target, [support], support_size=2, model="tyche", candidates=2,
                                match="index")
    assert again["candidate_nodes"] == nodes and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    plain = logic.run_incontext(query_node, target, [support], support_size=2, model="tyche", match="index")
    assert plain["candidate_nodes"] == [] and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count - 2


def test_adaptation_reports_progress_cancels_then_saves_loads_and_segments(logic, scene, case, oblique, tmp_path):
    image, labels, names = case
    kidney = np.flatnonzero((labels == names["kidney_left"]).any(axis=(1, 2)))[::4][:3]
    pair = _pair(scene, image, labels, names, kidney, ["kidney_left"], "case")
    seen, stop = [], {"now": False}

    def progress(update):
        seen.append((update.step, update.total, update.message))

    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "auto")
    pending = logic.adapt_async([pair], mode="auto", method="linear-probe", steps=100_000, batch_size=2,
                                progress=progress, cancel=lambda: stop["now"])
    deadline = time.monotonic() + 300
    while (not seen or seen[-1][0] < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    node, _, volume_labels, volume_names = oblique  # prompting stays interactive while the job trains
    lo, hi = kidney_roi(volume_labels, volume_names, slices=2)
    prompt = logic.prompt_async(node, target, "kidney_left", rois=[roi_on_grid(node, lo, hi, "during")])
    while not prompt.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prompt.done() and not pending.done()
    prompt.result()
    assert logic.undo(target)  # back to the empty segmentation
    stop["now"] = True
    with pytest.raises(Cancelled):
        pending.result(timeout=300)
    assert seen and seen[-1][1] == 100_000 and not logic.adapter.data
    assert "training (linear-probe)" in {message for *_, message in seen}  # the engine's message, via the job

    info = logic.adapt([pair], mode="auto", method="linear-probe", steps=4, batch_size=2)
    assert info["structures"][0]["name"] == "kidney_left"
    path = logic.save_adapter(str(tmp_path / "kidney.pt"))
    with pytest.raises(Exception, match="exists"):
        logic.save_adapter(str(path))
    fresh = FMSegLogic(scene)
    fresh.client, fresh.url = logic.client, logic.client.url  # the same worker, a new panel
    loaded = fresh.load_adapter(str(path))
    assert loaded["method"] == "linear-probe" and loaded["mode"] == "auto"
    ids = fresh.segment_with_adapter(pair[0], target)
    assert [target.GetSegmentation().GetSegment(i).GetName() for i in ids] == ["kidney_left"]


# ------------------------------------------------------------------------------------------------ crash


def test_a_crashed_worker_is_reported_restarted_and_the_scene_is_kept(logic, oblique):
    node, _, labels, names = oblique
    lo, hi = kidney_roi(labels, names, slices=2)
    roi = roi_on_grid(node, lo, hi, "crash roi")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "crash")
    logic.prompt(node, segmentation, "kidney_left", rois=[roi])
    before = _segment_array(segmentation, "kidney_left", node)
    os.kill(logic.local.process.pid, signal.SIGKILL)
    logic.local.process.wait(10)
    with pytest.raises(WorkerCrashed, match="exit code -9.*restarted"):
        logic.prompt(node, segmentation, "kidney_left", rois=[roi])
    assert np.array_equal(_segment_array(segmentation, "kidney_left", node), before)
    assert logic.local.running
    logic.prompt(node, segmentation, "kidney_left", rois=[roi])  # the volume is sent again by itself
    assert np.array_equal(_segment_array(segmentation, "kidney_left", node), before)


def test_a_remote_worker_is_reached_with_its_url_token_and_the_chosen_device(scene, oblique):
    from worker_fixtures import TOKEN, running_worker

    node, _, labels, names = oblique
    lo, hi = kidney_roi(labels, names, slices=2)
    with running_worker() as server:
        remote = FMSegLogic(scene)
        with pytest.raises(Exception, match="token"):
            remote.connect(server.url, "wrong-token")
        info = remote.connect(server.url, TOKEN, device="cpu")
        assert info["device"] == "cpu" and remote.local is None
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "remote")
        assert not np.shares_memory(remote._volume_data(node)[0], slicer.util.arrayFromVolume(node))  # to send
        remote.prompt(node, segmentation, "kidney_left", rois=[roi_on_grid(node, lo, hi, "remote roi")])
        # sent: later prompts no longer copy the volume on the GUI thread
        assert np.shares_memory(remote._volume_data(node)[0], slicer.util.arrayFromVolume(node))
        (entry,) = server.service.sessions.values()
        assert str(entry.session.device) == "cpu"
        assert len(server.service.volumes) == 1  # sent once
        remote.prompt(node, segmentation, "kidney_left", rois=[roi_on_grid(node, lo, hi, "remote roi 2")])
        assert len(server.service.volumes) == 1 and len(server.service.sessions) == 1
        remote.shutdown()
        assert server.service.info()["version"]  # disconnecting leaves a remote worker running


def test_the_worker_python_is_the_environment_variable_else_slicers_own_else_this_one(monkeypatch, tmp_path):
    import sys
    import types

    from FMSegSlicerLib.logic import default_worker_python

    monkeypatch.delenv("FMSEG_WORKER_PYTHON", raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(), raising=False)
    assert default_worker_python() == sys.executable
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "PythonSlicer").write_text("#!/bin/sh\n")
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(slicerHome=str(tmp_path)), raising=False)
    assert default_worker_python() == str(tmp_path / "bin" / "PythonSlicer")
    monkeypatch.setenv("FMSEG_WORKER_PYTHON", "/opt/fmseg-worker/bin/python")
    assert default_worker_python() == "/opt/fmseg-worker/bin/python"
