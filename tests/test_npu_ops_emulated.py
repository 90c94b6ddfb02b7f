"""runtime/moe/npu_ops.py's MoE call sequence against CPU emulations of the torch_npu ops, written from
their API documentation. No NPU here: this checks how
modelkin wires the ops together (row_idx layout, offsets, weight transposes, finalize mapping)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from modelkin.runtime.moe import experts_sorted, npu_ops


def _init_routing(x, row_idx, expert_idx, active_num):
    """Sort (row, k) pairs by expert (stable), carrying row_idx; gather x[row % NUM_ROWS]."""
    num_rows = x.shape[0]
    experts, rows = expert_idx.reshape(-1), row_idx.reshape(-1)
    order = torch.argsort(experts, stable=True)
    dst_to_src = rows[order]
    src_to_dst = torch.empty_like(rows)
    src_to_dst[dst_to_src.long()] = torch.arange(rows.numel(), dtype=rows.dtype)
    return x[dst_to_src.long() % num_rows], src_to_dst, experts[order]


def _compute_expert_tokens(sorted_experts, num_experts):
    return torch.cumsum(torch.bincount(sorted_experts.long(), minlength=num_experts), 0).to(torch.int32)


def _grouped_matmul(x, weight, *, split_item, group_list_type, group_type, group_list, **_):
    assert split_item == 2 and group_type == 0 and group_list_type == 0 and len(x) == len(weight) == 1
    out, start = [], 0
    for g, end in enumerate(group_list.tolist()):
        out.append(x[0][start:end] @ weight[0][g])  # weight [E, in, out]
        start = end
    return [torch.cat(out)]


def _swiglu(x, dim=-1):
    a, b = x.chunk(2, dim=dim)
    return F.silu(a) * b


def _finalize(rows, skip1, skip2, bias, scales, expanded_src_to_dst_row, export_for_source_row):
    """out[i] = skip1 + skip2 + Σ_k scales[i, k]·(rows[dst(k·N + i)] + bias[expert])."""
    assert skip1 is None and skip2 is None and bias is None
    num_rows, top_k = scales.shape
    out = torch.zeros(num_rows, rows.shape[1], dtype=rows.dtype)
    for i in range(num_rows):
        for k in range(top_k):
            out[i] += scales[i, k] * rows[expanded_src_to_dst_row[k * num_rows + i]]
    return out


@pytest.fixture
def fake_torch_npu(monkeypatch):
    mod = types.ModuleType("torch_npu")
    mod.npu_moe_init_routing = _init_routing
    mod.npu_moe_compute_expert_tokens = _compute_expert_tokens
    mod.npu_grouped_matmul = _grouped_matmul
    mod.npu_swiglu = _swiglu
    mod.npu_moe_finalize_routing = _finalize
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    return mod


def test_npu_moe_experts_matches_the_plain_path(fake_torch_npu):
    assert npu_ops.available("moe")
    g = torch.Generator().manual_seed(0)
    num_tokens, top_k, num_experts, dim, hidden = 9, 3, 8, 16, 12
    x = torch.randn(num_tokens, dim, generator=g)
    gate_up = torch.randn(num_experts, 2 * hidden, dim, generator=g) / 4
    down = torch.randn(num_experts, dim, hidden, generator=g) / 4
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g)
    want = experts_sorted(x, weights, ids, gate_up, down)
    got = npu_ops.moe_experts(x, weights, ids, gate_up, down)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_npu_ops_unavailable_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.setattr(npu_ops.importlib.util, "find_spec", lambda name: None)
    assert not npu_ops.available("moe")
