"""Mixtral (8x7B, 8x22B): ``MixtralForCausalLM``, model_type ``mixtral``.

HF reference: transformers/models/mixtral/modeling_mixtral.py.
Differs from Llama/Mistral by: every MLP is sparse — softmax top-k router, always renormalised,
over ``num_local_experts`` experts of width ``intermediate_size``. Checkpoints name the block
``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down); like transformers 5 we
call the block ``mlp`` and stack the experts at load.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.kv_cache import KVCache
from modelkin.runtime.layers import Attention, DecoderLayer, DecoderStack
from modelkin.runtime.loader import StateDict, drop_rotary_buffers
from modelkin.runtime.moe import Router, RouterPolicy, SparseMoeBlock, StackedExperts
from modelkin.runtime.moe.weights import MIXTRAL_NAMES, stack_layer_experts

CHECKPOINT_BLOCK = ".block_sparse_moe."


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0


class Model(nn.Module):
    """Causal LM: ``model`` (embeddings, layers, norm) then ``lm_head``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.sliding_window = args.sliding_window
        layers = [_layer(args, i) for i in range(args.num_hidden_layers)]
        self.model = DecoderStack(args=args, layers=layers)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
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


def to_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``remap_weights`` for real tensors (used by make-tiny)."""
    from modelkin.runtime.moe.weights import unstack_layer_experts

    split = unstack_layer_experts(tensors, names=MIXTRAL_NAMES)
    return {k.replace(".mlp.", CHECKPOINT_BLOCK): v for k, v in split.items()}
