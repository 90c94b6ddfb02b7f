"""CPU execution of the expert loop: hit experts split across single-threaded workers (no OpenMP
fork/join per tiny GEMM, which collapses on shared cores), and oneDNN-prepacked expert weights."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from modelkin.runtime.cpu_kernels import Linear, split_gemv

Span = tuple[int, int, int]  # (expert, first row, end row) in the expert-sorted pairs


class _SingleThreadedWorkers:
    """A lazily built thread pool whose threads run torch single-threaded (intra-op = 1).

    torch.set_num_threads is per-thread for OpenMP and MKL, but it also writes two process-wide
    values (the default for new threads, the pthreadpool size); those are restored to the caller's
    count once every worker has set itself to 1.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._size = 0
        self._lock = threading.Lock()

    def get(self, size: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._size != size:
                if self._executor is not None:
                    self._executor.shutdown(wait=True)
                caller = torch.get_num_threads()
                executor = ThreadPoolExecutor(size, thread_name_prefix="modelkin-experts")
                barrier = threading.Barrier(size)
                list(executor.map(lambda _: _single_threaded(barrier), range(size)))  # start them all
                torch.set_num_threads(caller)
                self._executor, self._size = executor, size
            return self._executor


def _single_threaded(barrier: threading.Barrier) -> None:
    torch.get_num_threads()  # run torch's once-per-thread init first, or it would undo the next line
    torch.set_num_threads(1)
    barrier.wait()


_WORKERS = _SingleThreadedWorkers()


def balance(spans: list[Span], parts: int) -> list[list[Span]]:
    """Contiguous groups of experts with about equal cost (weight streaming + rows)."""
    costs = [16 + end - start for _, start, end in spans]  # one expert's weights ≈ 16 rows of work
    total, groups, acc = sum(costs), [[] for _ in range(parts)], 0
    for span, cost in zip(spans, costs):
        groups[min(parts - 1, int(parts * (acc + cost / 2) / total))].append(span)
        acc += cost
    return [g for g in groups if g]


def experts_threaded(
    xs_SD: torch.Tensor,
    spans: list[Span],
    gate_up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
    packed: PackedExperts | None = None,
) -> torch.Tensor:
    """ys_SD for expert-sorted rows xs_SD, experts split across `torch.get_num_threads()` workers."""
    size = torch.get_num_threads()
    h_SF2 = xs_SD.new_empty(xs_SD.shape[0], gate_up_EFD.shape[1])
    ys_SD = xs_SD.new_empty(xs_SD.shape[0], down_EDF.shape[1])
    groups = balance(spans, size)
    if len(groups) == 1:
        run_spans(xs_SD, groups[0], gate_up_EFD, down_EDF, h_SF2, ys_SD, packed)
        return ys_SD
    pool = _WORKERS.get(size)
    args = (xs_SD, gate_up_EFD, down_EDF, h_SF2, ys_SD, packed)
    inference = torch.is_inference_mode_enabled()
    futures = [pool.submit(_run_spans_without_autograd, inference, g, *args) for g in groups]
    for future in futures:
        future.result()
    return ys_SD


def _run_spans_without_autograd(inference: bool, spans: list[Span], xs_SD: torch.Tensor, *args) -> None:
    # grad and inference modes are per thread: repeat the caller's (inference tensors are only
    # writable in inference mode)
    with torch.inference_mode() if inference else torch.no_grad():
        run_spans(xs_SD, spans, *args)


def run_spans(
    xs_SD: torch.Tensor,
    spans: list[Span],
    gate_up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
    h_SF2: torch.Tensor,
    ys_SD: torch.Tensor,
    packed: PackedExperts | None = None,
) -> None:
    """Experts of `spans` (contiguous rows): gate_up GEMMs, one SwiGLU, down GEMMs, into ys_SD."""
    first, last = spans[0][1], spans[-1][2]
    parts = torch.get_num_threads()  # one row on plain weights: split_gemv over the intra-op threads
    if packed is None:
        for e, start, end in spans:
            _mm(xs_SD[start:end], gate_up_EFD[e], h_SF2[start:end], parts)
    else:  # oneDNN's linear has no out=: one cat instead of a copy per expert
        torch.cat([packed.linear(xs_SD[a:b], packed.gate_up[e]) for e, a, b in spans], out=h_SF2[first:last])
    gate_SF, up_SF = h_SF2[first:last].chunk(2, dim=-1)
    act_SF = F.silu(gate_SF).mul_(up_SF)
    if packed is None:
        for e, start, end in spans:
            _mm(act_SF[start - first : end - first], down_EDF[e], ys_SD[start:end], parts)
    else:
        torch.cat([packed.linear(act_SF[a - first : b - first], packed.down[e]) for e, a, b in spans],
                  out=ys_SD[first:last])


def _mm(x_MI: torch.Tensor, w_OI: torch.Tensor, out_MO: torch.Tensor, parts: int) -> None:
    """out = x·wᵀ; a single row with several intra-op threads and a weight as large as cpu_kernels.Linear
    splits, as cpu_kernels.split_gemv (MKL's GEMV stays on one core; numbers in bench/README.md)."""
    if parts > 1 and x_MI.shape[0] == 1 and w_OI.numel() >= Linear.SPLIT_MIN_NUMEL:
        out_MO[0] = split_gemv(x_MI[0], w_OI, None, parts)
    else:
        torch.mm(x_MI, w_OI.t(), out=out_MO)


class PackedExperts:
    """Expert weights reordered once into oneDNN's blocked layout (one tensor per expert and matrix).

    Saves oneDNN's per-call weight reorder (bf16) and replaces MKL by oneDNN (fp32, several rows per
    expert). A second copy of the expert weights: `should_pack` only allows it while half of the
    machine's memory stays available, and `matches` notices when the plain weights change.
    """

    def __init__(self, gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor):
        reorder = torch.ops.mkldnn._reorder_linear_weight
        with torch.no_grad():
            self.gate_up = [reorder(w) for w in gate_up_EFD.detach()]
            self.down = [reorder(w) for w in down_EDF.detach()]
        self.dtype = gate_up_EFD.dtype
        self._source = (identity(gate_up_EFD), identity(down_EDF))

    def matches(self, gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor) -> bool:
        """Whether the plain weights are still the ones packed (same storage, no in-place change)."""
        return self._source == (identity(gate_up_EFD), identity(down_EDF))

    def worth_it(self, num_pairs: int, num_hit: int) -> bool:
        """bf16: always (oneDNN's per-call reorder is the cost). fp32: from 4 rows per expert; below
        that MKL's GEMV streams the plain weights faster (bench/moe.py, T=1)."""
        return self.dtype == torch.bfloat16 or num_pairs >= 4 * num_hit

    @staticmethod
    def linear(x: torch.Tensor, packed_w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed_w, None, "none", [], "")

    @staticmethod
    def supported(gate_up_EFD: torch.Tensor) -> bool:
        return (
            gate_up_EFD.device.type == "cpu"
            and gate_up_EFD.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        )


def identity(t: torch.Tensor) -> tuple:
    """What makes two looks at a weight the same weight: storage, in-place version, dtype, shape."""
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape))


def should_pack(gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor) -> bool:
    """Pack automatically when supported, not training, not disabled (MODELKIN_MOE_PREPACK=0), and
    the copy leaves at least half of the machine's memory available."""
    if os.environ.get("MODELKIN_MOE_PREPACK", "auto") == "0" or not PackedExperts.supported(gate_up_EFD):
        return False
    if torch.is_grad_enabled() and gate_up_EFD.requires_grad:
        return False
    total, available = _meminfo()
    nbytes = gate_up_EFD.numel() * gate_up_EFD.element_size() + down_EDF.numel() * down_EDF.element_size()
    return total > 0 and available - nbytes >= total // 2


def _meminfo() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo; (0, 0) where there is none."""
    values = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)
