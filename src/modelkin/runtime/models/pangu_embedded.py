"""openPangu-Embedded (1B / 7B) decoder: ``PanguEmbeddedForCausalLM``, model_type ``PanguEmbedded``.

Reference: the checkpoint's own modeling_openpangu_dense.py (a LlamaForCausalLM subclass).
Differs from Llama by: config key ``bias`` (not ``attention_bias``) puts biases on q, k, v *and*
o_proj; rope_theta 1.6e7 (7B) or 4e6 (1B); checkpoints store ``rotary_emb.inv_freq`` buffers.
"""

from __future__ import annotations

import dataclasses

import torch

from modelkin.checkpoint.lazy import StateDict
from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.layers import MLP, Attention, DecoderLayer
from modelkin.runtime.models.causal_lm import TINY_DENSE, CausalLM, Tensors, Tiny, drop_rotary_buffers


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    bias: bool = True  # q/k/v/o biases (the 1B and 7B releases set it true)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 16000000.0


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
        qkv_bias=args.bias,
        o_bias=args.bias,
    )
    mlp = MLP(args.hidden_size, args.intermediate_size)
    return DecoderLayer(self_attn=attn, mlp=mlp, hidden_size=args.hidden_size, eps=args.rms_norm_eps)


def remap_weights(state: StateDict) -> StateDict:
    """HF names are ours; the stored ``rotary_emb.inv_freq`` buffers are recomputed, so dropped."""
    return drop_rotary_buffers(state)


def to_checkpoint(tensors: Tensors, args: ModelArgs) -> Tensors:
    """The inverse of ``remap_weights``: add each layer's ``rotary_emb.inv_freq``, as released."""
    exponent = torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim
    inv_freq = 1.0 / (args.rope_theta**exponent)
    rotary = {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone()
        for i in range(args.num_hidden_layers)
    }
    return {**tensors, **rotary}


TINY = Tiny(
    config={
        **TINY_DENSE,
        "architectures": ["PanguEmbeddedForCausalLM"],
        "model_type": "PanguEmbedded",
        "auto_map": {
            "AutoConfig": "configuration_openpangu_dense.PanguEmbeddedConfig",
            "AutoModelForCausalLM": "modeling_openpangu_dense.PanguEmbeddedForCausalLM",
        },
        "bias": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 16000000.0,
        "tie_word_embeddings": False,  # the 1B release ties, the 7B does not
        "bos_token_id": 1,
        "eos_token_id": 5,  # [unused10], as in the real release
        "pad_token_id": 0,
    },
    tokenizer="pangu",
)
