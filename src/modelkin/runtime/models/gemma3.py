"""Gemma-3 text decoder (``Gemma3ForCausalLM``, model_type ``gemma3_text``; the language model of
``Gemma3ForConditionalGeneration`` checkpoints, whose vision tower is not run).

HF reference: transformers/models/gemma3/modeling_gemma3.py.
Differs from Llama by: embeddings scaled by sqrt(hidden_size); RMSNorm weights stored as w and applied
as (1 + w); four norms per layer (the attention and MLP outputs are normed before the residual add);
RMS-normed q and k per head; attention scale query_pre_attn_scalar^-0.5; sliding-window layers (per
``layer_types``) with their own rope base, global layers with rope_theta (+ rope_scaling); GeGLU MLP
with tanh GELU; optional final logit soft-capping.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from modelkin.checkpoint.lazy import StateDict
from modelkin.errors import ConfigError
from modelkin.runtime.config import DecoderArgs
from modelkin.runtime.cpu_kernels import Linear
from modelkin.runtime.kv_cache import KVCache
from modelkin.runtime.layers import MLP, Attention, Rope, RotaryEmbedding, embedding, rope_inv_freq
from modelkin.runtime.models.causal_lm import (
    TINY_DENSE,
    CausalLM,
    Tiny,
    check_qk_norms,
    drop_rotary_buffers,
    same_names,
)

SLIDING, FULL = "sliding_attention", "full_attention"
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs(DecoderArgs):
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str | None = None  # the Gemma-3 spelling; wins over hidden_act when set
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6  # pre-layer_types configs: every 6th layer is global
    layer_types: tuple[str, ...] | list[str] | None = None
    rope_local_base_freq: float = 10000.0
    attention_bias: bool = False
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool = False
    tie_word_embeddings: bool = True
    supported_acts: ClassVar[tuple[str, ...]] = GELU_TANH

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        d = text_config(config)
        types = d.get("layer_types")
        sliding = not isinstance(types, list) or SLIDING in types
        if "sliding_window" in d and d["sliding_window"] is None and sliding:
            raise ConfigError("config.json key 'sliding_window' is null but layer_types has sliding layers",
                              hint="set sliding_window (Gemma-3 uses 512 or 1024) in config.json")
        return DecoderArgs.from_hf_config.__func__(cls, d)

    def validate(self) -> None:
        DecoderArgs.validate(self)
        act = self.hidden_activation or self.hidden_act
        if act not in GELU_TANH:
            raise ConfigError(f"Gemma-3 hidden_activation {act!r} is not supported",
                              hint="Gemma-3 uses gelu_pytorch_tanh")
        types = self.kinds()
        if len(types) != self.num_hidden_layers or set(types) - {SLIDING, FULL}:
            raise ConfigError(
                f"config.json key 'layer_types' must list {self.num_hidden_layers} entries of "
                f"{SLIDING!r}/{FULL!r}, found {list(types)!r}"[:300],
                hint="fix layer_types (one per layer) in config.json",
            )
        if SLIDING in types and (self.sliding_window is None or self.sliding_window <= 0):
            raise ConfigError(
                f"config.json key 'sliding_window' must be a positive integer for the sliding layers "
                f"in layer_types, found {self.sliding_window!r}",
                hint="fix sliding_window in config.json",
            )
        if self.attn_logit_softcapping is not None:
            raise ConfigError("attn_logit_softcapping is not supported (Gemma-2 style)",
                              hint="Gemma-3 configs set it to null")
        if self.use_bidirectional_attention:
            raise ConfigError("use_bidirectional_attention=true (an encoder) is not supported",
                              hint="only causal Gemma-3 language models run")
        if self.query_pre_attn_scalar <= 0:
            raise ConfigError(f"config.json key 'query_pre_attn_scalar' must be positive, found "
                              f"{self.query_pre_attn_scalar}", hint="fix config.json")

    def kinds(self) -> tuple[str, ...]:
        """Each layer's attention kind (sliding or full)."""
        if self.layer_types is not None:
            return tuple(self.layer_types)
        p = self.sliding_window_pattern
        return tuple(SLIDING if p <= 0 or (i + 1) % p else FULL for i in range(self.num_hidden_layers))


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: ``text_config`` of a multimodal checkpoint, per-kind
    ``rope_parameters`` (transformers 5) split into rope_theta/rope_scaling/rope_local_base_freq.

    Raises:
        ConfigError: a multimodal config without ``text_config``, or an unsupported sliding rope.
    """
    d = dict(config)
    archs = d.get("architectures")
    if d.get("model_type") == "gemma3" or (isinstance(archs, list) and "Gemma3ForConditionalGeneration" in archs):
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("Gemma-3 multimodal config lacks 'text_config'",
                              hint="modelkin runs the language model only; it needs text_config")
        d = {**text, "model_type": "gemma3_text"}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            d.setdefault(key, config.get(key))
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        d.pop("rope_parameters")
        full, local = params.get(FULL), params.get(SLIDING)
        full, local = (x if isinstance(x, dict) else {} for x in (full, local))
        if "rope_theta" in full:
            d["rope_theta"] = full["rope_theta"]
        if full.get("rope_type", "default") != "default":
            d["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
        if "rope_theta" in local:
            d["rope_local_base_freq"] = local["rope_theta"]
        if local.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_parameters[{SLIDING!r}] of type {local['rope_type']!r} is not "
                              "supported", hint="Gemma-3 sliding layers use default rope")
    d.setdefault("rope_theta", 1_000_000.0)
    return d


class Model(CausalLM):
    """Causal LM: ``model`` (scaled embeddings, layers, norm) then ``lm_head``."""

    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)  # not CausalLM's stack: Gemma's has two rope tables and masks
        self.args = args
        self.sliding_window = None  # per layer: the stack narrows the mask of sliding layers itself
        self.model = Gemma3Stack(args)
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
        logits = self.lm_head(h[:, -1:] if last_only else h)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3Stack(nn.Module):
    """HF's inner ``model``: scaled embed_tokens -> layers -> norm; one rope table per layer kind."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.kinds = args.kinds()
        self.window = args.sliding_window
        self.embed_scale = math.sqrt(args.hidden_size)
        self.embed_tokens = embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        full = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)
        local = rope_inv_freq(args.head_dim, args.rope_local_base_freq, None, args.max_position_embeddings)
        self.rotary_emb = RotaryEmbedding(*full)
        self.rotary_emb_local = RotaryEmbedding(*local)

    def forward(
        self,
        input_ids_BL: torch.Tensor,
        *,
        positions_BL: torch.Tensor,
        mask_BLS: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids_BL)
        h = h * torch.tensor(self.embed_scale, dtype=h.dtype)  # scale rounded to the weights' dtype, as HF
        L = input_ids_BL.shape[1]
        if mask_BLS is not None:  # key slots: cache + new (the export's stand-in cache has no length)
            S = mask_BLS.shape[-1]
        else:
            S = L + (cache.length if cache is not None else 0)
        ropes = {FULL: self.rotary_emb(positions_BL, h.dtype)}
        masks = {FULL: mask_BLS}
        if SLIDING in self.kinds:
            ropes[SLIDING] = self.rotary_emb_local(positions_BL, h.dtype)
            masks[SLIDING] = window_mask(mask_BLS, L, S, self.window, h.device)
        for layer, kind in zip(self.layers, self.kinds):
            h = layer(h, rope=ropes[kind], mask_BLS=masks[kind], cache=cache)
        if cache is not None:
            cache.advance(L)
        return self.norm(h)


