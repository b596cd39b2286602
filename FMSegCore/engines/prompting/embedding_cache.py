"""A least-recently-used cache of image embeddings with a memory budget."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Optional

import torch


class EmbeddingCache:
    """Embeddings keyed by (axis, slice, window); evicts the least recently used beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        """The cached embedding, or None; counts a hit or a miss."""
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        """Store an embedding, evicting old ones to stay within the budget."""
        if key in self._items:
            self.bytes -= self._nbytes(self._items.pop(key))
        self._items[key] = value
        self.bytes += self._nbytes(value)
        while self.bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.bytes -= self._nbytes(old)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    @staticmethod
    def _nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()
