"""Qwen3 dense decoder (Qwen3-0.6B … 32B): ``Qwen3ForCausalLM``, model_type ``qwen3``.

HF reference: transformers/models/qwen3/modeling_qwen3.py.
Differs from Llama by: per-head RMSNorm on q and k before rotary (``q_norm``/``k_norm``), explicit
``head_dim`` (not hidden_size / heads), embeddings tied in the small sizes, rope_theta 1e6.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from modelkin.errors import ConfigError
from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.kv_cache import KVCache
from modelkin.runtime.layers import MLP, Attention, DecoderLayer, DecoderStack, Linear
from modelkin.runtime.loader import StateDict, check_qk_norms, drop_rotary_buffers


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    attention_bias: bool = False  # q, k, v and o_proj alike; false in every release
    use_sliding_window: bool = False
    sliding_window: int | None = None  # only read when use_sliding_window is true

    def validate(self) -> None:
        DecoderArgs.validate(self)
        if self.use_sliding_window:
            raise ConfigError(
                "Qwen3 with use_sliding_window=true is not supported (per-layer windows)",
                hint="set use_sliding_window to false in config.json; released Qwen3 models do",
            )


class Model(nn.Module):
    """Causal LM: ``model`` (embeddings, layers, norm) then ``lm_head``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.sliding_window = None
        layers = [_layer(args, i) for i in range(args.num_hidden_layers)]
        self.model = DecoderStack(args=args, layers=layers)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids_BL: torch.Tensor,
        *,
        positions_BL: torch.Tensor,
        mask_BLS: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        h = self.model(input_ids_BL, positions_BL=positions_BL, mask_BLS=mask_BLS, cache=cache)
        return self.lm_head(h[:, -1:] if last_only else h)


def _layer(args: ModelArgs, i: int) -> DecoderLayer:
    attn = Attention(
        layer_idx=i,
        hidden_size=args.hidden_size,
        num_heads=args.num_attention_heads,
        num_kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        qk_norm_eps=args.rms_norm_eps,
    )
    mlp = MLP(args.hidden_size, args.intermediate_size)
    return DecoderLayer(self_attn=attn, mlp=mlp, hidden_size=args.hidden_size, eps=args.rms_norm_eps)


def remap_weights(state: StateDict) -> StateDict:
    """HF names are ours: drop stored rotary buffers; q/k norms must be present."""
    state = drop_rotary_buffers(state)
    check_qk_norms(state, "Qwen3")
    return state
