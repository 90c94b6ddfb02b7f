"""Llama decoder (Llama 2/3, SmolLM2, Mistral-style checkpoints).

HF reference: transformers/models/llama/modeling_llama.py (and mistral/modeling_mistral.py, which
differs only by the optional sliding window).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.kv_cache import KVCache
from modelkin.runtime.layers import MLP, Attention, DecoderLayer, DecoderStack, Linear
from modelkin.runtime.loader import StateDict, drop_rotary_buffers


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    attention_bias: bool = False  # biases on q, k, v and o_proj alike
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral v0.1 only; null in later Mistral configs


class Model(nn.Module):
    """Causal LM: ``model`` (embeddings, layers, norm) then ``lm_head``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.sliding_window = args.sliding_window
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
    )
    mlp = MLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
    return DecoderLayer(self_attn=attn, mlp=mlp, hidden_size=args.hidden_size, eps=args.rms_norm_eps)


def remap_weights(state: StateDict) -> StateDict:
    """HF names are ours: only drop stored rotary buffers."""
    return drop_rotary_buffers(state)
