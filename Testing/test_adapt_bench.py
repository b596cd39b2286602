"""The adaptation benchmark's protocol: training slices spread over the structures, test slices held out."""

from __future__ import annotations

import numpy as np
import pytest

from FMSegCore.bench.adapt_bench import load_dataset, slice_cases, split


@pytest.mark.parametrize("dataset", ["ct", "mr"])
@pytest.mark.parametrize("shots", [1, 5, 10])
def test_training_and_test_slices_are_disjoint_and_cover_the_structures(dataset, shots):
    case, structures = load_dataset(dataset)
    data = split(case, structures, shots)
    assert len(data.train) == shots
    assert not set(data.train) & set(data.test)
    values = [case.value_of(s.name) for s in structures]
    for index in data.train + data.test:
        assert np.isin(case.slice(index)[1], values).any()  # every slice shows some structure
    extent = sorted(data.train + data.test)
    assert extent == list(range(extent[0], extent[-1] + 1))  # one contiguous extent, split
    if shots > 1:
        assert data.train[0] > extent[0] and data.train[-1] < extent[-1]  # spread inside it, not at its ends
    cases = slice_cases(case, data.train)
    assert [c.image.ndim for c in cases] == [2] * shots
    assert all(c.value_of("liver") == case.value_of("liver") for c in cases)  # the volume's label set
