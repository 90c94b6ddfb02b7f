"""One-pass, on-device moments of a tensor: chunked sums combined with Chan/Pébay's parallel formulas.

Each chunk is read once from its source buffer; mean and central sums are formed in the accumulation
dtype on the device (the upcast of bf16/fp16 happens inside the device kernels), and chunks are
merged on the host in float64, so tensors of billions of elements stay accurate. On the CPU, 8- and
16-bit tensors are counted by bit pattern instead (inspect/histogram.py): exact, and 1.5x cheaper.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from modelkin.inspect.histogram import PATTERN_DTYPES, PatternCounts

# JSON keys of every statistic, in output order. Moments are over finite values only.
STAT_KEYS = (
    "count", "nan_count", "inf_count", "zero_count", "zero_fraction",
    "mean", "std_population", "std_sample", "rms", "l2_norm",
    "min", "max", "absmax", "skewness", "kurtosis_excess",
)

_SAFE_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
}


@dataclass(frozen=True, slots=True)
class AccumulationPolicy:
    """How a backend accumulates: dtype of per-chunk sums and elements per chunk; `histogram`:
    count 8/16-bit CPU tensors by bit pattern (exact) instead of summing powers."""

    dtype: torch.dtype
    chunk: int
    histogram: bool = False


def policy_for(device: torch.device | str) -> AccumulationPolicy:
    """float64 on CPU and CUDA; float32 chunks of 1M on NPU (its float64 is slow or missing).

    Small fp32 chunks keep each per-chunk sum short; the chunks are then merged in float64. The CPU
    counts bit patterns of 8/16-bit tensors (one bincount pass, cheaper than the float64 sums).
    """
    kind = torch.device(device).type
    if kind == "cpu":
        return AccumulationPolicy(torch.float64, 1 << 18, histogram=True)  # chunk: overhead vs cache
    if kind == "cuda":
        return AccumulationPolicy(torch.float64, 1 << 24)
    return AccumulationPolicy(torch.float32, 1 << 20)


def inspect_threads() -> int:
    """CPU worker threads for the moment kernels: $MODELKIN_INSPECT_THREADS, else one per core
    but one (that core is the reader thread's).

    Each worker runs single-threaded torch on its own part of a tensor: OpenMP teams on small
    chunks stall when the cores are shared with other processes.
    """
    env = os.environ.get("MODELKIN_INSPECT_THREADS")
    if env and env.strip().isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (restored on exit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True, slots=True)
class Moments:
    """Count, mean and central sums M2..M4 of a set of values; merge() is Chan/Pébay's formula."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    def merge(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        na, nb = float(self.n), float(other.n)
        n = na + nb
        d = other.mean - self.mean
        d_n = d / n
        mean = self.mean + d_n * nb
        m2 = self.m2 + other.m2 + d * d_n * na * nb
        m3 = (self.m3 + other.m3 + d * d_n * d_n * na * nb * (na - nb)
              + 3.0 * d_n * (na * other.m2 - nb * self.m2))
        m4 = (self.m4 + other.m4 + d * d_n * d_n * d_n * na * nb * (na * na - na * nb + nb * nb)
              + 6.0 * d_n * d_n * (na * na * other.m2 + nb * nb * self.m2)
              + 4.0 * d_n * (na * other.m3 - nb * self.m3))
        return Moments(self.n + other.n, mean, m2, m3, m4)

    @staticmethod
    def from_shifted_sums(n: int, shift: float, s1: float, s2: float, s3: float, s4: float) -> Moments:
        """Central moments from power sums of (x - shift); exact algebra, small when shift≈mean."""
        if n == 0:
            return Moments()
        a = s1 / n
        m2 = s2 - s1 * a
        m3 = s3 - 3.0 * a * s2 + 2.0 * a * a * s1
        m4 = s4 - 4.0 * a * s3 + 6.0 * a * a * s2 - 3.0 * a * a * a * s1  # a*a*a: inf, not OverflowError
        return Moments(n, shift + a, max(m2, 0.0), m3, max(m4, 0.0))


class StatsAccumulator:
    """Feeds chunks of one tensor (any device) and returns the statistics dict of STAT_KEYS.

    Args:
        policy: accumulation dtype and chunk length (see policy_for).
    """

    def __init__(self, policy: AccumulationPolicy):
        self.policy = policy
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._patterns: dict[torch.dtype, PatternCounts] = {}  # reused across tensors
        self._counted: PatternCounts | None = None  # holds counts not yet folded into the moments
        self.reset()

    def reset(self) -> None:
        if self._counted is not None:
            self._counted.clear()
            self._counted = None
        self.moments = Moments()
        self.numel = 0
        self.nan = 0
        self.inf = 0
        self.zeros = 0
        self.lo = math.inf
        self.hi = -math.inf

    def _bufs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._buffers:
            shape, dt = (self.policy.chunk,), self.policy.dtype
            self._buffers[device] = (torch.empty(shape, dtype=dt, device=device),
                                     torch.empty(shape, dtype=dt, device=device))
        return self._buffers[device]

    def update(self, values: torch.Tensor) -> None:
        """Add the elements of ``values`` (flattened); long inputs are split into policy chunks."""
        flat = values.reshape(-1)
        if flat.dtype not in _SAFE_DTYPES:
            flat = flat.to(torch.uint8) if flat.dtype == torch.bool else flat
        if self.policy.histogram and flat.device.type == "cpu" and flat.dtype in PATTERN_DTYPES:
            self._count(flat.contiguous())
            return
        step = self.policy.chunk
        for start in range(0, flat.numel(), step):
            self._update_chunk(flat[start:start + step])

    def _count(self, flat: torch.Tensor) -> None:
        if self._counted is not None and self._counted.dtype != flat.dtype:
            self.fold()
        if self._counted is None:
            if flat.dtype not in self._patterns:
                self._patterns[flat.dtype] = PatternCounts(flat.dtype)
            self._counted = self._patterns[flat.dtype]
        self._counted.add(flat)
        self.numel += flat.numel()

    def fold(self) -> None:
        """Merge pending bit-pattern counts into the moments and counters (result() calls this)."""
        if self._counted is None:
            return
        n, mean, m2, m3, m4, nan, inf, zeros, lo, hi = self._counted.summary()
        self._counted.clear()
        self._counted = None
        self.moments = self.moments.merge(Moments(n, mean, m2, m3, m4))
        self.nan, self.inf, self.zeros = self.nan + nan, self.inf + inf, self.zeros + zeros
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def _update_chunk(self, c: torch.Tensor) -> None:
        if c.dtype not in _SAFE_DTYPES:  # fp8, uint16/32/64: upcast this chunk on its device
            c = c.to(torch.float32 if c.is_floating_point() else torch.float64)
        n = c.numel()
        self.numel += n
        lo, hi = _extrema(c)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            c, lo, hi = self._drop_nonfinite(c)
            n = c.numel()
            if n == 0:
                return
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        sums = self._central_sums(c, n)
        shift, s2, s3, s4, nonzero = sums.tolist()
        self.zeros += n - int(nonzero)
        # Σ(c - mean(c)) is 0 up to rounding, whose effect on M2..M4 is O(eps²): not computed
        self.moments = self.moments.merge(Moments.from_shifted_sums(n, shift, 0.0, s2, s3, s4))

    def _central_sums(self, c: torch.Tensor, n: int) -> torch.Tensor:
        """[shift, Σy², Σy³, Σy⁴, nonzeros] with y = c - mean(c), in one device->host copy."""
        buf_y, buf_y2 = self._bufs(c.device)
        y = buf_y[:n]
        y.copy_(c)  # the upcast to the accumulation dtype, on c's device
        shift = y.sum() / n
        y.sub_(shift)
        y2 = torch.mul(y, y, out=buf_y2[:n])
        nonzero = _count_nonzero(c).to(device=c.device, dtype=y.dtype)
        if y.dtype == torch.float64:
            s3, s4 = torch.dot(y2, y), torch.dot(y2, y2)
        else:  # BLAS dot accumulates fp32 sequentially; tree reductions keep ~1e-7 over 1M terms
            s3, s4 = (y2 * y).sum(), (y2 * y2).sum()
        return torch.stack([shift, y2.sum(), s3, s4, nonzero])

    def _drop_nonfinite(self, c: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        finite = torch.isfinite(c)
        nan = int(torch.isnan(c).sum())
        kept = int(finite.sum())
        self.nan += nan
        self.inf += c.numel() - kept - nan
        c = c[finite]
        if c.numel() == 0:
            return c, math.inf, -math.inf
        return (c, *_extrema(c))

    def result(self) -> dict[str, Any]:
        """The statistics of everything fed since reset(); NaN where a statistic is undefined."""
        self.fold()
        return finalize(self.moments, numel=self.numel, nan=self.nan, inf=self.inf,
                        zeros=self.zeros, lo=self.lo, hi=self.hi)


_SIGN_MASKS = {torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF),
               torch.float32: (torch.int32, 0x7FFFFFFF), torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF)}


