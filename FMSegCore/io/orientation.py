"""Which voxel axes of a volume run along the patient's L-R, A-P and S-I axes, from its direction matrix."""

from __future__ import annotations

import itertools

import numpy as np


def anatomical_axes(direction: np.ndarray) -> tuple[int, int, int]:
    """The IJK axes that run most nearly along L-R, A-P and S-I, from a direction matrix (columns = I, J, K
    in LPS); each IJK axis is used once, also for oblique volumes."""
    weights = np.abs(np.asarray(direction, dtype=float))
    best = max(itertools.permutations(range(3)), key=lambda p: sum(weights[row, p[row]] for row in range(3)))
    return (int(best[0]), int(best[1]), int(best[2]))
