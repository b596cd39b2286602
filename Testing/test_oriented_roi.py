"""ROIs not aligned with the voxel grid (oblique volumes, rotated ROIs): their extent on each slice, and the
prompt session keeping to it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from worker_fixtures import ct_case

from FMSegCore.bench.roi_bench import tilted_roi
from FMSegCore.engines.prompting.session import PromptSession
from FMSegCore.models.factory import load_model
from FMSegCore.prompts import CORNER_SIGNS, BoxPrompt, SegmentPrompts, box_from_corners


def _tilted_box(size, degrees, centre):
    """Corners (IJK) of a box of ``size`` voxels tilted by ``degrees`` about the I axis, in product order."""
    t = math.radians(degrees)
    rotation = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    return (CORNER_SIGNS * 0.5 * np.asarray(size)) @ rotation.T + centre


def test_aligned_corners_give_a_plain_box_and_tilted_ones_keep_their_corners():
    aligned = box_from_corners(_tilted_box((10, 20, 6), 0.0, (50, 50, 10)))
    assert aligned.corners is None and aligned.lo == (45.0, 40.0, 7.0) and aligned.hi == (55.0, 60.0, 13.0)
    assert aligned.section(2, 7) is not None and aligned.section(2, 14) is None
    tilted = box_from_corners(_tilted_box((10, 20, 6), 30.0, (50, 50, 10)))
    assert tilted.corners is not None and len(tilted.corners) == 8


def test_the_section_of_a_tilted_box_follows_its_slope():
    size, degrees, centre = np.array([10.0, 20.0, 6.0]), 30.0, np.array([50.0, 50.0, 10.0])
    box = box_from_corners(_tilted_box(size, degrees, centre))
    t = math.radians(degrees)
    for k in range(int(np.ceil(box.lo[2])), int(np.floor(box.hi[2])) + 1):
        lo, hi = box.section(2, k)
        assert lo[2] == hi[2] == k and (lo[0], hi[0]) == pytest.approx((45.0, 55.0))
        # the box's j extent over the slab k +- 0.5: sample it densely in the box's own frame
        u = np.array(list(itertools.product(np.linspace(-0.5, 0.5, 41), repeat=2)))
        local = np.c_[np.zeros(len(u)), u[:, 0] * size[1], u[:, 1] * size[2]]
        j = centre[1] + local[:, 1] * math.cos(t) - local[:, 2] * math.sin(t)
        kk = centre[2] + local[:, 1] * math.sin(t) + local[:, 2] * math.cos(t)
        inside = np.abs(kk - k) <= 0.5
        assert lo[1] <= j[inside].min() + 1e-9 and hi[1] >= j[inside].max() - 1e-9
        assert hi[1] - lo[1] < box.hi[1] - box.lo[1] - 2  # much tighter than the enclosing box
    assert box.section(2, int(np.floor(box.lo[2])) - 1) is None


def test_a_tilted_roi_keeps_each_slice_inside_its_own_section_and_finds_the_kidney():
    image, labels, names = ct_case()
    truth = labels == names["kidney_left"]
    roi = tilted_roi(image, truth, 35.0)
    assert roi.corners is not None
    session = PromptSession(image, load_model("litemedsam", "cpu"), "cpu")
    mask = session.segment(SegmentPrompts("kidney", [roi]))
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9  # 0.95 measured (enclosing box: 0.80)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        section = roi.section(2, int(k))
        assert section is not None
        rows = np.flatnonzero(mask[k].any(axis=1))
        assert rows.min() >= np.floor(section[0][1]) and rows.max() <= np.ceil(section[1][1])
    plain = session.segment(SegmentPrompts("kidney plain", [BoxPrompt(roi.lo, roi.hi)]))
    assert plain.sum() > mask.sum()  # the enclosing box lets more in
