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


def test_a_part_run_keeps_the_figures_it_does_not_measure_again():
    from FMSegCore.cli.bench_adapt import kept_figures

    earlier = {"cross": [{"scenario": "fov_shift", "method": "decoder"}, {"scenario": "brain_cross", "method": "decoder"}],
               "timing": [{"method": "decoder"}, {"method": "lora"}], "timing_superseded": [{"method": "x"}],
               "seconds": 12.0}
    brain = kept_figures(earlier, "brain", None)
    assert [c["scenario"] for c in brain["cross"]] == ["fov_shift"] and len(brain["timing"]) == 2
    timing = kept_figures(earlier, "timing", ["lora"])
    assert len(timing["cross"]) == 2 and [c["method"] for c in timing["timing"]] == ["decoder"]
    assert kept_figures(earlier, "timing", None)["timing"] == []
    assert [c["method"] for c in kept_figures(earlier, "dev", ["decoder"])["timing"]] == ["lora"]
    scenarios = kept_figures(earlier, "scenarios", None)
    assert "cross" not in scenarios and len(scenarios["timing"]) == 2
    assert all(part["timing_superseded"] == [{"method": "x"}] for part in (brain, timing, scenarios))
    assert "seconds" not in brain
