"""Shared decoder blocks: RMSNorm, rotary embedding (with rope_scaling variants), GQA attention,
SwiGLU MLP, the pre-norm DecoderLayer and the DecoderStack (embeddings, layers, final norm).

Shape legend: B batch, L new tokens, S key slots (cache + new), H query heads, K kv heads,
D model dimension, Dh head dimension, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from modelkin.errors import ConfigError
from modelkin.runtime.cpu_kernels import Linear, one_cpu_thread

ATTEND_TEAM_MIN = 64  # batch x kv heads from which decode attention uses the intra-op threads

if TYPE_CHECKING:
    from modelkin.runtime.kv_cache import KVCache

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [B, 1, L, Dh]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, with the statistic in fp32 (as HF and vLLM do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, bit-identical to the lines below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Dh/2] (fp32, CPU) and the cos/sin scale for a rope_scaling dict.

    Supports rope types default, linear, llama3 and yarn (formulas as in the Llama 3 and YaRN papers).

    Raises:
        ConfigError: an unsupported rope type or a missing scaling key.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    try:
        if kind == "default":
            return inv_freq, 1.0
        if kind == "linear":
            return inv_freq / scaling["factor"], 1.0
        original = scaling.get("original_max_position_embeddings", max_position_embeddings)
        if kind == "llama3":
            return _llama3_inv_freq(inv_freq, scaling, original), 1.0
        if kind == "yarn":
            return _yarn_inv_freq(head_dim, theta, scaling, original, max_position_embeddings)
    except KeyError as err:
        raise ConfigError(
            f"rope_scaling of type {kind!r} lacks the key {err.args[0]!r}", hint="fix config.json"
        ) from None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError) as err:
        raise ConfigError(
            f"rope_scaling {scaling!r} is invalid ({err})"[:300], hint="fix config.json"
        ) from None
    raise ConfigError(
        f"rope_scaling type {kind!r} is not supported",
        hint="supported rope types: default, linear, llama3, yarn",
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any], original: int) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(
    dim: int, base: float, s: dict[str, Any], original: int, max_positions: int
) -> tuple[torch.Tensor, float]:
    factor = s.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; NeoX layout (first half / second half of Dh)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        # fp32, not persistent: recomputed from the config, never read from a checkpoint
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, positions_BL: torch.Tensor, dtype: torch.dtype) -> Rope:
        freqs = positions_BL.float()[..., None] * self.inv_freq  # [B, L, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, L, Dh]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    cos, sin = rope
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, optional biases and optional q/k RMSNorm.

    The KV cache is an explicit argument: new keys/values are written into it and attention runs
    over every slot it holds, under the explicit boolean mask ``mask_BLS`` (True = may attend).
    """

    def __init__(
        self,
        *,
        layer_idx: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        if qk_norm_eps is not None:  # Qwen3-style per-head norm before rotary
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x_BLD: torch.Tensor,
        *,
        rope: Rope,
        mask_BLS: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        q_BLHd = self.q_proj(x_BLD).view(B, L, self.num_heads, self.head_dim)
        k_BLKd = self.k_proj(x_BLD).view(B, L, self.num_kv_heads, self.head_dim)
        v_BKLd = self.v_proj(x_BLD).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q_BLHd, k_BLKd = self.q_norm(q_BLHd), self.k_norm(k_BLKd)
        q_BHLd = apply_rotary(q_BLHd.transpose(1, 2), rope)
        k_BKLd = apply_rotary(k_BLKd.transpose(1, 2), rope)
        if cache is not None:
            k_BKLd, v_BKLd = cache.update(self.layer_idx, k_BKLd, v_BKLd)
        out_BHLd = attend(q_BHLd, k_BKLd, v_BKLd, mask_BLS)
        return self.o_proj(out_BHLd.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))


