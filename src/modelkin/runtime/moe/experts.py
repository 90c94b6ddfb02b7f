"""Stacked SwiGLU experts and the ways to compute them: expert-sorted loop (CPU workers, grouped GEMM)
and per-pair gather; which one runs is `dispatch.plan`'s decision.

Shape legend (suffixes): T tokens (batch × sequence, flattened), D model dim, F expert hidden dim,
E routed experts, K experts per token, S = T·K token–expert pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import modelkin.runtime.moe.cpu as moe_cpu
from modelkin.runtime.moe import npu_ops
from modelkin.runtime.moe.cpu import PackedExperts, Span
from modelkin.runtime.moe.dispatch import ExpertsImpl, hit_spans, needs_grad, plan


class StackedExperts(nn.Module):
    """E SwiGLU experts stored stacked: `gate_up_proj` [E, 2F, D] (gate rows first), `down_proj` [E, D, F].

    Checkpoints keep one tensor per expert; `weights.stack_experts` builds these at load time.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, *, impl: ExpertsImpl = ExpertsImpl.AUTO):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.impl = ExpertsImpl(impl)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.packed: PackedExperts | None = None  # oneDNN copy of the weights (CPU), see packed_weights
        self.autopack = True  # pack on first CPU use when cpu.should_pack allows
        self._declined: tuple | None = None  # the weights should_pack declined (asked again for new ones)

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        how = plan(self.impl, x_TD, ids_TK, self.gate_up_proj, packed_weights=self.packed_weights)
        if how.runner is ExpertsImpl.NPU:
            return npu_ops.moe_experts(x_TD, weights_TK, ids_TK, self.gate_up_proj, self.down_proj)
        if how.runner is ExpertsImpl.GATHER:
            return experts_gather(x_TD, weights_TK, ids_TK, self.gate_up_proj, self.down_proj)
        return experts_sorted(
            x_TD, weights_TK, ids_TK, self.gate_up_proj, self.down_proj,
            runner=how.runner, packed=how.packed, spans=how.spans,
        )

    def packed_weights(self) -> PackedExperts | None:
        """The oneDNN-prepacked copy for the CPU loop: dropped when the plain weights changed, built
        on first use when `autopack` and memory allow. The plain weights stay the reference."""
        if self.packed is not None and not self.packed.matches(self.gate_up_proj, self.down_proj):
            self.packed = None
        if self.packed is None and self.autopack and self._declined != moe_cpu.identity(self.gate_up_proj):
            if moe_cpu.should_pack(self.gate_up_proj, self.down_proj):
                self.packed = PackedExperts(self.gate_up_proj, self.down_proj)
            else:
                self._declined = moe_cpu.identity(self.gate_up_proj)
        return self.packed

    def prepack_cpu(self) -> bool:
        """Build the prepacked copy now, whatever the memory heuristic says; False where unsupported."""
        if not PackedExperts.supported(self.gate_up_proj):
            return False
        self.packed = PackedExperts(self.gate_up_proj, self.down_proj)
        return True

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, impl={self.impl.value}"


def swiglu(h_SF2: torch.Tensor) -> torch.Tensor:
    """silu(first half) × second half, the layout of `gate_up_proj` (same as torch_npu.npu_swiglu)."""
    gate_SF, up_SF = h_SF2.chunk(2, dim=-1)
    return F.silu(gate_SF) * up_SF


