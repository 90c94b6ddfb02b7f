"""A per-model memo for the fingerprints: tensors read and values derived from them, least recently used
first out, bounded by a byte budget, with counters of what was read and what the memo served.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch

MEMO_BYTES_ENV = "MODELKIN_FINGERPRINT_MEMO_BYTES"


def default_budget() -> int:
    """Bytes one model's memo may hold: $MODELKIN_FINGERPRINT_MEMO_BYTES, else 1 GiB capped at RAM / 8."""
    env = os.environ.get(MEMO_BYTES_ENV)
    if env:
        return max(0, int(float(env)))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return min(1 << 30, ram // 8)


def size_of(value: Any) -> int:
    """Bytes a memoised value holds (tensors and arrays exactly, containers summed, other values 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(size_of(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(size_of(v) for v in value)
    return 0


class Memo:
    """Values by key, evicted least-recently-used first once their bytes exceed ``budget``.

    A value larger than the budget is returned but not kept. ``stats`` counts hits, misses, evictions
    and the bytes held now.
    """

    def __init__(self, budget: int | None = None):
        self.budget = default_budget() if budget is None else int(budget)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.held = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value for ``key``, made by ``make()`` on a miss (and kept if it fits)."""
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return found[0]
        self.misses += 1
        value = make()
        self.put(key, value)
        return value

    def peek(self, key: Hashable) -> Any:
        """The value held for ``key`` (counted as a hit), or None."""
        found = self._items.get(key)
        if found is None:
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return found[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = size_of(value)
        if size > self.budget:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.held -= old[1]
        self._items[key] = (value, size)
        self.held += size
        while self.held > self.budget:
            _, (_, freed) = self._items.popitem(last=False)
            self.held -= freed
            self.evictions += 1

    def clear(self) -> None:
        self._items.clear()
        self.held = 0

    def __len__(self) -> int:
        return len(self._items)
