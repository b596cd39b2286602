"""One label map from per-class probabilities: each voxel takes the most probable class at or above a threshold
(ties: the class given first). The one rule behind in-context, aligned in-context and automatic label maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class LabelVote:
    """Classes arrive one at a time (so a caller never holds every class's probabilities at once)."""

    def __init__(self, shape: tuple[int, ...], threshold: float, dtype: type = np.int32) -> None:
        self.labels = np.zeros(shape, dtype=dtype)
        self._best = np.zeros(shape, dtype=np.float32)
        self.threshold = threshold

    def add(self, value: int, probability: np.ndarray) -> None:
        wins = (probability >= self.threshold) & (probability > self._best)
        self.labels[wins] = value
        self._best = np.where(wins, probability, self._best)


def most_probable(probabilities: Mapping[int, np.ndarray], shape: tuple[int, ...], threshold: float) -> np.ndarray:
    """Label map (int32) from ``{label value: probability}``."""
    vote = LabelVote(shape, threshold)
    for value, probability in probabilities.items():
        vote.add(value, probability)
    return vote.labels


def labels_from_probabilities(probabilities: np.ndarray, values: Sequence[int], threshold: float = 0.5) -> np.ndarray:
    """Label map (uint16) from per-structure probabilities (K, ...) and the structures' label values."""
    vote = LabelVote(probabilities.shape[1:], threshold, np.uint16)
    for value, probability in zip(values, probabilities):
        vote.add(int(value), probability)
    return vote.labels
