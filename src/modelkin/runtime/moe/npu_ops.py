"""Optional Ascend fast path: torch_npu's fused MoE routing and grouped matmul behind the signature of
`experts.experts_sorted`, which stays the reference (same numbers). torch_npu is looked up lazily (it
patches torch on import); written from the torch_npu API docs, so CPU CI checks it against emulations."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import torch

# torch_npu functions each fast path needs (all must exist, see `available`).
_REQUIRED = {
    "moe": ("npu_moe_init_routing", "npu_grouped_matmul", "npu_moe_finalize_routing", "npu_swiglu"),
}


def _torch_npu() -> ModuleType | None:
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return mod
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        return importlib.import_module("torch_npu")
    except Exception:  # noqa: BLE001  (a broken CANN install raises anything; the plain path works)
        return None


def available(kind: str) -> bool:
    """Whether torch_npu offers every op the `kind` fast path ('moe') needs."""
    mod = _torch_npu()
    return mod is not None and all(hasattr(mod, op) for op in _REQUIRED[kind])


def moe_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts with torch_npu's fused ops; same result as `experts.experts_sorted`.

    init_routing sorts the T·K pairs by expert and gathers rows; two grouped matmuls run every
    expert on its row block (weights passed as [E, in, out] views); finalize_routing scales each
    row by its routing weight and sums the K rows of every token back into place.
    """
    tnpu = _torch_npu()
    num_tokens, top_k = ids_TK.shape
    num_experts = gate_up_EFD.shape[0]
    ids32_TK = ids_TK.to(torch.int32)
    # row_idx[t, k] = k·T + t: the position of pair (t, k) in the K-major expanded layout.
    row_idx_TK = (
        torch.arange(num_tokens * top_k, dtype=torch.int32, device=x_TD.device)
        .view(top_k, num_tokens)
        .t()
        .contiguous()
    )
    xs_SD, src_to_dst_S, sorted_ids_S = tnpu.npu_moe_init_routing(
        x_TD, row_idx_TK, ids32_TK, active_num=num_tokens
    )
    group_list_E = _expert_offsets(tnpu, sorted_ids_S, num_experts)
    h_SF2 = tnpu.npu_grouped_matmul(
        x=[xs_SD], weight=[gate_up_EFD.transpose(1, 2)], split_item=2,
        group_list_type=0, group_type=0, group_list=group_list_E,
    )[0]
    h_SF = tnpu.npu_swiglu(h_SF2, dim=-1)
    ys_SD = tnpu.npu_grouped_matmul(
        x=[h_SF], weight=[down_EDF.transpose(1, 2)], split_item=2,
        group_list_type=0, group_type=0, group_list=group_list_E,
    )[0]
    return tnpu.npu_moe_finalize_routing(
        ys_SD, skip1=None, skip2=None, bias=None,
        scales=weights_TK.to(ys_SD.dtype),
        expanded_src_to_dst_row=src_to_dst_S,
        export_for_source_row=ids32_TK,
    )


def _expert_offsets(tnpu: ModuleType, sorted_ids_S: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Cumulative end row of every expert's block (group_list_type=0), int64."""
    if hasattr(tnpu, "npu_moe_compute_expert_tokens"):
        return tnpu.npu_moe_compute_expert_tokens(sorted_ids_S, num_experts).to(torch.int64)
    counts_E = torch.bincount(sorted_ids_S.to(torch.int64), minlength=num_experts)
    return torch.cumsum(counts_E, 0)

