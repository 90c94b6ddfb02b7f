"""Llama decoder (Llama 2/3, SmolLM2, Mistral-style checkpoints).

HF reference: transformers/models/llama/modeling_llama.py (and mistral/modeling_mistral.py, which
differs only by the optional sliding window).
"""

from __future__ import annotations

import dataclasses

from modelkin.checkpoint.lazy import StateDict
from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.layers import MLP, Attention, DecoderLayer
from modelkin.runtime.models.causal_lm import TINY_DENSE, CausalLM, Tiny, drop_rotary_buffers, same_names


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    attention_bias: bool = False  # biases on q, k, v and o_proj alike
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral v0.1 only; null in later Mistral configs


class Model(CausalLM):
    """Causal LM of ``_layer`` blocks (causal_lm.py)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, _layer, sliding_window=args.sliding_window)


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


to_checkpoint = same_names

TINY = Tiny(
    config={
        **TINY_DENSE,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": False,
    },
    tokenizer="sentencepiece",
)
