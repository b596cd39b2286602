"""Scribbles and lassos as prompt types: sampling, checks, rasterising on a slice, the slicing axis they give a
2-D model, and a 3-D session taking them as the points sampled along them (SAM-Med3D's official layout)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from FMSegCore.preprocessing.slicing import get_slice, in_plane_axes
from FMSegCore.prompts import (
    BoxPrompt,
    CurvePrompt,
    PointPrompt,
    SegmentPrompts,
    curve_problem,
    in_plane,
    off_slice_problem,
    rasterise_curve,
    slicing_axis,
)


def test_points_are_sampled_evenly_in_millimetres_with_both_ends():
    scribble = CurvePrompt(((0.0, 0.0, 5.0), (10.0, 0.0, 5.0)))
    points = scribble.sample(spacing=(2.0, 1.0, 3.0), step_mm=5.0)  # 20 mm long: 5 points 5 mm apart
    assert [p.ijk for p in points] == [(i, 0.0, 5.0) for i in (0.0, 2.5, 5.0, 7.5, 10.0)]
    assert all(p.include for p in points)
    capped = CurvePrompt(scribble.points, include=False).sample(spacing=(2.0, 1.0, 3.0), step_mm=1.0, max_points=4)
    assert len(capped) == 4 and capped[-1].ijk == (10.0, 0.0, 5.0) and not any(p.include for p in capped)


def test_a_lasso_is_sampled_round_its_closing_side_too():
    square = CurvePrompt(((0.0, 0.0, 1.0), (4.0, 0.0, 1.0), (4.0, 4.0, 1.0), (0.0, 4.0, 1.0)), closed=True)
    points = [p.ijk for p in square.sample(step_mm=2.0)]  # 16 voxels round: 8 points, no point twice
    assert len(points) == 8 and (0.0, 2.0, 1.0) in points and len(set(points)) == 8


@pytest.mark.parametrize("points, closed, words", [
    ([], False, "has 0"),
    ([(1, 2, 3)], False, "at least 2 distinct control points, this one has 1"),
    ([(1, 2, 3), (1, 2, 3)], False, "has 1"),
    ([(1, 2, 3), (4, 2, 3)], True, "at least 3"),
    ([(0, 0, 0), (1, 1, 1), (3, 3, 3)], True, "encloses no area"),
])
def test_unusable_curves_say_why(points, closed, words):
    assert words in curve_problem(points, closed)


def test_usable_curves_pass_whatever_their_units():
    assert curve_problem([(1, 2, 3), (1, 2, 3.5)], False) is None
    assert curve_problem([(0, 0, 0), (100, 0, 0), (100, 0.5, 0)], True) is None


def test_in_plane_axes_are_the_engines_own():
    for axis in range(3):
        assert in_plane(axis) == in_plane_axes(axis)


def test_a_scribble_is_drawn_connected_through_its_control_points():
    scribble = CurvePrompt(((2.0, 3.0, 7.2), (14.0, 9.0, 6.9), (5.0, 17.0, 7.0)))
    drawn = rasterise_curve(scribble, 2, (20, 16))  # rows J, columns I
    assert drawn[3, 2] and drawn[9, 14] and drawn[17, 5]
    _, parts = ndimage.label(drawn, structure=np.ones((3, 3)))
    assert parts == 1 and drawn.sum() < 40  # one thin stroke
    outside = rasterise_curve(CurvePrompt(((-5.0, -5.0, 0.0), (3.0, 3.0, 0.0))), 2, (20, 16))
    assert outside[0, 0] and outside[3, 3] and outside.sum() == 4  # clipped to the slice


def test_a_lasso_is_filled_and_follows_each_slicing_axis():
    # A square on a sagittal slice (I = 4): rows K, columns J.
    lasso = CurvePrompt(((4.0, 2.0, 3.0), (4.0, 12.0, 3.0), (4.0, 12.0, 9.0), (4.0, 2.0, 9.0)), closed=True)
    assert lasso.slice_index(0) == 4 and lasso.slice_axis() == 0
    filled = rasterise_curve(lasso, 0, (16, 20))
    expected = np.zeros((16, 20), bool)
    expected[3:10, 2:13] = True
    assert np.array_equal(filled, expected)
    # The same mask where the engines' get_slice puts that slice.
    volume = np.zeros((16, 20, 8), bool)
    get_slice(volume, 0, 4)[...] = filled
    assert volume[3:10, 2:13, 4].all() and volume.sum() == expected.sum()
    triangle = CurvePrompt(((0.0, 0.0, 1.0), (10.0, 0.0, 1.0), (0.0, 10.0, 1.0)), closed=True)
    area = rasterise_curve(triangle, 2, (12, 12)).sum()
    assert 50 <= area <= 50 + 11 + 11 + 15  # the triangle's 50 voxels plus its outline


def test_a_segment_is_sliced_along_the_axis_its_curves_and_boxes_lie_flat_on():
    coronal = CurvePrompt(((1.0, 5.2, 2.0), (9.0, 4.9, 6.0)))
    axial = CurvePrompt(((1.0, 2.0, 3.0), (9.0, 6.0, 3.0)))
    assert slicing_axis(SegmentPrompts("a", curves=[coronal]), default=2) == 1
    assert slicing_axis(SegmentPrompts("a", curves=[axial], boxes=[BoxPrompt((0, 0, 3), (5, 5, 3))]), 2) == 2
    assert slicing_axis(SegmentPrompts("a", curves=[coronal, axial]), 2) == 2  # no common axis: the default
    assert slicing_axis(SegmentPrompts("a", points=[PointPrompt((1, 1, 1))]), 0) == 0
    line = CurvePrompt(((1.0, 5.0, 3.0), (9.0, 5.0, 3.0)))  # flat on J and on K: the default when it is one
    assert slicing_axis(SegmentPrompts("a", curves=[line]), 1) == 1 and slicing_axis(SegmentPrompts("a", curves=[line]), 0) == 2
    assert off_slice_problem(axial, 2) is None
    problem = off_slice_problem(CurvePrompt(((1.0, 2.0, 3.0), (9.0, 6.0, 5.5)), label="across"), 2)
    assert "'across'" in problem and "K axis" in problem and "k = 3.0 to 5.5" in problem


def test_exclude_curves_alone_leave_a_segment_empty():
    exclude = CurvePrompt(((1.0, 2.0, 3.0), (9.0, 6.0, 3.0)), include=False)
    assert SegmentPrompts("a", curves=[exclude]).is_empty()
    assert not SegmentPrompts("a", curves=[exclude, CurvePrompt(exclude.points)]).is_empty()


# ---------------------------------------------------------------------------------------------- a 3-D model


@pytest.fixture(scope="module")
def sam_med3d(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from reference_fixtures import official_state_dict

    from FMSegCore.models.sam_med3d import load_sam_med3d

    path = tmp_path_factory.mktemp("sammed3d") / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": official_state_dict("sammed3d")}, path)
    return load_sam_med3d(path)


def test_a_3d_session_takes_a_curve_as_the_points_sampled_along_it(sam_med3d):
    from FMSegCore.engines.prompting.session3d import CURVE_POINTS, CURVE_STEP_MM, PromptSession3D
    from FMSegCore.io.volume import Volume

    k, j, i = np.meshgrid(*(np.arange(n) for n in (40, 48, 56)), indexing="ij")
    ball = (k - 20) ** 2 + (j - 24) ** 2 + (i - 28) ** 2 < 8 ** 2
    volume = Volume(np.where(ball, 200.0, -800.0).astype(np.float32), spacing=(1.5, 1.5, 1.5))
    scribble = CurvePrompt(((22.0, 24.0, 17.0), (28.0, 26.0, 20.0), (33.0, 24.0, 23.0)))  # across slices: fine in 3-D
    lasso = CurvePrompt(((10.0, 10.0, 5.0), (14.0, 10.0, 5.0), (12.0, 14.0, 5.0)), include=False, closed=True)
    session = PromptSession3D(volume, sam_med3d, "cpu")
    expanded = session.curve_points(SegmentPrompts("ball", points=[PointPrompt((28.0, 24.0, 20.0))],
                                                   curves=[scribble, lasso]))
    sampled = scribble.sample(volume.spacing, CURVE_STEP_MM, CURVE_POINTS) + \
        lasso.sample(volume.spacing, CURVE_STEP_MM, CURVE_POINTS)
    assert expanded.points == sampled + [PointPrompt((28.0, 24.0, 20.0))] and not expanded.curves
    assert sum(not p.include for p in expanded.points) == 4  # a 19.4 mm loop: a point every 4.9 mm
    with_curves = session.segment(SegmentPrompts("ball", curves=[scribble, lasso]))
    with_points = session.segment(SegmentPrompts("ball points", points=sampled))
    assert np.array_equal(with_curves, with_points)
    assert session.timings.encoded == 1 and session.timings.decoded == 2  # same crop: encoded once


# ---------------------------------------------------------------------------------------------- the benchmark


def test_the_benchmarks_scribble_and_lasso_lie_on_the_clicks_slice_inside_and_around_the_structure():
    from FMSegCore.bench.interactive_bench import first_prompts, run_protocol

    k, j, i = np.meshgrid(*(np.arange(n) for n in (12, 40, 50)), indexing="ij")
    # A C-shaped structure (a bent tube) whose medial line is no straight segment.
    radius = np.hypot(j - 20, i - 25)
    structure = (np.abs(radius - 12) < 3.5) & (i < 30) & (np.abs(k - 6) < 4)
    prompts = first_prompts("c", structure, ("click", "scribble", "lasso"))
    assert list(prompts) == ["click", "scribble", "lasso"]
    (click,) = prompts["click"].points
    (scribble,) = prompts["scribble"].curves
    (lasso,) = prompts["lasso"].curves
    assert scribble.slice_index(2) == lasso.slice_index(2) == round(click.ijk[2])
    index = scribble.slice_index(2)
    drawn = rasterise_curve(scribble, 2, structure.shape[1:])
    assert (structure[index] & drawn).sum() == drawn.sum() > 15  # inside, along much of the C
    rows = np.flatnonzero(drawn.any(axis=1))
    assert rows.max() - rows.min() > 15
    inside = rasterise_curve(lasso, 2, structure.shape[1:])
    assert (inside & structure[index]).sum() == structure[index].sum() and lasso.closed

    seen = []

    def segment(asked):
        seen.append(asked)
        return structure & (k == index)  # one slice of it: corrective clicks follow

    curve, _ = run_protocol(segment, prompts["scribble"], structure, corrections=2)
    assert len(curve) == 3 and all(asked.curves == [scribble] for asked in seen)
    assert [len(asked.points) for asked in seen] == [0, 1, 2]
