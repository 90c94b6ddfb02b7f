"""Pangu Pro MoE 72B-A16B: ``PanguProMoEForCausalLM``, model_type ``PanguProMoE`` (MoGE).

Reference: no transformers class; facts from the implementations that load the release (its own
modeling code, vLLM-Ascend), checked against tests/test_moe_models.py's independent float64 reference.
Differs from Llama by: q/k/v *and* o_proj biases; every layer is a Mixture of Grouped Experts — one
global softmax over E experts, top-1 inside each of G = num_experts_per_tok contiguous groups,
weight p·router_scale[e], no renormalisation — plus an ungated shared expert of width
``shared_expert_intermediate_size``; no dense-MLP layers (``intermediate_size`` is null).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from modelkin.checkpoint.lazy import LazyTensor, StateDict
from modelkin.errors import ConfigError, UnsupportedArchitectureError
from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.layers import MLP, Attention, DecoderLayer
from modelkin.runtime.models.causal_lm import TINY_MOE, CausalLM, Tensors, Tiny, drop_rotary_buffers
from modelkin.runtime.moe import Router, RouterPolicy, SparseMoeBlock, StackedExperts
from modelkin.runtime.moe.weights import stack_layer_experts, unstack_layer_experts


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    num_experts: int
    num_experts_per_tok: int  # also the number of expert groups (one pick per group)
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    intermediate_size: int = 0  # null in the release: no dense layers
    positive_keys: ClassVar[tuple[str, ...]] = tuple(
        k for k in DecoderArgs.positive_keys if k != "intermediate_size"
    )
    rms_norm_eps: float = 1e-5
    rope_theta: float = 16000000.0
    architectures: tuple[str, ...] | list[str] = ()

    @property
    def num_groups(self) -> int:
        return self.num_experts_per_tok

    def validate(self) -> None:
        DecoderArgs.validate(self)
        if any("V2" in a for a in self.architectures):
            # openPangu-R-72B-2512 reuses model_type PanguProMoE but is a different model
            raise UnsupportedArchitectureError(
                f"{self.architectures[0]} (Pangu Pro MoE V2) is not supported",
                hint="modelkin implements PanguProMoEForCausalLM (v1, MoGE)",
            )
        if self.num_experts_per_tok <= 0 or self.num_experts % self.num_experts_per_tok:
            raise ConfigError(
                f"num_experts={self.num_experts} is not divisible into num_experts_per_tok="
                f"{self.num_experts_per_tok} expert groups (MoGE picks one expert per group)",
                hint="fix num_experts / num_experts_per_tok in config.json (the release has 64 / 8)",
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
        o_bias=True,
    )
    mlp = SparseMoeBlock(
        gate=Router(
            args.hidden_size,
            args.num_experts,
            policy=RouterPolicy.MOGE,
            top_k=args.num_experts_per_tok,
            num_groups=args.num_groups,
        ),
        experts=StackedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size),
        shared_expert=MLP(args.hidden_size, args.shared_expert_intermediate_size),
        router_scale=True,
        layer_idx=i,
    )
    return DecoderLayer(self_attn=attn, mlp=mlp, hidden_size=args.hidden_size, eps=args.rms_norm_eps)


def remap_weights(state: StateDict) -> StateDict:
    """Stack experts per layer, flatten ``mlp.router_scale`` [1, E] → [E], drop rotary buffers.

    Raises:
        ConfigError: a MoE layer lacks ``mlp.router_scale`` (MoGE weights cannot be formed without it).
    """
    state = drop_rotary_buffers(state)
    for name in [k for k in state if k.endswith(".mlp.gate.weight")]:
        scale_name = name.removesuffix("gate.weight") + "router_scale"
        scale = state.get(scale_name)
        if scale is None:
            raise ConfigError(
                f"{scale_name} is missing: Pangu Pro MoE's MoGE router weights every chosen expert by "
                "its router_scale",
                hint="use the complete released checkpoint (every layer stores mlp.router_scale)",
            )
        state[scale_name] = _flatten(scale)
    return stack_layer_experts(state, "mlp")


def _flatten(t: LazyTensor) -> LazyTensor:
    numel = 1
    for n in t.shape:
        numel *= n
    return LazyTensor((numel,), lambda: t.load().reshape(-1), t.sources, t.nbytes)


def to_checkpoint(tensors: Tensors, args: ModelArgs) -> Tensors:
    """The inverse of ``remap_weights``: per-expert names, router_scale [1, E]."""
    out = unstack_layer_experts(tensors)
    for name in [k for k in out if k.endswith(".mlp.router_scale")]:
        out[name] = out[name].reshape(1, -1)
    return out


TINY = Tiny(
    config={
        **TINY_MOE,
        "architectures": ["PanguProMoEForCausalLM"],
        "model_type": "PanguProMoE",
        "auto_map": {
            "AutoConfig": "configuration_pangu_moe.PanguProMoEConfig",
            "AutoModelForCausalLM": "modeling_pangu_moe.PanguProMoEForCausalLM",
        },
        "num_experts": 16,
        "num_experts_per_tok": 4,  # 4 groups of 4 experts, one pick per group
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 128,  # 4 × moe_intermediate_size, as released
        "rms_norm_eps": 1e-5,
        "rope_theta": 16000000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 5,  # [unused10] in the tiny Pangu tokenizer
        "pad_token_id": 0,
    },
    tokenizer="pangu",
)
