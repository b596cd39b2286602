"""Tilted ROIs: a ROI tilted about the left-right axis around a structure, prompted as the ROI's own extent on each
slice (its corners kept) and as the box enclosing it, compared by Dice against the reference labels."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from FMSegCore.bench.metrics import dice
from FMSegCore.io.volume import Volume
from FMSegCore.prompts import CORNER_SIGNS, BoxPrompt, SegmentPrompts, box_from_corners


def tilted_roi(image: Volume, mask: np.ndarray, degrees: float, margin_mm: float = 2.0) -> BoxPrompt:
    """The tightest ROI (plus a margin, in mm) around a KJI mask, tilted by ``degrees`` about the L-R axis, as a
    prompt in the image's voxel indices (clipped to the image; the corners kept)."""
    t = math.radians(degrees)
    axes = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])  # columns
    local = image.ijk_to_lps(np.argwhere(mask)[:, ::-1].astype(float)) @ axes
    lo, hi = local.min(axis=0) - margin_mm, local.max(axis=0) + margin_mm
    corners_local = (lo + hi) / 2 + CORNER_SIGNS * (hi - lo) / 2
    roi = box_from_corners(image.lps_to_ijk(corners_local @ axes.T))
    top = np.asarray(image.shape_ijk) - 1.0
    return BoxPrompt(tuple(np.clip(roi.lo, 0, top)), tuple(np.clip(roi.hi, 0, top)), roi.corners)


def run_roi_bench(session: Any, image: Volume, labels: np.ndarray, names: dict[int, str], structures: list[str],
                  angles: list[float], progress=print) -> list[dict[str, Any]]:
    """Dice of each structure and tilt, per slice extent vs enclosing box."""
    by_name = {name: value for value, name in names.items()}
    rows = []
    for structure in structures:
        truth = labels == by_name[structure]
        for degrees in angles:
            roi = tilted_roi(image, truth, degrees)
            row = {"structure": structure, "degrees": degrees}
            for kind, box in (("per_slice", roi), ("enclosing", BoxPrompt(roi.lo, roi.hi))):
                mask = session.segment(SegmentPrompts(f"{structure} {degrees} {kind}", [box]))
                row[kind] = round(dice(mask, truth), 3)
            rows.append(row)
            progress(f"{structure:<12} {degrees:>4.0f} deg  per-slice extent {row['per_slice']:.3f}  "
                     f"enclosing box {row['enclosing']:.3f}")
    return rows