def attend(
    q_BHLd: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor, mask_BLS: torch.Tensor | None
) -> torch.Tensor:
    """Scaled dot-product attention with GQA; ``mask_BLS`` None means every key slot is visible."""
    if torch.jit.is_tracing():  # TorchScript ONNX export (export/onnx.py): one path for every L
        return _attend_traced(q_BHLd, k_BKSd, v_BKSd, mask_BLS)
    _, H, L, _ = q_BHLd.shape
    K = k_BKSd.shape[1]
    if L == 1:
        return _attend_one(q_BHLd, k_BKSd, v_BKSd, mask_BLS)
    mask = None if mask_BLS is None else mask_BLS[:, None]  # [B, 1, L, S]
    # contiguous copies: SDPA's CPU kernels are very slow on strided views of the cache
    q, k, v = q_BHLd.contiguous(), k_BKSd.contiguous(), v_BKSd.contiguous()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != K)


def _attend_traced(
    q_BHLd: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor, mask_BLS: torch.Tensor | None
) -> torch.Tensor:
    """``attend`` for tracing: no branch on shapes (traced sizes are tensors) and the kv heads
    repeated explicitly, since the TorchScript ONNX exporter cannot convert ``enable_gqa``."""
    B, H, L, Dh = q_BHLd.shape
    K, S = k_BKSd.shape[1], k_BKSd.shape[2]
    k_BHSd = k_BKSd[:, :, None].expand(B, K, H // K, S, Dh).reshape(B, H, S, Dh)
    v_BHSd = v_BKSd[:, :, None].expand(B, K, H // K, S, Dh).reshape(B, H, S, Dh)
    mask = None if mask_BLS is None else mask_BLS[:, None]
    return F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, attn_mask=mask)


def _attend_one(
    q_BH1d: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor, mask_B1S: torch.Tensor | None
) -> torch.Tensor:
    """One query per sequence (decoding), as two matmuls straight on the cache views.

    The G = H / K query heads sharing a kv head fold into the query axis, so each group's keys are
    read once and never repeated.
    """
    B, H, _, Dh = q_BH1d.shape
    K = k_BKSd.shape[1]
    q_BKGd = q_BH1d.view(B, K, H // K, Dh)
    # a few sequences: too little work for a thread team; a large batch (compare's 128 sampled rows)
    # runs ~1.6x faster on two threads
    with one_cpu_thread(q_BH1d.device) if B * K < ATTEND_TEAM_MIN else contextlib.nullcontext():
        scores_BKGS = torch.matmul(q_BKGd, k_BKSd.transpose(-1, -2)) * Dh**-0.5
        if mask_B1S is not None:
            scores_BKGS = scores_BKGS.masked_fill(~mask_B1S[:, None], float("-inf"))
        probs_BKGS = scores_BKGS.float().softmax(dim=-1).to(v_BKSd.dtype)
        return torch.matmul(probs_BKGS, v_BKSd).view(B, H, 1, Dh)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: attention then feed-forward, each added to the residual stream.

    ``mlp`` is any module called as ``mlp(x)``: the dense MLP here, or a MoE block from moe.py.
    """

    def __init__(self, *, self_attn: Attention, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(
        self, x: torch.Tensor, *, rope: Rope, mask_BLS: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope=rope, mask_BLS=mask_BLS, cache=cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)``; built on the meta device (models are, before their weights are
    read) it skips the random initialisation, whose meta version runs a Python decomposition that
    imports torch._dynamo and sympy: ~900 modules and ~0.07 GB on the first load of a process."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class DecoderStack(nn.Module):
    """HF's inner ``model``: embed_tokens → layers → norm, with one rotary table for all layers."""

    def __init__(self, *, args: Any, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        inv_freq, scale = rope_inv_freq(
            args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings
        )
        self.rotary_emb = RotaryEmbedding(inv_freq, scale)

    def forward(
        self,
        input_ids_BL: torch.Tensor,
        *,
        positions_BL: torch.Tensor,
        mask_BLS: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids_BL)
        rope = self.rotary_emb(positions_BL, h.dtype)
        for layer in self.layers:
            h = layer(h, rope=rope, mask_BLS=mask_BLS, cache=cache)
        if cache is not None:
            cache.advance(input_ids_BL.shape[1])
        return self.norm(h)
