"""Which path computes the routed experts of one forward: `plan` decides once, by the table in its
docstring; StackedExperts runs what it returns."""

from __future__ import annotations

import dataclasses
import enum
import os
import time
from collections.abc import Callable

import torch

from modelkin.runtime.moe import npu_ops
from modelkin.runtime.moe.cpu import PackedExperts, Span

INTRA_OP_MAX_HIT = 16  # up to this many hit experts, intra-op threads beat the expert-split workers


class ExpertsImpl(str, enum.Enum):
    """How StackedExperts computes the routed experts (all give the same numbers)."""

    AUTO = "auto"  # decided per forward by `plan`
    LOOP = "loop"  # sort by expert, one matmul per hit expert on contiguous slices (one host sync)
    THREADS = "threads"  # LOOP with the hit experts split across single-threaded CPU workers
    GROUPED_MM = "grouped_mm"  # sort by expert, torch grouped GEMM with offsets (no host sync)
    GATHER = "gather"  # per-pair gathered weights + bmm: no data-dependent shapes (export, tiny T)
    NPU = "npu"  # torch_npu fused routing + grouped matmul (moe/npu_ops.py)


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How one forward computes its routed experts.

    Attributes:
        runner: LOOP, THREADS, GROUPED_MM, GATHER or NPU (never AUTO).
        packed: the oneDNN copy of the weights LOOP/THREADS use instead of the plain ones, or None.
        spans: (expert, first row, end row) of every hit expert in the expert-sorted pairs
            (LOOP/THREADS only: computing them is the one host sync).
    """

    runner: ExpertsImpl
    packed: PackedExperts | None = None
    spans: list[Span] | None = None


def plan(
    requested: ExpertsImpl,
    x_TD: torch.Tensor,
    ids_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor,
    *,
    packed_weights: Callable[[], PackedExperts | None] = lambda: None,
) -> Plan:
    """The dispatch of one forward. AUTO takes the first row that matches, top to bottom:

    | case                                                    | runner     | weights              |
    |---------------------------------------------------------|------------|----------------------|
    | tracing, torch.compile or ONNX export                   | GATHER     | plain (static shapes)|
    | on an NPU whose torch_npu has the fused MoE ops         | NPU        | plain                |
    | CUDA, bfloat16, torch has grouped_mm                    | GROUPED_MM | plain (no host sync) |
    | — otherwise the sorted loop: count the S pairs of the H hit experts (one host sync) — |
    | autograd through x or the weights                       | LOOP       | plain                |
    | not on CPU, or torch runs one intra-op thread           | LOOP       | packed if worth it   |
    | CPU oversubscribed (1-min load >= CPUs + 1)             | THREADS    | packed if worth it   |
    | packed copy worth it                                    | LOOP       | packed               |
    | H <= INTRA_OP_MAX_HIT (decode: few one-row GEMVs)       | LOOP       | plain                |
    | otherwise (many experts on plain weights)               | THREADS    | plain                |

    Why: intra-op threading pays an OpenMP fork/join per small GEMM, which collapses when the
    CPU is oversubscribed (every barrier waits for a descheduled thread), so experts are split
    across single-threaded workers instead; oneDNN threads prepacked GEMMs well, and for few hit
    experts the hand-off to workers costs more than it saves. Measurements: bench/README.md.

    "packed if worth it": `packed_weights()` (StackedExperts keeps the copy, built on first use
    when `cpu.should_pack` allows), used when `PackedExperts.worth_it(S, H)`: bf16 always, fp32
    from 4 rows per expert. An explicit LOOP or THREADS keeps its runner and the same weights
    rule (THREADS runs as LOOP under autograd); GROUPED_MM, GATHER and NPU run as asked.
    """
    runner = requested
    if runner is ExpertsImpl.AUTO:
        device = x_TD.device.type
        if _is_tracing():
            return Plan(ExpertsImpl.GATHER)
        if device == "npu" and npu_ops.available("moe"):
            return Plan(ExpertsImpl.NPU)
        if device == "cuda" and x_TD.dtype == torch.bfloat16 and has_grouped_mm():
            return Plan(ExpertsImpl.GROUPED_MM)
    if runner in (ExpertsImpl.GATHER, ExpertsImpl.NPU, ExpertsImpl.GROUPED_MM):
        return Plan(runner)
    spans = hit_spans(ids_TK, gate_up_EFD.shape[0])
    if needs_grad(x_TD, gate_up_EFD):
        return Plan(ExpertsImpl.LOOP, spans=spans)
    packed = packed_weights()
    if packed is not None and not packed.worth_it(ids_TK.numel(), len(spans)):
        packed = None
    if runner is ExpertsImpl.AUTO:
        if x_TD.device.type != "cpu" or torch.get_num_threads() == 1:
            runner = ExpertsImpl.LOOP
        elif oversubscribed() or (packed is None and len(spans) > INTRA_OP_MAX_HIT):
            runner = ExpertsImpl.THREADS
        else:
            runner = ExpertsImpl.LOOP
    return Plan(runner, packed, spans)


def hit_spans(ids_TK: torch.Tensor, num_experts: int) -> list[Span]:
    """(expert, first row, end row) of every hit expert once the T·K pairs are sorted by expert."""
    counts = torch.bincount(ids_TK.reshape(-1), minlength=num_experts).tolist()  # the one host sync
    spans, start = [], 0
    for e, n in enumerate(counts):
        if n:
            spans.append((e, start, start + n))
            start += n
    return spans


def needs_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def has_grouped_mm() -> bool:
    return hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _is_tracing() -> bool:
    return bool(
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or (hasattr(torch.onnx, "is_in_onnx_export") and torch.onnx.is_in_onnx_export())
    )


class _LoadProbe:
    """Whether more tasks want to run than there are CPUs (1-minute load average, read once a second).

    Our own busy threads count too, so 'oversubscribed' means at least one runnable task beyond
    one per CPU.
    """

    def __init__(self) -> None:
        self._checked_at = -1.0
        self._value = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at > 1.0:
            try:
                load = os.getloadavg()[0]
            except OSError:
                load = 0.0
            self._value, self._checked_at = load >= (os.cpu_count() or 1) + 1, now
        return self._value


oversubscribed = _LoadProbe()
