"""make-tiny entries of the MoE architectures: config.json as the real releases spell it, and the
mapping from the runtime's stacked experts back to each checkpoint's per-expert tensor names.

Read by runtime/tiny.py, which turns each entry into a TinySpec.
"""

from __future__ import annotations

from typing import Any

import torch

from modelkin.runtime.moe.weights import unstack_layer_experts

Tensors = dict[str, torch.Tensor]

_BASE = {
    "hidden_act": "silu",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "float32",
    "vocab_size": 512,  # the tiny tokenizers' size
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
}


def _pangu_to_hf(tensors: Tensors) -> Tensors:
    """Per-expert names and router_scale [1, E] as released; scales made positive, around 1."""
    from modelkin.runtime.models.pangu_moe import to_checkpoint

    out = to_checkpoint(tensors)
    for name in [k for k in out if k.endswith(".mlp.router_scale")]:
        out[name] = 1.0 + 0.2 * out[name].tanh()
    return out


def _mixtral_to_hf(tensors: Tensors) -> Tensors:
    from modelkin.runtime.models.mixtral import to_checkpoint

    return to_checkpoint(tensors)


MOE_TINY: dict[str, dict[str, Any]] = {
    "pangu_moe": {
        "config": {
            **_BASE,
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
        "tokenizer": "pangu",
        "to_hf": _pangu_to_hf,
    },
    "qwen2_moe": {
        "config": {
            **_BASE,
            "architectures": ["Qwen2MoeForCausalLM"],
            "model_type": "qwen2_moe",
            "intermediate_size": 96,  # the dense MLP of mlp_only_layers
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 80,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "sliding_window": 512,
            "use_sliding_window": False,
            "max_window_layers": 2,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        "tokenizer": "bpe",
        "to_hf": unstack_layer_experts,
    },
    "qwen3_moe": {
        "config": {
            **_BASE,
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "head_dim": 32,  # explicit and != hidden_size / heads, as in the releases
            "intermediate_size": 96,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "attention_bias": False,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        "tokenizer": "bpe",
        "to_hf": unstack_layer_experts,
    },
    "mixtral": {
        "config": {
            **_BASE,
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "intermediate_size": 48,  # per expert
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "tokenizer": "sentencepiece",
        "to_hf": _mixtral_to_hf,
    },
}
