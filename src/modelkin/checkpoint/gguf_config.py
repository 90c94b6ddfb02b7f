"""Building an HF config.json dict from GGUF metadata key/values."""

from __future__ import annotations

from typing import Any

import numpy as np

# GGUF general.architecture -> (HF model_type, HF architectures entry)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
MIXTRAL = ("mixtral", "MixtralForCausalLM")

# HF config key -> GGUF key under the architecture prefix
_ARCH_KEYS: dict[str, str] = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "vocab_size": "vocab_size",
    "head_dim": "attention.key_length",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
    "norm_topk_prob": "expert_weights_norm",
}
_TOKEN_KEYS = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}


def _clean(value: Any) -> Any:
    """Python value for config.json; float32 metadata printed shortest (1e-05, not 9.99e-06)."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    return value


def build_config(kv: dict[str, Any], *, tensor_names: set[str], vocab_fallback: int | None) -> dict[str, Any]:
    """HF-style config dict from GGUF metadata.

    Args:
        kv: GGUF scalar key/values (arrays may be left out).
        tensor_names: GGUF tensor names in the file (tied embeddings and biases are read from them).
        vocab_fallback: vocabulary size when the file has no ``{arch}.vocab_size`` (token count).

    Returns:
        A dict with HF config.json key names (model_type, architectures, hidden_size, …).
    """
    arch = str(kv.get("general.architecture", ""))
    n_experts = int(kv.get(f"{arch}.expert_count", 0) or 0)
    model_type, hf_arch = ARCHITECTURES.get(arch, (arch, ""))
    if arch == "llama" and n_experts > 0:
        model_type, hf_arch = MIXTRAL
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_arch] if hf_arch else [],
        "hidden_act": "silu",
    }
    for hf_key, gguf_key in _ARCH_KEYS.items():
        if f"{arch}.{gguf_key}" in kv:
            config[hf_key] = _clean(kv[f"{arch}.{gguf_key}"])
    if n_experts > 0:
        config["num_local_experts" if model_type == "mixtral" else "num_experts"] = n_experts
    config.setdefault("num_key_value_heads", config.get("num_attention_heads"))
    config.setdefault("rope_theta", 10000.0)
    if "vocab_size" not in config and vocab_fallback:
        config["vocab_size"] = int(vocab_fallback)
    rope_type = kv.get(f"{arch}.rope.scaling.type")
    if rope_type and rope_type != "none":
        scaling: dict[str, Any] = {"rope_type": rope_type}
        if f"{arch}.rope.scaling.factor" in kv:
            scaling["factor"] = _clean(kv[f"{arch}.rope.scaling.factor"])
        if f"{arch}.rope.scaling.original_context_length" in kv:
            scaling["original_max_position_embeddings"] = kv[f"{arch}.rope.scaling.original_context_length"]
        config["rope_scaling"] = scaling
    if model_type in ("llama", "mixtral"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    if arch == "gemma3":
        config.update(gemma3_keys(kv, config))
    for hf_key, gguf_key in _TOKEN_KEYS.items():
        if f"tokenizer.ggml.{gguf_key}_token_id" in kv:
            config[hf_key] = int(kv[f"tokenizer.ggml.{gguf_key}_token_id"])
    return config


def gemma3_keys(kv: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Gemma-3 keys GGUF leaves implicit, filled as llama.cpp and transformers assume them: GELU-tanh,
    every 6th layer global (local rope base 1e4), q scaled by head_dim^-0.5 except in the 27B (62
    layers: (hidden_size / heads)^-0.5)."""
    head_dim = config.get("head_dim") or 256
    scalar = head_dim
    if config.get("num_hidden_layers") == 62 and config.get("num_attention_heads"):
        scalar = config["hidden_size"] // config["num_attention_heads"]
    keys: dict[str, Any] = {
        "hidden_act": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window_pattern": 6,
        "rope_local_base_freq": 10000.0,
    }
    if "gemma3.attention.sliding_window" in kv:
        keys["sliding_window"] = int(kv["gemma3.attention.sliding_window"])
    return keys
