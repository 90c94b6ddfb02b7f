"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): ``Qwen3MoeForCausalLM``, model_type ``qwen3_moe``.

HF reference: transformers/models/qwen3_moe/modeling_qwen3_moe.py.
Differs from Qwen2-MoE by: per-head RMSNorm on q and k before rotary (``q_norm``/``k_norm``), no
attention biases unless ``attention_bias``, explicit ``head_dim``, and no shared expert.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from modelkin.checkpoint.lazy import StateDict
from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.layers import MLP, Attention, DecoderLayer
from modelkin.runtime.models.causal_lm import TINY_MOE, CausalLM, Tensors, Tiny, drop_rotary_buffers
from modelkin.runtime.models.qwen2_moe import alias_expert_count, is_sparse_layer, validate_sparse_layout
from modelkin.runtime.moe import Router, RouterPolicy, SparseMoeBlock, StackedExperts
from modelkin.runtime.moe.weights import stack_layer_experts, unstack_layer_experts


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] | list[int] = ()
    attention_bias: bool = False
    use_sliding_window: bool = False

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        return DecoderArgs.from_hf_config.__func__(cls, alias_expert_count(config))

    def validate(self) -> None:
        DecoderArgs.validate(self)
        validate_sparse_layout(self)

    def is_sparse(self, i: int) -> bool:
        return is_sparse_layer(self, i)


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
    if args.is_sparse(i):
        mlp: nn.Module = SparseMoeBlock(
            gate=Router(
                args.hidden_size,
                args.num_experts,
                policy=RouterPolicy.SOFTMAX_TOPK,
                top_k=args.num_experts_per_tok,
                norm_topk_prob=args.norm_topk_prob,
            ),
            experts=StackedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size),
            layer_idx=i,
        )
    else:
        mlp = MLP(args.hidden_size, args.intermediate_size)
    return DecoderLayer(self_attn=attn, mlp=mlp, hidden_size=args.hidden_size, eps=args.rms_norm_eps)


def remap_weights(state: StateDict) -> StateDict:
    """Stack each sparse layer's per-expert tensors; drop stored rotary buffers."""
    return stack_layer_experts(drop_rotary_buffers(state), "mlp")


def to_checkpoint(tensors: Tensors, args: ModelArgs) -> Tensors:
    """The inverse of ``remap_weights``: per-expert names (rotary buffers are not stored)."""
    return unstack_layer_experts(tensors)


TINY = Tiny(
    config={
        **TINY_MOE,
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "head_dim": 32,  # explicit and != hidden_size / heads, as in the releases
        "intermediate_size": 96,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 2,
    },
    tokenizer="bpe",
)