def window_mask(
    mask_BLS: torch.Tensor | None, L: int, S: int, window: int, device: torch.device
) -> torch.Tensor | None:
    """``mask_BLS`` (queries in the last L of S slots) narrowed to the ``window`` latest key slots."""
    if S <= window and not torch.jit.is_tracing():
        return mask_BLS  # every key is inside the window
    q_L1 = torch.arange(S - L, S, device=device)[:, None]
    band_LS = torch.arange(S, device=device)[None, :] > q_L1 - window
    return band_LS[None] if mask_BLS is None else mask_BLS & band_LS


class DecoderLayer(nn.Module):
    """Sandwich-norm block: each sub-block's output is normed before it joins the residual."""

    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        D, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(
            layer_idx=i,
            hidden_size=D,
            num_heads=args.num_attention_heads,
            num_kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            qk_norm_eps=eps,
        )
        # Gemma's (1 + w) norms on q and k; the q norm also folds query_pre_attn_scalar^-0.5 into q
        # (attend() scales by head_dim^-0.5)
        q_scale = math.sqrt(args.head_dim / args.query_pre_attn_scalar)
        self.self_attn.q_norm = RMSNorm(args.head_dim, eps, scale=q_scale)
        self.self_attn.k_norm = RMSNorm(args.head_dim, eps)
        self.mlp = GeGLU(D, args.intermediate_size)
        self.input_layernorm = RMSNorm(D, eps)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.post_feedforward_layernorm = RMSNorm(D, eps)

    def forward(
        self, x: torch.Tensor, *, rope: Rope, mask_BLS: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), rope=rope, mask_BLS=mask_BLS, cache=cache)
        h = x + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + weight), all in fp32, then cast back."""

    def __init__(self, dim: int, eps: float, *, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps, self.scale = eps, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = 1.0 + self.weight.float()
        out = F.rms_norm(x.float(), w.shape, w, self.eps)
        return (out if self.scale == 1.0 else out * self.scale).to(x.dtype)


class GeGLU(MLP):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."), ("model.text_model.", "model."))
_VISION = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def remap_weights(state: StateDict) -> StateDict:
    """Text weights under HF names: multimodal prefixes stripped, vision tensors dropped (with a
    warning), rotary buffers dropped.

    Raises:
        ConfigError: no language-model tensors (a vision-only file), or q/k norms missing.
    """
    out: StateDict = {}
    vision = 0
    for name, tensor in drop_rotary_buffers(state).items():
        if name.startswith(_VISION):
            vision += 1
            continue
        for old, new in _PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = tensor
    if vision:
        warnings.warn(f"Gemma-3: {vision} vision-tower/projector tensors are not used; only the "
                      "language model runs (text in, text out)", stacklevel=2)
    if "model.embed_tokens.weight" not in out:
        raise ConfigError("Gemma-3 checkpoint has no language-model weights (model.embed_tokens.weight "
                          "or model.language_model.embed_tokens.weight is missing)",
                          hint="a vision-only file cannot run; use the full Gemma-3 checkpoint")
    check_qk_norms(out, "Gemma-3")
    return out



to_checkpoint = same_names  # text-only Gemma3ForCausalLM names

TINY = Tiny(
    config={
        **TINY_DENSE,
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "rms_norm_eps": 1e-6,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
    },
    tokenizer="sentencepiece",
)
