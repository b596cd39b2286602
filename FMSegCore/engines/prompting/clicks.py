"""Corrective clicks on one slice: make include and exclude clicks binding on a mask."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: A click on a slice: row, column and whether it includes (True) or excludes (False).
Click = tuple[float, float, bool]


def refine_with_clicks(previous: np.ndarray, proposal: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
    """Combine a slice's mask with the model's answer to corrective clicks, so that each click does what it says.

    An include click adds the proposal's region around it. An exclude click removes the region under it when
    that is a stray part (under half the mask); when it lies in the main body, the proposal (which saw the
    click) reshapes that body, unless the proposal dropped most of it: then only the largest disc around the
    click is removed.
    """
    result = previous.copy()
    height, width = result.shape
    inside = [(int(round(r)), int(round(c)), inc) for r, c, inc in clicks
              if 0 <= round(r) < height and 0 <= round(c) < width]
    proposal_parts, _ = ndimage.label(proposal)
    for r, c, include in inside:
        if include and proposal_parts[r, c]:
            result |= proposal_parts == proposal_parts[r, c]
        elif include:
            result[r, c] = True
    for r, c, include in inside:
        if include or not result[r, c]:
            continue
        parts, _ = ndimage.label(result)
        part = parts == parts[r, c]
        if part.sum() < 0.5 * result.sum():
            result &= ~part
        elif (result & proposal).sum() >= 0.5 * result.sum():
            result = apply_clicks(result & proposal, [(r, c, False)])
        else:  # the model dropped most of the structure: remove only the largest disc around the click
            radius = ndimage.distance_transform_edt(result)[r, c] + 1
            rows, cols = np.ogrid[:height, :width]
            result &= (rows - r) ** 2 + (cols - c) ** 2 > radius ** 2
    return result


def apply_clicks(mask: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
    """Make clicks binding: an exclude click removes the connected region under it; an include click on
    background adds its own small region (the model's answer around it is kept)."""
    if not clicks:
        return mask
    labelled, _ = ndimage.label(mask)
    height, width = mask.shape
    for row, col, include in clicks:
        r, c = int(round(row)), int(round(col))
        if not (0 <= r < height and 0 <= c < width):
            continue
        if not include and labelled[r, c] > 0:
            protected = {labelled[int(round(rr)), int(round(cc))] for rr, cc, inc in clicks if inc
                         and 0 <= int(round(rr)) < height and 0 <= int(round(cc)) < width}
            if labelled[r, c] not in protected:
                mask = mask & (labelled != labelled[r, c])
            else:
                mask = mask.copy()
                mask[r, c] = False
        elif include and not mask[r, c]:
            mask = mask.copy()
            mask[r, c] = True
    return mask
