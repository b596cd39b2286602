"""Least-recently-used caches of image embeddings, each with its own memory budget and, optionally, a budget shared
by several (the worker's sessions): beyond the shared budget the least recently used embedding of any of them goes.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from typing import Optional

import torch

_STAMPS = itertools.count()


class SharedBudget:
    """A memory budget several caches draw on (e.g. every prompt session of a worker, on one device)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._caches: weakref.WeakSet[EmbeddingCache] = weakref.WeakSet()
        self.lock = threading.RLock()

    def register(self, cache: EmbeddingCache) -> None:
        with self.lock:
            self._caches.add(cache)

    @property
    def bytes(self) -> int:
        """Bytes held by every cache on this budget."""
        with self.lock:
            return sum(cache.bytes for cache in list(self._caches))

    def reclaim(self, keep: EmbeddingCache) -> None:
        """Evict least recently used embeddings (any cache's) until the budget holds; ``keep``'s newest stays."""
        with self.lock:
            while self.bytes > self.max_bytes:
                candidates = [c for c in list(self._caches) if len(c) > (1 if c is keep else 0)]
                if not candidates:
                    return
                min(candidates, key=lambda c: c.oldest_stamp()).evict_oldest()


class EmbeddingCache:
    """Embeddings keyed by (axis, slice, window) or crop; evicts the least recently used beyond ``max_bytes``
    (and beyond the ``budget`` shared with other caches, if given)."""

    def __init__(self, max_bytes: int = 2 << 30, budget: Optional[SharedBudget] = None) -> None:
        self.max_bytes = int(max_bytes)
        self.budget = budget
        self._items: OrderedDict[Hashable, tuple[torch.Tensor, int]] = OrderedDict()
        self._lock = threading.RLock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        if budget is not None:
            budget.register(self)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def keys(self) -> list[Hashable]:
        """The cached keys, oldest use first (a snapshot)."""
        with self._lock:
            return list(self._items)

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        """The cached embedding, or None; counts a hit or a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items[key] = (item[0], next(_STAMPS))
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        """Store an embedding, evicting old ones to stay within the budgets."""
        with self._lock:
            if key in self._items:
                self.bytes -= self._nbytes(self._items.pop(key)[0])
            self._items[key] = (value, next(_STAMPS))
            self.bytes += self._nbytes(value)
            while self.bytes > self.max_bytes and len(self._items) > 1:
                self.evict_oldest()
        if self.budget is not None:
            self.budget.reclaim(keep=self)

    def oldest_stamp(self) -> float:
        """When the least recently used embedding was last used (a global counter); inf when empty."""
        with self._lock:
            return next(iter(self._items.values()))[1] if self._items else float("inf")

    def evict_oldest(self) -> None:
        with self._lock:
            if self._items:
                _, (old, _stamp) = self._items.popitem(last=False)
                self.bytes -= self._nbytes(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    @staticmethod
    def _nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()
