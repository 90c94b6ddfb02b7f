"""Qwen2 / Qwen2.5 decoder.

HF reference: transformers/models/qwen2/modeling_qwen2.py.
Differs from Llama by: q/k/v projections always carry biases (o_proj never does); embeddings tied in
the small sizes (tie_word_embeddings), untied in the large ones; rope_theta 1e6 and optional yarn.
"""

from __future__ import annotations

import dataclasses

from modelkin.checkpoint.lazy import StateDict
from modelkin.errors import ConfigError
from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.layers import MLP, Attention, DecoderLayer
from modelkin.runtime.models.causal_lm import TINY_DENSE, CausalLM, Tiny, drop_rotary_buffers, same_names


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    use_sliding_window: bool = False
    sliding_window: int | None = None  # only read when use_sliding_window is true

    def validate(self) -> None:
        DecoderArgs.validate(self)
        if self.use_sliding_window:
            raise ConfigError(
                "Qwen2 with use_sliding_window=true is not supported (per-layer windows)",
                hint="set use_sliding_window to false in config.json; released Qwen2/2.5 do",
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
        qkv_bias=True,
        o_bias=False,
    )
    mlp = MLP(args.hidden_size, args.intermediate_size)
    return DecoderLayer(self_attn=attn, mlp=mlp, hidden_size=args.hidden_size, eps=args.rms_norm_eps)


def remap_weights(state: StateDict) -> StateDict:
    """HF names are ours: only drop stored rotary buffers."""
    return drop_rotary_buffers(state)


to_checkpoint = same_names

TINY = Tiny(
    config={
        **TINY_DENSE,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "use_sliding_window": False,
        "max_window_layers": 2,
        "tie_word_embeddings": True,
        "bos_token_id": 0,  # <|endoftext|>
        "eos_token_id": 2,  # <|im_end|>
    },
    tokenizer="bpe",
)
