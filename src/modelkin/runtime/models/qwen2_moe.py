"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): ``Qwen2MoeForCausalLM``, model_type ``qwen2_moe``.

HF reference: transformers/models/qwen2_moe/modeling_qwen2_moe.py.
Differs from Qwen2 by: every ``decoder_sparse_step``-th layer not in ``mlp_only_layers`` has a sparse
block — softmax top-k router (renormalised only with ``norm_topk_prob``), stacked experts, and a
shared expert scaled by sigmoid(shared_expert_gate(x)); q/k/v biases follow ``qkv_bias`` (default on).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from modelkin.checkpoint.lazy import StateDict
from modelkin.errors import ConfigError
from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.layers import MLP, Attention, DecoderLayer
from modelkin.runtime.models.causal_lm import TINY_MOE, CausalLM, Tensors, Tiny, drop_rotary_buffers
from modelkin.runtime.moe import Router, RouterPolicy, SparseMoeBlock, StackedExperts
from modelkin.runtime.moe.weights import stack_layer_experts, unstack_layer_experts


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] | list[int] = ()
    qkv_bias: bool = True
    use_sliding_window: bool = False

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        return DecoderArgs.from_hf_config.__func__(cls, alias_expert_count(config))

    def validate(self) -> None:
        DecoderArgs.validate(self)
        validate_sparse_layout(self)

    def is_sparse(self, i: int) -> bool:
        return is_sparse_layer(self, i)


def alias_expert_count(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 may save ``num_local_experts`` for ``num_experts`` (Qwen3-MoE); the releases
    spell ``num_experts``."""
    if config.get("num_experts") is None and config.get("num_local_experts") is not None:
        return {**config, "num_experts": config["num_local_experts"]}
    return config


def validate_sparse_layout(args: ModelArgs) -> None:
    """Checks shared by the Qwen MoE families (config keys named in the messages)."""
    if args.use_sliding_window:
        raise ConfigError(
            f"{args.model_type} with use_sliding_window=true is not supported",
            hint="set use_sliding_window to false in config.json; the released models do",
        )
    if args.decoder_sparse_step < 1:
        raise ConfigError(f"decoder_sparse_step={args.decoder_sparse_step} must be >= 1", hint="fix config.json")


def is_sparse_layer(args: ModelArgs, i: int) -> bool:
    """HF's rule: not in mlp_only_layers, experts exist, and (i + 1) % decoder_sparse_step == 0."""
    return i not in args.mlp_only_layers and args.num_experts > 0 and (i + 1) % args.decoder_sparse_step == 0


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
        qkv_bias=args.qkv_bias,
        o_bias=False,
    )
    mlp = _sparse_block(args, i) if args.is_sparse(i) else MLP(args.hidden_size, args.intermediate_size)
    return DecoderLayer(self_attn=attn, mlp=mlp, hidden_size=args.hidden_size, eps=args.rms_norm_eps)


def _sparse_block(args: ModelArgs, i: int) -> SparseMoeBlock:
    shared = args.shared_expert_intermediate_size
    return SparseMoeBlock(
        gate=Router(
            args.hidden_size,
            args.num_experts,
            policy=RouterPolicy.SOFTMAX_TOPK,
            top_k=args.num_experts_per_tok,
            norm_topk_prob=args.norm_topk_prob,
        ),
        experts=StackedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size),
        shared_expert=MLP(args.hidden_size, shared) if shared else None,
        shared_expert_gate=bool(shared),
        layer_idx=i,
    )


def remap_weights(state: StateDict) -> StateDict:
    """Stack each sparse layer's per-expert tensors; drop stored rotary buffers."""
    return stack_layer_experts(drop_rotary_buffers(state), "mlp")


def to_checkpoint(tensors: Tensors, args: ModelArgs) -> Tensors:
    """The inverse of ``remap_weights``: per-expert names (rotary buffers are not stored)."""
    return unstack_layer_experts(tensors)


TINY = Tiny(
    config={
        **TINY_MOE,
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "intermediate_size": 96,  # the dense MLP of mlp_only_layers
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 80,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "use_sliding_window": False,
        "max_window_layers": 2,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 2,
    },
    tokenizer="bpe",
)
