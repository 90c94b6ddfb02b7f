"""Tensor name lists (and tiny checkpoints) in each architecture's documented layout, for inspect tests.

Names follow the HF checkpoints: llama, qwen2, qwen2_moe, qwen3_moe, mixtral; Pangu Pro MoE and
openPangu-Embedded as in shared/docs/pangu-pro-moe.md §2 and §8.
"""

from __future__ import annotations

import torch


def _attn(p: str, *, bias: bool, o_bias: bool = False, qk_norm: bool = False) -> list[str]:
    names = [p + "input_layernorm.weight"]
    for proj in "qkvo":
        names.append(f"{p}self_attn.{proj}_proj.weight")
        if (bias and proj != "o") or (o_bias and proj == "o"):
            names.append(f"{p}self_attn.{proj}_proj.bias")
    if qk_norm:
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names + [p + "post_attention_layernorm.weight"]


def _dense(p: str) -> list[str]:
    return [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]


def _experts(p: str, n: int, style: str = "qwen") -> list[str]:
    if style == "mixtral":
        return [f"{p}block_sparse_moe.experts.{e}.{w}.weight" for e in range(n) for w in ("w1", "w3", "w2")]
    return [f"{p}mlp.experts.{e}.{x}_proj.weight" for e in range(n) for x in ("gate", "up", "down")]


def _shared(p: str) -> list[str]:
    return [f"{p}mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")]


def layout_names(arch: str, *, layers: int = 2, experts: int = 4) -> list[str]:
    """Every tensor name of a checkpoint of ``arch`` with ``layers`` layers."""
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        if arch == "llama":
            names += _attn(p, bias=False) + _dense(p)
        elif arch == "qwen2":
            names += _attn(p, bias=True) + _dense(p)
        elif arch == "qwen3":
            names += _attn(p, bias=False, qk_norm=True) + _dense(p)
        elif arch == "gemma3":
            names += _attn(p, bias=False, qk_norm=True) + _dense(p)
            names += [p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight"]
        elif arch == "qwen2_moe":
            names += _attn(p, bias=True) + [p + "mlp.gate.weight"] + _experts(p, experts)
            names += _shared(p) + [p + "mlp.shared_expert_gate.weight"]
        elif arch == "qwen3_moe":
            names += _attn(p, bias=False, qk_norm=True) + [p + "mlp.gate.weight"] + _experts(p, experts)
        elif arch == "mixtral":
            names += _attn(p, bias=False) + [p + "block_sparse_moe.gate.weight"]
            names += _experts(p, experts, "mixtral")
        elif arch == "pangu_moe":
            names += _attn(p, bias=True, o_bias=True) + [p + "mlp.gate.weight", p + "mlp.router_scale"]
            names += _experts(p, experts) + _shared(p)
        elif arch == "pangu_embedded":
            names += _attn(p, bias=True, o_bias=True) + _dense(p)
            names.append(p + "self_attn.rotary_emb.inv_freq")
        else:
            raise ValueError(arch)
    return names + ["model.norm.weight", "lm_head.weight"]


ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "qwen2_moe", "qwen3_moe", "mixtral", "pangu_moe", "pangu_embedded")


def pangu_moe_tensors(*, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                      experts: int = 8, moe_inter: int = 8, shared_inter: int = 32, vocab: int = 64,
                      dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A tiny Pangu Pro MoE state dict with the documented names and shapes, and its config."""
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads
    shapes = {
        "self_attn.q_proj.weight": (heads * hd, hidden), "self_attn.q_proj.bias": (heads * hd,),
        "self_attn.k_proj.weight": (kv_heads * hd, hidden), "self_attn.k_proj.bias": (kv_heads * hd,),
        "self_attn.v_proj.weight": (kv_heads * hd, hidden), "self_attn.v_proj.bias": (kv_heads * hd,),
        "self_attn.o_proj.weight": (hidden, heads * hd), "self_attn.o_proj.bias": (hidden,),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "mlp.gate.weight": (experts, hidden), "mlp.router_scale": (1, experts),
        "mlp.shared_expert.gate_proj.weight": (shared_inter, hidden),
        "mlp.shared_expert.up_proj.weight": (shared_inter, hidden),
        "mlp.shared_expert.down_proj.weight": (hidden, shared_inter),
    }
    for e in range(experts):
        shapes[f"mlp.experts.{e}.gate_proj.weight"] = (moe_inter, hidden)
        shapes[f"mlp.experts.{e}.up_proj.weight"] = (moe_inter, hidden)
        shapes[f"mlp.experts.{e}.down_proj.weight"] = (hidden, moe_inter)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).to(dtype)}
    for i in range(layers):
        for suffix, shape in shapes.items():
            sd[f"model.layers.{i}.{suffix}"] = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g).to(dtype)
    config = {
        "architectures": ["PanguProMoEForCausalLM"], "model_type": "PanguProMoE",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "moe_intermediate_size": moe_inter,
        "shared_expert_intermediate_size": shared_inter, "num_experts": experts,
        "num_experts_per_tok": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 16000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    return sd, config
