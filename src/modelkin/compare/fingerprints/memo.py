"""A per-model memo for the fingerprints: tensors read and values derived from them, least recently used
first out, under two byte budgets (memory of its own, and mapped file pages), with hit/miss counters.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch

MEMO_BYTES_ENV = "MODELKIN_FINGERPRINT_MEMO_BYTES"
MAPPED_BYTES_ENV = "MODELKIN_FINGERPRINT_MAPPED_BYTES"


def _ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_budget() -> int:
    """Bytes of its own memory one model's memo may hold: $MODELKIN_FINGERPRINT_MEMO_BYTES, else 1 GiB
    capped at RAM / 8."""
    env = os.environ.get(MEMO_BYTES_ENV)
    return max(0, int(float(env))) if env else min(1 << 30, _ram() // 8)


def default_mapped_budget() -> int:
    """Bytes of mapped checkpoint pages (page cache, reclaimable, not anonymous memory) one model's memo may
    keep mapped: $MODELKIN_FINGERPRINT_MAPPED_BYTES, else RAM / 3."""
    env = os.environ.get(MAPPED_BYTES_ENV)
    return max(0, int(float(env))) if env else _ram() // 3


def size_of(value: Any) -> int:
    """Bytes a memoised value holds (tensors and arrays exactly, containers summed, other values 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(size_of(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):  # plain items (a vocabulary's 49k strings) hold no tensor
        return sum(size_of(v) for v in value if not isinstance(v, (str, bytes, int, float)))
    return 0


class Memo:
    """Values by key, evicted least-recently-used first once their bytes exceed the budget of their kind:
    ``budget`` for values in memory of their own, ``mapped_budget`` for views of mapped file pages.

    A value larger than its budget is returned but not kept. Counters: hits, misses, evictions, and the
    bytes held now (``held``, ``held_mapped``).
    """

    def __init__(self, budget: int | None = None, mapped_budget: int | None = None):
        self.budget = default_budget() if budget is None else int(budget)
        self.mapped_budget = default_mapped_budget() if mapped_budget is None else int(mapped_budget)
        # kept by kind: False = memory of their own, True = views of mapped file pages
        self._items: dict[bool, OrderedDict[Hashable, tuple[Any, int]]] = {False: OrderedDict(),
                                                                           True: OrderedDict()}
        self._held = {False: 0, True: 0}
        self.hits = self.misses = self.evictions = 0

    @property
    def held(self) -> int:
        return self._held[False]

    @property
    def held_mapped(self) -> int:
        return self._held[True]

    def get(self, key: Hashable, make: Callable[[], Any], *, mapped: bool = False) -> Any:
        """The value for ``key``, made by ``make()`` on a miss (and kept if it fits)."""
        found = self.peek(key)
        if found is not None:
            return found
        self.misses += 1
        value = make()
        self.put(key, value, mapped=mapped)
        return value

    def peek(self, key: Hashable) -> Any:
        """The value held for ``key`` (counted as a hit), or None."""
        for items in self._items.values():
            found = items.get(key)
            if found is not None:
                items.move_to_end(key)
                self.hits += 1
                return found[0]
        return None

    def put(self, key: Hashable, value: Any, *, mapped: bool = False) -> None:
        size, budget = size_of(value), self.mapped_budget if mapped else self.budget
        if size > budget:
            return
        items = self._items[mapped]
        old = items.pop(key, None)
        if old is not None:
            self._held[mapped] -= old[1]
        items[key] = (value, size)
        self._held[mapped] += size
        while self._held[mapped] > budget:
            _, (_, freed) = items.popitem(last=False)
            self._held[mapped] -= freed
            self.evictions += 1

    def drop(self, *kinds: str) -> None:
        """Forget the entries whose key is a tuple starting with one of ``kinds`` (e.g. "tensor")."""
        for mapped, items in self._items.items():
            for key in [k for k in items if isinstance(k, tuple) and k and k[0] in kinds]:
                self._held[mapped] -= items.pop(key)[1]

    def clear(self) -> None:
        for items in self._items.values():
            items.clear()
        self._held = {False: 0, True: 0}

    def __len__(self) -> int:
        return sum(len(items) for items in self._items.values())
