"""Embedding caches: each session's own LRU budget, and a budget shared by every session of a worker."""

from __future__ import annotations

import threading

import torch

from FMSegCore.engines.prompting.embedding_cache import EmbeddingCache, SharedBudget

MB = 1 << 20


def embedding(value: float = 0.0) -> torch.Tensor:
    return torch.full((MB // 4,), value)  # 1 MB of float32


def test_a_cache_keeps_the_most_recently_used_within_its_budget():
    cache = EmbeddingCache(max_bytes=2 * MB)
    cache.put("a", embedding())
    cache.put("b", embedding())
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", embedding())
    assert "b" not in cache and "a" in cache and "c" in cache and cache.bytes == 2 * MB
    assert (cache.hits, cache.misses) == (1, 0) and cache.get("b") is None and cache.misses == 1


def test_caches_on_a_shared_budget_give_up_the_least_recently_used_embedding_of_any_of_them():
    budget = SharedBudget(3 * MB)
    first, second = EmbeddingCache(2 * MB, budget), EmbeddingCache(2 * MB, budget)
    first.put("a1", embedding())
    first.put("a2", embedding())
    second.put("b1", embedding())
    assert budget.bytes == 3 * MB
    first.get("a1")  # a2 is now the oldest of all
    second.put("b2", embedding())
    assert budget.bytes == 3 * MB and "a2" not in first and {"a1"} == {k for k in ("a1", "a2") if k in first}
    assert "b1" in second and "b2" in second
    second.put("b3", embedding())  # its own budget (2 MB) drops b1; the shared one then holds
    assert "b1" not in second and budget.bytes == 3 * MB


def test_a_cache_keeps_its_newest_embedding_even_when_it_alone_exceeds_the_shared_budget():
    budget = SharedBudget(MB // 2)
    cache = EmbeddingCache(8 * MB, budget)
    cache.put("big", embedding())
    assert "big" in cache and budget.bytes == MB


def test_sessions_filling_a_shared_budget_from_threads_stay_within_it():
    budget = SharedBudget(4 * MB)
    caches = [EmbeddingCache(3 * MB, budget) for _ in range(4)]

    def fill(cache: EmbeddingCache, number: int) -> None:
        for index in range(20):
            cache.put((number, index), embedding(index))
            cache.get((number, index // 2))

    threads = [threading.Thread(target=fill, args=(cache, n)) for n, cache in enumerate(caches)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.bytes <= 4 * MB and all(len(cache) >= 1 for cache in caches if cache.bytes)
    assert budget.bytes == sum(cache.bytes for cache in caches)
