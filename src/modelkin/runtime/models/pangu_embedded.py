"""openPangu-Embedded (1B / 7B) decoder: ``PanguEmbeddedForCausalLM``, model_type ``PanguEmbedded``.

Reference: the checkpoint's own modeling_openpangu_dense.py (a LlamaForCausalLM subclass); facts in
docs/pangu-pro-moe.md §8.
Differs from Llama by: config key ``bias`` (not ``attention_bias``) puts biases on q, k, v *and*
o_proj; rope_theta 1.6e7 (7B) or 4e6 (1B); checkpoints store ``rotary_emb.inv_freq`` buffers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.kv_cache import KVCache
from modelkin.runtime.layers import MLP, Attention, DecoderLayer, DecoderStack, Linear
from modelkin.runtime.loader import StateDict, drop_rotary_buffers


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    bias: bool = True  # q/k/v/o biases (the 1B and 7B releases set it true)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 16000000.0


class Model(nn.Module):
    """Causal LM: ``model`` (embeddings, layers, norm) then ``lm_head``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.sliding_window = None
        layers = [_layer(args, i) for i in range(args.num_hidden_layers)]
        self.model = DecoderStack(args=args, layers=layers)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:  # the 1B release ties, the 7B does not
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
        qkv_bias=args.bias,
        o_bias=args.bias,
    )
    mlp = MLP(args.hidden_size, args.intermediate_size)
    return DecoderLayer(self_attn=attn, mlp=mlp, hidden_size=args.hidden_size, eps=args.rms_norm_eps)


def remap_weights(state: StateDict) -> StateDict:
    """HF names are ours; the stored ``rotary_emb.inv_freq`` buffers are recomputed, so dropped."""
    return drop_rotary_buffers(state)