def experts_sorted(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
    *,
    runner: ExpertsImpl = ExpertsImpl.LOOP,
    packed: PackedExperts | None = None,
    spans: list[Span] | None = None,
) -> torch.Tensor:
    """Sort the S token–expert pairs by expert, run each hit expert on its contiguous slice, combine.

    `runner` LOOP / THREADS / GROUPED_MM computes the slices; `packed` (CPU) replaces the plain
    weights in the LOOP/THREADS GEMMs; `spans` are `dispatch.hit_spans` when already known. THREADS
    runs without autograd. The combine unpermutes and sums over K without index_add_, so it is
    deterministic on GPU too.
    """
    top_k = ids_TK.shape[1]
    ids_S = ids_TK.reshape(-1)
    order_S = torch.argsort(ids_S, stable=True)
    xs_SD = x_TD.index_select(0, order_S // top_k)
    if runner is ExpertsImpl.GROUPED_MM:
        counts_E = torch.bincount(ids_S, minlength=gate_up_EFD.shape[0])
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h_SF = swiglu(_grouped_mm(xs_SD, gate_up_EFD.transpose(1, 2), offs_E))
        ys_SD = _grouped_mm(h_SF, down_EDF.transpose(1, 2), offs_E)
        return _combine(ys_SD, weights_TK, order_S)
    spans = hit_spans(ids_TK, gate_up_EFD.shape[0]) if spans is None else spans
    if runner is ExpertsImpl.THREADS:
        if needs_grad(xs_SD, gate_up_EFD):
            raise ValueError("the THREADS runner has no autograd: use LOOP when gradients are needed")
        ys_SD = moe_cpu.experts_threaded(xs_SD, spans, gate_up_EFD, down_EDF, packed)
    else:
        ys_SD = _experts_loop(xs_SD, spans, gate_up_EFD, down_EDF, packed)
    return _combine(ys_SD, weights_TK, order_S)


def _grouped_mm(x_SI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(x_SI, w_EIO, offs=offs_E)


def _combine(ys_SD: torch.Tensor, weights_TK: torch.Tensor, order_S: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_k w[t,k]·ys[pair (t,k)] for expert-sorted rows ys: unsorted by one gather, weighted
    and summed by one batched matmul (fp32 accumulation for 16-bit rows; faster than scale +
    index_copy_ + sum, see bench/README.md). One token (decoding): a single [1, S]·[S, D] product
    on the sorted rows. Deterministic on every device."""
    num_tokens, top_k = weights_TK.shape
    w_TK = weights_TK.to(ys_SD.dtype)
    if num_tokens == 1:
        return torch.mm(w_TK.reshape(1, -1)[:, order_S], ys_SD)
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    ys_TKD = ys_SD.index_select(0, inverse_S).view(num_tokens, top_k, -1)
    return torch.bmm(w_TK.unsqueeze(1), ys_TKD).squeeze(1)


def _experts_loop(
    xs_SD: torch.Tensor,
    spans: list[Span],
    gate_up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
    packed: PackedExperts | None = None,
) -> torch.Tensor:
    if needs_grad(xs_SD, gate_up_EFD):
        # autograd cannot see through mm(out=...): the same maths with cat (training, grad checks)
        h_SF = swiglu(torch.cat([xs_SD[a:b] @ gate_up_EFD[e].t() for e, a, b in spans]))
        return torch.cat([h_SF[a:b] @ down_EDF[e].t() for e, a, b in spans])
    h_SF2 = xs_SD.new_empty(xs_SD.shape[0], gate_up_EFD.shape[1])
    ys_SD = xs_SD.new_empty(xs_SD.shape[0], down_EDF.shape[1])
    if spans:
        moe_cpu.run_spans(xs_SD, spans, gate_up_EFD, down_EDF, h_SF2, ys_SD, packed)
    return ys_SD


def experts_gather(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
) -> torch.Tensor:
    """Gather each pair's expert weights and bmm: static shapes (tracing, ONNX export), no sync."""
    num_tokens, top_k = ids_TK.shape
    ids_S = ids_TK.reshape(-1)
    xs_S1D = x_TD.repeat_interleave(top_k, dim=0).unsqueeze(1)
    h_S1F = swiglu(torch.bmm(xs_S1D, gate_up_EFD[ids_S].transpose(1, 2)))
    ys_SD = torch.bmm(h_S1F, down_EDF[ids_S].transpose(1, 2)).squeeze(1)
    ys_SD = ys_SD * weights_TK.reshape(-1, 1).to(ys_SD.dtype)
    return ys_SD.view(num_tokens, top_k, -1).sum(dim=1)
