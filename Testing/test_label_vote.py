"""The one rule that turns per-class probabilities into a label map (in-context, aligned, automatic)."""

from __future__ import annotations

import numpy as np

from FMSegCore.engines.label_vote import LabelVote, labels_from_probabilities, most_probable


def test_each_voxel_takes_the_most_probable_class_at_or_above_the_threshold():
    rng = np.random.default_rng(3)
    probabilities = rng.random((3, 6, 7)).astype(np.float32)
    values = [4, 9, 2]
    labels = labels_from_probabilities(probabilities, values, threshold=0.6)
    for index in np.ndindex(6, 7):
        column = probabilities[(slice(None), *index)]
        expected = values[int(column.argmax())] if column.max() >= 0.6 else 0
        assert labels[index] == expected
    assert labels.dtype == np.uint16
    as_dict = most_probable(dict(zip(values, probabilities)), (6, 7), 0.6)
    assert np.array_equal(as_dict, labels) and as_dict.dtype == np.int32


def test_ties_keep_the_class_given_first_and_below_threshold_is_background():
    vote = LabelVote((2,), threshold=0.5)
    vote.add(1, np.array([0.7, 0.4]))
    vote.add(2, np.array([0.7, 0.49]))
    assert vote.labels.tolist() == [1, 0]
    vote.add(3, np.array([0.71, 0.5]))
    assert vote.labels.tolist() == [3, 3]
