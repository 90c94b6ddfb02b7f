"""GQA-aware attention products shared by the invariant-term and spectral fingerprints.

Shapes: H query heads, KV key/value heads, hd head_dim, D hidden size, N tokens. HF layout: q/k/v
weights are [heads*hd, D], o_proj is [D, H*hd]; query head h reads key/value head h // (H / KV).
"""

from __future__ import annotations

import torch

from modelkin.compare.fingerprints.weights import ModelWeights


def repeat_kv(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """[KV*hd, D] -> [H*hd, D]: each key/value head's rows repeated for the query heads that read it."""
    hd = w.shape[0] // num_kv_heads
    return w.reshape(num_kv_heads, hd, -1).repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(
        num_heads * hd, -1)


def group_sum_q(wq: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """[H*hd, D] -> [KV*hd, D]: query-head rows summed within each key/value group.

    Σ_h Wq_hᵀ Wk_g(h) = Σ_g (Σ_{h∈g} Wq_h)ᵀ Wk_g, so the QK bilinear form has rank ≤ KV*hd.
    """
    hd = wq.shape[0] // num_heads
    return wq.reshape(num_kv_heads, num_heads // num_kv_heads, hd, -1).sum(1).reshape(num_kv_heads * hd, -1)


def group_sum_o(wo: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """[D, H*hd] -> [D, KV*hd]: o_proj columns summed over the query heads of each key/value group."""
    hd = wo.shape[1] // num_heads
    d = wo.shape[0]
    return wo.reshape(d, num_kv_heads, num_heads // num_kv_heads, hd).sum(2).reshape(d, num_kv_heads * hd)


def qk_factors(w: ModelWeights, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with the QK bilinear form Σ_h Wq_hᵀ Wk_g(h) = Lᵀ R, both [KV*hd, D]."""
    g = w.geometry()
    wq, wk = w.get(layer, "q"), w.get(layer, "k")
    return group_sum_q(wq, g.num_heads, g.num_kv_heads), wk


def vo_factors(w: ModelWeights, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with the VO map Σ_h Wv_g(h)ᵀ Wo_hᵀ = Lᵀ R, both [KV*hd, D]."""
    g = w.geometry()
    wv, wo = w.get(layer, "v"), w.get(layer, "o")
    return wv, group_sum_o(wo, g.num_heads, g.num_kv_heads).T


def product_singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of leftᵀ·right (both [r, D], r ≤ D) from two thin QRs: only r×r matrices are SVD'd.

    Float64 where the device has it; Ascend NPUs lack float64 QR/SVD, so the small factors go to the CPU.
    """
    if left.device.type == "npu":
        left, right = left.cpu(), right.cpu()
    _, r1 = torch.linalg.qr(left.T.double(), mode="r")  # R only: Q is never formed
    _, r2 = torch.linalg.qr(right.T.double(), mode="r")
    return torch.linalg.svdvals(r1 @ r2.T).float()
