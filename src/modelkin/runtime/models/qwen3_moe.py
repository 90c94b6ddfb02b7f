"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): ``Qwen3MoeForCausalLM``, model_type ``qwen3_moe``.

HF reference: transformers/models/qwen3_moe/modeling_qwen3_moe.py.
Differs from Qwen2-MoE by: per-head RMSNorm on q and k before rotary (``q_norm``/``k_norm``), no
attention biases unless ``attention_bias``, explicit ``head_dim``, and no shared expert.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.kv_cache import KVCache
from modelkin.runtime.layers import MLP, Attention, DecoderLayer, DecoderStack
from modelkin.runtime.loader import StateDict, drop_rotary_buffers
from modelkin.runtime.models.qwen2_moe import alias_expert_count, is_sparse_layer, validate_sparse_layout
from modelkin.runtime.moe import Router, RouterPolicy, SparseMoeBlock, StackedExperts
from modelkin.runtime.moe.weights import stack_layer_experts


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


class Model(nn.Module):
    """Causal LM: ``model`` (embeddings, layers, norm) then ``lm_head``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.sliding_window = None
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
