"""What every architecture file shares: the causal-LM wrapper (``model`` decoder stack, then
``lm_head``), the weight-remap helpers, and the make-tiny entry type with its common config keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modelkin.checkpoint.lazy import StateDict
from modelkin.errors import ConfigError
from modelkin.runtime.cpu_kernels import Linear
from modelkin.runtime.kv_cache import KVCache
from modelkin.runtime.layers import DecoderLayer, DecoderStack

Tensors = dict[str, torch.Tensor]


class CausalLM(nn.Module):
    """Causal LM: ``model`` (embeddings, ``build_layer(args, i)`` per layer, norm) then ``lm_head``.

    Architecture files subclass it as their ``Model(args)``, naming their layer builder and
    whether the config's ``sliding_window`` applies to every layer.
    """

    def __init__(
        self,
        args: Any,
        build_layer: Callable[[Any, int], DecoderLayer],
        *,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.args = args
        self.sliding_window = sliding_window
        layers = [build_layer(args, i) for i in range(args.num_hidden_layers)]
        self.model = DecoderStack(args=args, layers=layers)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
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


def drop_rotary_buffers(state: StateDict) -> StateDict:
    """Remove stored ``rotary_emb.inv_freq`` buffers: the model recomputes them from the config."""
    return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def check_qk_norms(state: StateDict, family: str) -> None:
    """Raise a one-line ConfigError when a layer has q_proj but no q_norm/k_norm weight."""
    for name in state:
        if name.endswith("self_attn.q_proj.weight"):
            for norm in ("q_norm", "k_norm"):
                needed = name.replace("q_proj.weight", f"{norm}.weight")
                if needed not in state:
                    raise ConfigError(f"{family} checkpoint lacks the per-head {norm} tensor {needed}",
                                      hint=f"{family} needs self_attn.q_norm and k_norm in every layer")


def same_names(tensors: Tensors, args: Any) -> Tensors:
    """``to_checkpoint`` of an architecture whose checkpoint names and layout are the model's."""
    return dict(tensors)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Tiny:
    """An architecture's make-tiny entry (written by synth/tiny.py): config.json as its real
    checkpoints spell it, and the kind of tiny tokenizer ('bpe', 'sentencepiece', 'pangu') to write."""

    config: dict[str, Any]
    tokenizer: str


# keys every tiny config.json shares; vocab_size is the tiny tokenizers'
TINY_BASE: dict[str, Any] = {
    "hidden_act": "silu",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "float32",
    "vocab_size": 512,
}
TINY_DENSE = {**TINY_BASE, "intermediate_size": 160, "bos_token_id": 1, "eos_token_id": 2}
TINY_MOE = {**TINY_BASE, "router_aux_loss_coef": 0.001, "output_router_logits": False}
