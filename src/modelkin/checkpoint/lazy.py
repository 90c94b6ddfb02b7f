"""Tensors not read yet: ``LazyTensor`` (shape, reader, source names), name -> LazyTensor ``StateDict``s,
and ``cat``, which joins them without reading; narrowing reads only the slice where the source can.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True, slots=True)
class LazyTensor:
    """A tensor not read yet: its shape, how to read it, and the checkpoint names it comes from."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    sources: tuple[str, ...]
    nbytes: int = 0
    # (dim, start, stop) -> a LazyTensor that reads only that slice; None: read whole, then narrow
    slicer: Callable[[int, int, int], LazyTensor] | None = None

    def narrow(self, dim: int, start: int, stop: int) -> LazyTensor:
        """Elements ``start:stop`` along ``dim`` (tensor-/expert-parallel shards), still unread.

        Reads only the slice where the source can (safetensors, and stacks/cats of such tensors);
        otherwise the whole tensor is read and then narrowed.
        """
        dim %= len(self.shape)
        if start == 0 and stop == self.shape[dim]:
            return self
        if self.slicer is not None:
            return self.slicer(dim, start, stop)
        shape = narrowed(self.shape, dim, start, stop)

        def load() -> torch.Tensor:  # clone: a view would keep the whole tensor alive in the parameter
            return self.load().narrow(dim, start, stop - start).clone()

        return LazyTensor(shape, load, self.sources, self.nbytes)


StateDict = dict[str, LazyTensor]


def narrowed(shape: tuple[int, ...], dim: int, start: int, stop: int) -> tuple[int, ...]:
    """``shape`` with ``dim`` cut to ``start:stop``."""
    return (*shape[:dim], stop - start, *shape[dim + 1 :])


def cat(parts: list[LazyTensor], dim: int = 0) -> LazyTensor:
    """One LazyTensor concatenating ``parts`` along ``dim`` (e.g. an expert's gate and up rows).

    Narrowing it along ``dim`` reads only the parts (and rows of parts) in range.
    """
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)

    def slicer(d: int, start: int, stop: int) -> LazyTensor:
        if d != dim:
            return cat([p.narrow(d, start, stop) for p in parts], dim)
        picked, offset = [], 0
        for p in parts:
            size = p.shape[dim]
            lo, hi = max(start - offset, 0), min(stop - offset, size)
            if lo < hi:
                picked.append(p.narrow(dim, lo, hi))
            offset += size
        return picked[0] if len(picked) == 1 else cat(picked, dim)

    return LazyTensor(
        tuple(shape),
        lambda: torch.cat([p.load() for p in parts], dim=dim),
        tuple(s for p in parts for s in p.sources),
        sum(p.nbytes for p in parts),
        slicer,
    )
