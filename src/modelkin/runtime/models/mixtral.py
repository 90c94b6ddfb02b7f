"""Mixtral (8x7B, 8x22B): ``MixtralForCausalLM``, model_type ``mixtral``.

HF reference: transformers/models/mixtral/modeling_mixtral.py.
Differs from Llama/Mistral by: every MLP is sparse — softmax top-k router, always renormalised,
over ``num_local_experts`` experts of width ``intermediate_size``. Checkpoints name the block
``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down); like transformers 5 we
call the block ``mlp`` and stack the experts at load.
"""

from __future__ import annotations

import dataclasses

from modelkin.checkpoint.lazy import StateDict
from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.layers import Attention, DecoderLayer
from modelkin.runtime.models.causal_lm import TINY_MOE, CausalLM, Tensors, Tiny, drop_rotary_buffers
from modelkin.runtime.moe import Router, RouterPolicy, SparseMoeBlock, StackedExperts
from modelkin.runtime.moe.weights import MIXTRAL_NAMES, stack_layer_experts, unstack_layer_experts

CHECKPOINT_BLOCK = ".block_sparse_moe."


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0


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
    )
    mlp = SparseMoeBlock(
        gate=Router(
            args.hidden_size,
            args.num_local_experts,
            policy=RouterPolicy.SOFTMAX_TOPK,
            top_k=args.num_experts_per_tok,
            norm_topk_prob=True,
        ),
        experts=StackedExperts(args.num_local_experts, args.hidden_size, args.intermediate_size),
        layer_idx=i,
    )
    return DecoderLayer(self_attn=attn, mlp=mlp, hidden_size=args.hidden_size, eps=args.rms_norm_eps)


def remap_weights(state: StateDict) -> StateDict:
    """``block_sparse_moe`` → ``mlp``, then stack w1/w3/w2 per layer; drop stored rotary buffers."""
    renamed = {k.replace(CHECKPOINT_BLOCK, ".mlp."): v for k, v in drop_rotary_buffers(state).items()}
    return stack_layer_experts(renamed, "mlp", names=MIXTRAL_NAMES)


def to_checkpoint(tensors: Tensors, args: ModelArgs) -> Tensors:
    """The inverse of ``remap_weights``: per-expert w1/w3/w2 under ``block_sparse_moe``."""
    split = unstack_layer_experts(tensors, names=MIXTRAL_NAMES)
    return {k.replace(".mlp.", CHECKPOINT_BLOCK): v for k, v in split.items()}


TINY = Tiny(
    config={
        **TINY_MOE,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "intermediate_size": 48,  # per expert
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    tokenizer="sentencepiece",
)
