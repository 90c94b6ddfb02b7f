"""Qwen3 dense decoder (Qwen3-0.6B … 32B): ``Qwen3ForCausalLM``, model_type ``qwen3``.

HF reference: transformers/models/qwen3/modeling_qwen3.py.
Differs from Llama by: per-head RMSNorm on q and k before rotary (``q_norm``/``k_norm``), explicit
``head_dim`` (not hidden_size / heads), embeddings tied in the small sizes, rope_theta 1e6.
"""

from __future__ import annotations

import dataclasses

from modelkin.checkpoint.lazy import StateDict
from modelkin.errors import ConfigError
from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.layers import MLP, Attention, DecoderLayer
from modelkin.runtime.models.causal_lm import (
    TINY_DENSE,
    CausalLM,
    Tiny,
    check_qk_norms,
    drop_rotary_buffers,
    same_names,
)


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


class Model(CausalLM):
    """Causal LM of ``_layer`` blocks (causal_lm.py)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, _layer, sliding_window=None)


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


to_checkpoint = same_names

TINY = Tiny(
    config={
        **TINY_DENSE,
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "head_dim": 32,  # explicit and not hidden_size / heads, as in the real releases
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": 2,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 2,
    },
    tokenizer="bpe",
)
