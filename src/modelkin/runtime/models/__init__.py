"""The architecture registry: HF ``architectures[0]`` and ``model_type`` -> the module implementing it.

Every module exports what ``Architecture`` declares: ``ModelArgs``, ``Model`` (a ``CausalLM``),
``remap_weights`` and its inverse ``to_checkpoint``, and its make-tiny entry ``TINY``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Protocol

from modelkin.errors import UnsupportedArchitectureError
from modelkin.runtime.models.causal_lm import CausalLM, Tiny

# HF name (architectures[0] or model_type) -> module under modelkin.runtime.models
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "llama": "llama",
    "MistralForCausalLM": "llama",
    "mistral": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "qwen2": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "qwen3": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "gemma3_text": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # the language model only; vision is not run
    "gemma3": "gemma3",
    "PanguEmbeddedForCausalLM": "pangu_embedded",
    "PanguEmbedded": "pangu_embedded",
    # MoE (runtime/moe)
    "PanguProMoEForCausalLM": "pangu_moe",
    "PanguProMoE": "pangu_moe",  # pangu_moe.ModelArgs rejects the V2 model that reuses this type
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "qwen2_moe": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "qwen3_moe": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "mixtral": "mixtral",
}


class ArchArgs(Protocol):
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ArchArgs: ...


class Architecture(Protocol):
    """What an architecture module exports.

    ``Model(args)`` is a ``causal_lm.CausalLM`` (HF internal names, attributes ``args`` and
    ``sliding_window``, ``forward(input_ids_BL, *, positions_BL, mask_BLS, cache, last_only) ->
    logits``) built from the module's own layer builder. ``remap_weights`` maps a checkpoint's
    canonical HF names to the model's parameter names (identity for dense models, plus dropping
    buffers; MoE files stack experts) and works on a ``checkpoint.lazy.StateDict``;
    ``to_checkpoint(tensors, args)`` is its inverse on real tensors, for writers. ``TINY`` is
    the make-tiny entry (``causal_lm.Tiny``).
    """

    ModelArgs: type[ArchArgs]
    Model: type[CausalLM]
    TINY: Tiny

    @staticmethod
    def remap_weights(state: dict[str, Any]) -> dict[str, Any]: ...

    @staticmethod
    def to_checkpoint(tensors: dict[str, Any], args: Any) -> dict[str, Any]: ...


def modules() -> dict[str, Architecture]:
    """Every architecture module by its file name (``llama``, ``pangu_moe``, …), sorted."""
    return {name: _module(name) for name in sorted(set(ARCHITECTURES.values()))}


def supported() -> list[str]:
    """Supported model_type and architecture names, sorted."""
    return sorted(ARCHITECTURES)


def get_architecture(config: dict[str, Any]) -> Architecture:
    """The module implementing a config's ``architectures[0]`` (or, failing that, its ``model_type``).

    Raises:
        UnsupportedArchitectureError: neither name is registered; the message lists the supported ones.
    """
    archs = config.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]  # a hostile config may hold any JSON here
    model_type = config.get("model_type")
    for key in [*archs[:1], model_type]:
        if isinstance(key, str) and key in ARCHITECTURES:
            return _module(ARCHITECTURES[key])
    model_types = sorted(k for k in ARCHITECTURES if not k.endswith("ForCausalLM"))
    raise UnsupportedArchitectureError(
        f"unsupported model_type {model_type!r} (architectures {archs!r})",
        hint=f"supported model_type values: {', '.join(model_types)}",
    )


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"modelkin.runtime.models.{name}")
