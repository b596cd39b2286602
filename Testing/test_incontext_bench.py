"""The in-context benchmark's protocol: query slices inside the structure, supports away from the query."""

from __future__ import annotations

import numpy as np
import pytest

from FMSegCore.bench.incontext_bench import DiceRow, StackedTask, _pool, query_slices, summarise


def test_query_slices_and_support_pool_respect_the_gap():
    mask = np.zeros((40, 8, 8), dtype=bool)
    mask[10:31, 2:6, 2:6] = True
    queries = query_slices(mask, 3)
    assert len(queries) == 3 and all(13 <= q <= 27 for q in queries)
    task = StackedTask("CT", "box", [np.zeros((40, 8, 8), np.float32)], [mask], 0)
    pool = _pool(task, queries[1], gap=2)
    indices = sorted(s.index for s in pool)
    assert all(abs(i - queries[1]) > 2 for i in indices)
    assert indices[0] == 10 and indices[-1] == 30 and len(indices) == 21 - 5


def test_summary_averages_per_family_and_size():
    rows = [DiceRow("CT a", "x", 1, 1.0, 0.8, 0.9, 0.5), DiceRow("CT a", "y", 1, 1.0, 0.6, 0.7, 0.3),
            DiceRow("Brain b", "z", 1, 1.0, 0.4, 0.4, 0.2)]
    summary = summarise(rows)
    assert summary["CT"][1]["dice"] == pytest.approx(0.7) and summary["CT"][1]["dice_baseline"] == pytest.approx(0.4)
    assert summary["Brain"][1]["structures"] == 1
