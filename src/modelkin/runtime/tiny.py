"""Tiny random checkpoints of every supported architecture, in the real on-disk layout.

A tiny model is one ``TINY`` entry (config.json as the real checkpoints spell it) plus random
tensors made by walking the meta-built model's parameters; used by tests and examples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modelkin.errors import InputError
from modelkin.runtime.tiny_moe import MOE_TINY

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TinySpec:
    """How to write one tiny architecture.

    Attributes:
        config: config.json content (real key names; vocab_size follows the tokenizer).
        tokenizer: kind passed to ``runtime.tokenizer.write_tiny_tokenizer``, or None for none.
        to_hf: maps the model's parameter names/layout to the checkpoint's (MoE: unstack experts).
        extra: tensors real checkpoints store besides parameters (e.g. rotary inv_freq buffers).
    """

    config: dict[str, Any]
    tokenizer: str | None = None
    to_hf: Callable[[Tensors], Tensors] | None = None
    extra: Callable[[dict[str, Any]], Tensors] | None = None


_COMMON = {
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "vocab_size": 512,  # the tiny tokenizers' size
}


def _pangu_inv_freq(config: dict[str, Any]) -> Tensors:
    """openPangu-Embedded checkpoints carry each layer's rotary inv_freq buffer."""
    dim = config["hidden_size"] // config["num_attention_heads"]
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config["rope_theta"] ** exponent)
    return {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone()
        for i in range(config["num_hidden_layers"])
    }


TINY: dict[str, TinySpec] = {
    "llama": TinySpec(
        config={
            **_COMMON,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "mlp_bias": False,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": False,
        },
        tokenizer="sentencepiece",
    ),
    "qwen2": TinySpec(
        config={
            **_COMMON,
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "sliding_window": 512,
            "use_sliding_window": False,
            "max_window_layers": 2,
            "tie_word_embeddings": True,
            "bos_token_id": 0,  # <|endoftext|>
            "eos_token_id": 2,  # <|im_end|>
        },
        tokenizer="bpe",
    ),
    "qwen3": TinySpec(
        config={
            **_COMMON,
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "head_dim": 32,  # explicit and not hidden_size / heads, as in the real releases
            "attention_bias": False,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "use_sliding_window": False,
            "max_window_layers": 2,
            "tie_word_embeddings": True,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        tokenizer="bpe",
    ),
    "gemma3": TinySpec(
        config={
            **_COMMON,
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
    ),
    "pangu_embedded": TinySpec(
        config={
            **_COMMON,
            "architectures": ["PanguEmbeddedForCausalLM"],
            "model_type": "PanguEmbedded",
            "auto_map": {
                "AutoConfig": "configuration_openpangu_dense.PanguEmbeddedConfig",
                "AutoModelForCausalLM": "modeling_openpangu_dense.PanguEmbeddedForCausalLM",
            },
            "bias": True,
            "rms_norm_eps": 1e-5,
            "rope_theta": 16000000.0,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 5,  # [unused10], as in the real release
            "pad_token_id": 0,
        },
        tokenizer="pangu",
        extra=_pangu_inv_freq,
    ),
}
TINY.update({arch: TinySpec(**spec) for arch, spec in MOE_TINY.items()})  # MoE: runtime/tiny_moe.py


def random_tensors(model: torch.nn.Module, seed: int) -> Tensors:
    """Random weights for every parameter of a (meta-built) model, by parameter name and role.

    Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 0.25^2), norm weights ~ 1 + N(0, 0.1^2),
    biases ~ N(0, 0.1^2): activations stay O(1) and logits are far from uniform, tied or not.
    """
    gen = torch.Generator().manual_seed(seed)
    out: Tensors = {}
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            out[name] = 0.1 * noise
        elif "embed_tokens" in name:
            out[name] = 0.25 * noise
        elif len(shape) == 1:
            out[name] = noise
        else:
            out[name] = noise / math.sqrt(shape[-1])
    return out


def tiny_config(arch: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json dict of a tiny architecture, with ``overrides`` applied."""
    if arch not in TINY:
        raise InputError(f"no tiny config for {arch!r}", hint=f"choose one of: {', '.join(sorted(TINY))}")
    return {**json.loads(json.dumps(TINY[arch].config)), **(overrides or {})}


def make_tiny(
    arch: str,
    outdir: str | os.PathLike[str],
    *,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write a tiny random checkpoint of ``arch`` to ``outdir`` atomically; returns the path.

    Files: config.json, generation_config.json, model.safetensors and (when ``tokenizer`` and the
    tokenizer layer can write one) the tokenizer files of the architecture's kind.

    Raises:
        InputError: unknown ``arch``.
    """
    from safetensors.torch import save_file

    from modelkin.runtime.models import get_architecture
    from modelkin.utils import atomic_path

    spec = TINY.get(arch)
    config = tiny_config(arch, overrides)
    outdir = Path(outdir)
    with atomic_path(outdir) as tmp:
        tmp.mkdir(parents=True)
        if tokenizer and spec.tokenizer:
            from modelkin.runtime.tokenizer import write_tiny_tokenizer

            # a real trained tokenizer whose ids stay below the config's vocab_size
            write_tiny_tokenizer(tmp, spec.tokenizer, vocab_size=config["vocab_size"])
        module = get_architecture(config)
        with torch.device("meta"):
            model = module.Model(module.ModelArgs.from_hf_config(config))
        tensors = random_tensors(model, seed)
        if spec.to_hf is not None:
            tensors = spec.to_hf(tensors)
        if spec.extra is not None:
            tensors.update(spec.extra(config))
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors", {"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}, indent=2) + "\n")
    return outdir

