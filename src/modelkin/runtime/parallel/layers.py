"""Tensor- and expert-parallel versions of the shared blocks, made by rewriting a meta-device model
(`parallelize`), and the cut of each checkpoint tensor a rank reads (`shard_state`).

Shape legend: T tokens, D model dim, F hidden dim, E experts, K experts per token, S = T·K pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelkin.checkpoint.lazy import LazyTensor, StateDict, cat
from modelkin.errors import UnsupportedArchitectureError
from modelkin.runtime.cpu_kernels import onednn_linear
from modelkin.runtime.layers import MLP, Attention
from modelkin.runtime.moe import RouterPolicy, SparseMoeBlock, StackedExperts
from modelkin.runtime.parallel.dist import Reduce
from modelkin.runtime.parallel.layout import Layout, expert_range, head_ranges, split_range

ShardFn = Callable[[LazyTensor], LazyTensor]  # full checkpoint tensor -> this rank's part


class RowParallelLinear(nn.Module):
    """y = reduce(x_local · W_localᵀ) + b: input features split across ranks, bias added once.

    ``reduce`` None leaves the partial sum for an outer all-reduce (MoE shared expert); then the
    bias is added only where ``add_bias`` (one rank), so the outer sum counts it once.
    """

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, reduce: Reduce | None, add_bias: bool = True
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reduce = reduce
        self.add_bias = add_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = onednn_linear(x, self.weight, None)  # the same CPU kernel as the unsplit Linear
        if self.reduce is not None:
            y = self.reduce(y)
        if self.bias is not None and self.add_bias:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local), out_features={self.out_features}"


class ParallelSparseMoeBlock(SparseMoeBlock):
    """A SparseMoeBlock holding routed experts [first, stop) with this rank's slice of their
    neurons; forward adds only their contributions (and this rank's shared-expert slice), then sums
    over all ranks. The router is the replicated original, so routing telemetry hooks still see
    every token's full routing on every rank."""

    def __init__(
        self,
        block: SparseMoeBlock,
        *,
        experts: StackedExperts,
        first: int,
        stop: int,
        group_slice: tuple[int, int] | None,
        reduce: Reduce | None,
    ):
        super().__init__(
            gate=block.gate,
            experts=experts,
            shared_expert=block.shared_expert,
            shared_expert_gate=block.shared_expert_gate is not None,
            router_scale=block.router_scale is not None,
            layer_idx=block.layer_idx,
        )
        self.shared_expert_gate = block.shared_expert_gate
        self.router_scale = block.router_scale  # routing is replicated: all E scales
        self.first, self.stop, self.num_experts = first, stop, block.experts.num_experts
        self.group_slice = group_slice  # MoGE: the K columns (groups) whose experts are local
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        weights_TK, ids_TK, _ = self.gate(x_TD, self.router_scale)
        y_TD = self._local_experts(x_TD, weights_TK, ids_TK)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)  # this rank's neurons only: a partial sum
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        if self.reduce is not None:
            y_TD = self.reduce(y_TD)
        return y_TD.view(shape)

    def _local_experts(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor
    ) -> torch.Tensor:
        if self.first == 0 and self.stop == self.num_experts:
            return self.experts(x_TD, weights_TK, ids_TK)
        if self.group_slice is not None:  # MoGE: column g holds group g's pick: a static slice
            g0, g1 = self.group_slice
            return self.experts(x_TD, weights_TK[:, g0:g1], ids_TK[:, g0:g1] - self.first)
        num_tokens, top_k = ids_TK.shape
        ids_S = ids_TK.reshape(-1)
        pairs = torch.nonzero((ids_S >= self.first) & (ids_S < self.stop)).squeeze(-1)
        if pairs.numel() == 0:  # no token chose a local expert (decode steps, small batches)
            return torch.zeros_like(x_TD)
        ys = self.experts(
            x_TD.index_select(0, pairs // top_k),
            weights_TK.reshape(-1)[pairs].unsqueeze(-1),
            (ids_S[pairs] - self.first).unsqueeze(-1),
        )
        # scatter into the [T, K] pair layout and sum over K: deterministic, no index_add_
        y_SD = x_TD.new_zeros(num_tokens * top_k, x_TD.shape[-1]).index_copy_(0, pairs, ys)
        return y_SD.view(num_tokens, top_k, -1).sum(dim=1)

    def extra_repr(self) -> str:
        return f"experts=[{self.first}, {self.stop}) of {self.num_experts}"


# -- rewriting a meta-device model -----------------------------------------------------------------


def parallelize(
    model: nn.Module, layout: Layout, *, reduce_tp: Reduce | None = None, reduce_world: Reduce | None = None
) -> dict[str, ShardFn]:
    """Rewrite ``model`` (on the meta device) in place into this rank's shard of it.

    Attention: q/k/v column-split by whole GQA groups, o row-split. MLP: gate/up column-split by
    neurons, down row-split. Each row-parallel matmul is followed by one all-reduce, then its bias.
    MoE: routed experts split across ep ranks (whole MoGE groups per rank) and their neurons across
    tp ranks; the shared expert's neurons split across all ranks; tokens stay replicated, every rank
    runs the same router, adds only its own experts' share, and one all-reduce per layer combines
    them. Embeddings, norms, routers and lm_head stay replicated.

    Returns:
        parameter name -> the function cutting this rank's part from the full checkpoint tensor
        (names absent are replicated).

    Raises:
        ConfigError: tp/ep that the model's heads, KV heads or expert groups cannot take.
        UnsupportedArchitectureError: a block this module cannot split.
    """
    plan: dict[str, ShardFn] = {}
    if layout.world_size == 1:
        return plan
    moe_blocks = {n for n, m in model.named_modules() if isinstance(m, SparseMoeBlock)}
    with torch.device("meta"):  # new modules hold no memory until the weights are assigned
        for name, module in list(model.named_modules()):
            _rewrite(model, name, module, layout, reduce_tp, reduce_world, moe_blocks, plan)
    return plan


def _rewrite(
    model: nn.Module,
    name: str,
    module: nn.Module,
    layout: Layout,
    reduce_tp: Reduce | None,
    reduce_world: Reduce | None,
    moe_blocks: set[str],
    plan: dict[str, ShardFn],
) -> None:
    prefix = f"{name}." if name else ""
    if isinstance(module, Attention):
        _split_attention(module, prefix, layout, reduce_tp, plan)
    elif isinstance(module, SparseMoeBlock):
        _replace(model, name, _split_moe(module, prefix, layout, reduce_world, plan))
    elif isinstance(module, MLP) and not _inside(name, moe_blocks):
        _split_mlp(module, prefix, layout.tp, layout.tp_rank, reduce_tp, True, plan)
    elif _unsupported(module):
        raise UnsupportedArchitectureError(
            f"tensor/expert parallelism cannot split {type(module).__name__} ({name})",
            hint="run this model without --tp/--ep",
        )


def _inside(name: str, parents: set[str]) -> bool:
    return any(name.startswith(p + ".") for p in parents)


def _unsupported(module: nn.Module) -> bool:
    """Attention- or MoE-like modules of a kind this file does not know."""
    kind = type(module).__name__.lower()
    known = (Attention, MLP, SparseMoeBlock, StackedExperts, RowParallelLinear)
    return not isinstance(module, known) and ("attention" in kind or "experts" in kind)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _rows(start: int, stop: int, dim: int = 0) -> ShardFn:
    return lambda t: t.narrow(dim, start, stop)


def _column_linear(old: nn.Linear, out_features: int) -> nn.Linear:
    return nn.Linear(old.in_features, out_features, bias=old.bias is not None)


def _split_attention(
    attn: Attention, prefix: str, layout: Layout, reduce: Reduce | None, plan: dict[str, ShardFn]
) -> None:
    if layout.tp == 1:
        return
    q_heads, kv_heads = head_ranges(attn.num_heads, attn.num_kv_heads, layout.tp, layout.tp_rank)
    dh = attn.head_dim
    q0, q1, k0, k1 = q_heads.start * dh, q_heads.stop * dh, kv_heads.start * dh, kv_heads.stop * dh
    attn.q_proj = _column_linear(attn.q_proj, q1 - q0)
    attn.k_proj = _column_linear(attn.k_proj, k1 - k0)
    attn.v_proj = _column_linear(attn.v_proj, k1 - k0)
    old_o = attn.o_proj
    attn.o_proj = RowParallelLinear(q1 - q0, old_o.out_features, bias=old_o.bias is not None, reduce=reduce)
    attn.num_heads, attn.num_kv_heads = len(q_heads), len(kv_heads)
    for proj, (a, b) in (("q_proj", (q0, q1)), ("k_proj", (k0, k1)), ("v_proj", (k0, k1))):
        plan[f"{prefix}{proj}.weight"] = _rows(a, b)
        if getattr(attn, proj).bias is not None:
            plan[f"{prefix}{proj}.bias"] = _rows(a, b)
    plan[f"{prefix}o_proj.weight"] = _rows(q0, q1, dim=1)


def _split_mlp(
    mlp: MLP,
    prefix: str,
    parts: int,
    index: int,
    reduce: Reduce | None,
    add_bias: bool,
    plan: dict[str, ShardFn],
) -> None:
    if parts == 1:
        return
    f0, f1 = split_range(mlp.gate_proj.out_features, parts, index)
    mlp.gate_proj = _column_linear(mlp.gate_proj, f1 - f0)
    mlp.up_proj = _column_linear(mlp.up_proj, f1 - f0)
    old_down = mlp.down_proj
    mlp.down_proj = RowParallelLinear(
        f1 - f0, old_down.out_features, bias=old_down.bias is not None, reduce=reduce, add_bias=add_bias
    )
    for proj in ("gate_proj", "up_proj"):
        plan[f"{prefix}{proj}.weight"] = _rows(f0, f1)
        if getattr(mlp, proj).bias is not None:
            plan[f"{prefix}{proj}.bias"] = _rows(f0, f1)
    plan[f"{prefix}down_proj.weight"] = _rows(f0, f1, dim=1)


def _split_moe(
    block: SparseMoeBlock, prefix: str, layout: Layout, reduce: Reduce | None, plan: dict[str, ShardFn]
) -> ParallelSparseMoeBlock:
    old = block.experts
    moge = block.gate.policy is RouterPolicy.MOGE
    groups = block.gate.num_groups if moge else None
    first, stop = expert_range(old.num_experts, groups, layout.ep, layout.ep_rank)
    f0, f1 = split_range(old.hidden, layout.tp, layout.tp_rank)
    experts = StackedExperts(stop - first, old.dim, f1 - f0, impl=old.impl)
    hidden = old.hidden
    plan[f"{prefix}experts.gate_up_proj"] = lambda t: _gate_up_shard(t, first, stop, f0, f1, hidden)
    plan[f"{prefix}experts.down_proj"] = lambda t: t.narrow(0, first, stop).narrow(2, f0, f1)
    if block.shared_expert is not None:
        if not isinstance(block.shared_expert, MLP):
            raise UnsupportedArchitectureError(
                f"the shared expert of {prefix}is a {type(block.shared_expert).__name__}",
                hint="run this model without --tp/--ep",
            )
        _split_mlp(
            block.shared_expert,
            f"{prefix}shared_expert.",
            layout.world_size,
            layout.rank,
            None,
            layout.rank == 0,
            plan,
        )
    group_slice = None
    if moge and layout.ep > 1:
        per_rank = groups // layout.ep
        group_slice = (layout.ep_rank * per_rank, (layout.ep_rank + 1) * per_rank)
    return ParallelSparseMoeBlock(
        block, experts=experts, first=first, stop=stop, group_slice=group_slice, reduce=reduce
    )


def _gate_up_shard(t: LazyTensor, first: int, stop: int, f0: int, f1: int, hidden: int) -> LazyTensor:
    """[E, 2F, D] (gate rows, then up rows) -> [E_local, 2·F_local, D]: both halves' neuron slice."""
    local = t.narrow(0, first, stop)
    if f0 == 0 and f1 == hidden:
        return local
    return cat([local.narrow(1, f0, f1), local.narrow(1, hidden + f0, hidden + f1)], dim=1)


def shard_state(state: StateDict, plan: dict[str, ShardFn]) -> StateDict:
    """The checkpoint tensors cut to this rank's parts (still unread)."""
    return {name: plan[name](t) if name in plan else t for name, t in state.items()}