def _extrema(c: torch.Tensor) -> tuple[float, float]:
    """(min, max) in one pass where the device has aminmax; NaN propagates either way."""
    try:
        both = torch.stack(list(torch.aminmax(c))).tolist()
    except (RuntimeError, NotImplementedError):  # devices without aminmax for this dtype
        both = torch.stack([c.min(), c.max()]).tolist()
    return float(both[0]), float(both[1])


class ParallelAccumulator:
    """StatsAccumulator over several host threads: each update is split into contiguous parts,
    one per worker (torch CPU ops release the GIL; each worker runs single-threaded torch), and the
    partial moments are merged with Chan's formula. One worker: a plain StatsAccumulator.
    """

    def __init__(self, policy: AccumulationPolicy, workers: int = 1):
        self.policy = policy
        self.parts = [StatsAccumulator(policy) for _ in range(max(1, workers))]
        self._pool = None
        if len(self.parts) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(len(self.parts), thread_name_prefix="modelkin-stats",
                                            initializer=torch.set_num_threads, initargs=(1,))

    def reset(self) -> None:
        for part in self.parts:
            part.reset()

    def update(self, values: torch.Tensor) -> None:
        flat = values.reshape(-1)
        n, k, chunk = flat.numel(), len(self.parts), self.policy.chunk
        if self._pool is None or n < 2 * chunk:
            self.parts[0].update(flat)
            return
        step = -(-n // (k * chunk)) * chunk  # whole chunks per worker
        jobs = [self._pool.submit(part.update, flat[i * step:(i + 1) * step])
                for i, part in enumerate(self.parts) if i * step < n]
        for job in jobs:
            job.result()

    def result(self) -> dict[str, Any]:
        mo = Moments()
        for part in self.parts:
            part.fold()
            mo = mo.merge(part.moments)
        p = self.parts
        return finalize(mo, numel=sum(x.numel for x in p), nan=sum(x.nan for x in p),
                        inf=sum(x.inf for x in p), zeros=sum(x.zeros for x in p),
                        lo=min(x.lo for x in p), hi=max(x.hi for x in p))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _count_nonzero(c: torch.Tensor) -> torch.Tensor:
    """Elements != 0 (-0.0 counts as zero). On CPU via numpy on the bit pattern, which is much
    cheaper there than torch's count_nonzero for 16-bit floats."""
    if c.device.type != "cpu" or not c.is_contiguous():
        return torch.count_nonzero(c)
    import numpy as np

    if c.dtype in _SIGN_MASKS:
        int_dtype, mask = _SIGN_MASKS[c.dtype]
        bits = c.view(int_dtype).numpy()
        return torch.tensor(np.count_nonzero(bits & bits.dtype.type(mask)))
    return torch.tensor(np.count_nonzero(c.numpy()))


def finalize(mo: Moments, *, numel: int, nan: int, inf: int, zeros: int,
             lo: float, hi: float) -> dict[str, Any]:
    """Turn merged moments and counters into the STAT_KEYS dict."""
    n = mo.n
    nanf = math.nan
    var_pop = mo.m2 / n if n else nanf
    sum_sq = mo.m2 + n * mo.mean * mo.mean
    has_spread = n > 0 and mo.m2 > 0.0
    return {
        "count": n,
        "nan_count": nan,
        "inf_count": inf,
        "zero_count": zeros,
        "zero_fraction": zeros / numel if numel else nanf,
        "mean": mo.mean if n else nanf,
        "std_population": math.sqrt(var_pop) if n else nanf,
        "std_sample": math.sqrt(mo.m2 / (n - 1)) if n > 1 else nanf,
        "rms": math.sqrt(sum_sq / n) if n else nanf,
        "l2_norm": math.sqrt(sum_sq),
        "min": lo if n else nanf,
        "max": hi if n else nanf,
        "absmax": max(abs(lo), abs(hi)) if n else nanf,
        "skewness": _ratio(math.sqrt(n) * mo.m3, mo.m2 * math.sqrt(mo.m2)) if has_spread else nanf,
        "kurtosis_excess": _ratio(n * mo.m4, mo.m2 * mo.m2) - 3.0 if has_spread else nanf,
    }


def _ratio(num: float, den: float) -> float:
    """num / den, NaN where extreme float64 weights overflow or underflow the moments."""
    return num / den if den != 0.0 and math.isfinite(den) else math.nan


def tensor_stats(tensor: torch.Tensor, policy: AccumulationPolicy | None = None) -> dict[str, Any]:
    """Statistics of one tensor on its own device (see STAT_KEYS; moments over finite values).

    Args:
        tensor: any real tensor; bf16/fp16/fp8/int are upcast chunk by chunk on its device.
        policy: accumulation policy; default policy_for(tensor.device).

    Returns:
        dict with the STAT_KEYS; `skewness` is the population g1, `kurtosis_excess` is g2
        (population fourth standardised moment minus 3, so 0 for a normal distribution).
    """
    cpu = tensor.device.type == "cpu"
    acc = ParallelAccumulator(policy or policy_for(tensor.device), inspect_threads() if cpu else 1)
    try:
        with cpu_threads(1 if cpu else torch.get_num_threads()):
            acc.update(tensor)
        return acc.result()
    finally:
        acc.close()
