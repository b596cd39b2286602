"""Corrections of an in-context result with prompts on query slices, for interactive in-context models
(MultiverSeg): include and exclude clicks and scribbles, lassos and 2-D boxes, named by the class they correct.

Each slice that holds prompts of a class is predicted again with them and with the previous probability there as
the model's mask input; the class probabilities are then voted into a new label map. Other slices are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from FMSegCore.engines.incontext.session import InContextResult, InContextSession, SlicePromptMasks
from FMSegCore.engines.label_vote import LabelVote
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SegmentInfo
from FMSegCore.preprocessing.slicing import get_slice, in_plane_axes, put_slice
from FMSegCore.prompts import SegmentPrompts, off_slice_problem, rasterise_curve


def slice_masks(prompts: SegmentPrompts, axis: int, shape_kji: tuple[int, ...]) -> dict[int, SlicePromptMasks]:
    """The segment's prompts as masks per slice index along IJK ``axis``; a curve or box not lying on one slice
    is a one-line :class:`InputError`."""
    rows, cols = in_plane_axes(axis)
    shape_rc = (shape_kji[2 - rows], shape_kji[2 - cols])
    count = shape_kji[2 - axis]
    masks: dict[int, SlicePromptMasks] = {}

    def on(index: int, where: str) -> SlicePromptMasks:
        if not 0 <= index < count:
            raise InputError(where, f"lies on slice {index}, outside the query's 0..{count - 1}")
        if index not in masks:
            masks[index] = SlicePromptMasks(*(np.zeros(shape_rc, dtype=bool) for _ in range(3)))
        return masks[index]

    for point in prompts.points:
        r, c = int(round(point.ijk[rows])), int(round(point.ijk[cols]))
        target = on(int(round(point.ijk[axis])), f"{'include' if point.include else 'exclude'} point of "
                                                  f"{prompts.name}")
        if 0 <= r < shape_rc[0] and 0 <= c < shape_rc[1]:
            (target.include if point.include else target.exclude)[r, c] = True
    for curve in prompts.curves:
        problem = off_slice_problem(curve, axis)
        if problem:
            raise InputError(curve.source, problem)
        target = on(curve.slice_index(axis) or 0, curve.describe())
        drawn = rasterise_curve(curve, axis, shape_rc)
        if curve.include:
            target.include |= drawn
        else:
            target.exclude |= drawn
    for box in prompts.boxes:
        if box.extent[axis] > 1.0:
            raise InputError(None, f"a box of {prompts.name} spans several slices: corrections take 2-D boxes")
        target = on(int(round((box.lo[axis] + box.hi[axis]) / 2)), f"box of {prompts.name}")
        r0, r1 = sorted((int(round(box.lo[rows])), int(round(box.hi[rows]))))
        c0, c1 = sorted((int(round(box.lo[cols])), int(round(box.hi[cols]))))
        target.box[max(r0, 0):r1 + 1, max(c0, 0):c1 + 1] = True
    return masks


def check_corrections(prompts: Sequence[SegmentPrompts], classes: Sequence[SegmentInfo], axis: int,
                      shape_kji: tuple[int, ...]) -> dict[str, int]:
    """Each prompted segment's class value; a name that is no class, or a prompt off the slices, is a one-line
    :class:`InputError` (check before any work)."""
    by_name = {segment.name.lower(): segment.value for segment in classes}
    missing = [p.name for p in prompts if p.name.lower() not in by_name]
    if missing:
        raise InputError(None, f"corrections name {', '.join(repr(m) for m in missing)}, not a class being "
                               f"segmented ({', '.join(s.name for s in classes)})")
    for segment_prompts in prompts:
        slice_masks(segment_prompts, axis, shape_kji)
    return {p.name: by_name[p.name.lower()] for p in prompts}


def correct_result(session: InContextSession, image: np.ndarray, result: InContextResult,
                   prompts: Sequence[SegmentPrompts]) -> int:
    """Correct ``result`` (made by ``session`` on the normalised query ``image`` with its probabilities kept) in
    place with the prompts of each named class; returns the number of slices predicted again."""
    values = check_corrections(prompts, result.segments, session.axis, image.shape)
    if not all(segment.value in result.probabilities for segment in result.segments):
        raise ValueError("the result must keep its probabilities (keep_probabilities=True)")
    corrected = 0
    for segment_prompts in prompts:
        value = values[segment_prompts.name]
        probability = result.probabilities[value]
        for index, masks in sorted(slice_masks(segment_prompts, session.axis, image.shape).items()):
            previous = np.array(get_slice(probability, session.axis, index))
            put_slice(probability, session.axis, index, session.correct_slice(image, index, value, masks, previous))
            corrected += 1
    vote = LabelVote(image.shape, session.settings.threshold)
    for segment in result.segments:
        vote.add(segment.value, result.probabilities[segment.value])
    result.labels[...] = vote.labels
    return corrected
