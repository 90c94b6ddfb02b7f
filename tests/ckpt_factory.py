"""Helpers that write small test checkpoints: HF safetensors / PyTorch dirs, GGUF files the llama.cpp way.

The GGUF writers re-implement llama.cpp's naming and Q/K permutation from convert_hf_to_gguf.py on
their own (they do not use modelkin.checkpoint), so reader tests compare two independent codes.
Import from tests as ``from tests.ckpt_factory import …`` (pytest runs from the repository root).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelkin.utils import atomic_path, atomic_write_text


def _split(names: list[str], shards: int) -> list[list[str]]:
    per = math.ceil(len(names) / shards)
    return [names[i * per : (i + 1) * per] for i in range(shards)]


def _write_sharded(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    config: dict | None,
    shards: int,
    *,
    stem: str,
    ext: str,
    save: Any,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if config is not None:
        atomic_write_text(directory / "config.json", json.dumps(config, indent=2))
    names = list(tensors)
    if shards <= 1:
        with atomic_path(directory / f"{stem}.{ext}") as tmp:
            save({n: tensors[n] for n in names}, tmp)
        return directory
    groups = _split(names, shards)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        file = f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}"
        with atomic_path(directory / file) as tmp:
            save({n: tensors[n] for n in group}, tmp)
        weight_map.update({n: file for n in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(directory / f"{stem}.{ext}.index.json", json.dumps(index, indent=2))
    return directory


def write_safetensors_checkpoint(
    directory: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict | None,
    shards: int = 1,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write config.json + model.safetensors (or N shards + model.safetensors.index.json) atomically.

    ``config=None`` writes no config.json. Returns the directory.
    """
    from safetensors.torch import save_file

    def save(part: dict[str, torch.Tensor], tmp: Path) -> None:
        save_file(
            {n: t.contiguous() for n, t in part.items()},
            str(tmp),
            metadata={"format": "pt", **(metadata or {})},
        )

    return _write_sharded(
        Path(directory), tensors, config, shards, stem="model", ext="safetensors", save=save
    )


def write_torch_checkpoint(
    directory: str | Path, tensors: dict[str, torch.Tensor], config: dict | None, shards: int = 1
) -> Path:
    """Write config.json + pytorch_model.bin (or shards + pytorch_model.bin.index.json) atomically."""

    def save(part: dict[str, torch.Tensor], tmp: Path) -> None:
        torch.save(part, tmp)

    return _write_sharded(
        Path(directory), tensors, config, shards, stem="pytorch_model", ext="bin", save=save
    )


def tiny_llama_state(
    *,
    layers: int = 2,
    hidden: int = 16,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 24,
    vocab: int = 32,
    seed: int = 0,
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict]:
    """A random Llama-layout state dict (HF names, untied lm_head) and its config.json dict."""
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rnd(hidden)
        sd[p + "self_attn.q_proj.weight"] = rnd(heads * head_dim, hidden)
        sd[p + "self_attn.k_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        sd[p + "self_attn.v_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        if bias:
            sd[p + "self_attn.q_proj.bias"] = rnd(heads * head_dim)
            sd[p + "self_attn.k_proj.bias"] = rnd(kv_heads * head_dim)
            sd[p + "self_attn.v_proj.bias"] = rnd(kv_heads * head_dim)
        sd[p + "self_attn.o_proj.weight"] = rnd(hidden, heads * head_dim)
        sd[p + "post_attention_layernorm.weight"] = rnd(hidden)
        sd[p + "mlp.gate_proj.weight"] = rnd(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = rnd(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = rnd(hidden, inter)
    sd["model.norm.weight"] = rnd(hidden)
    sd["lm_head.weight"] = rnd(vocab, hidden)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "attention_bias": bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
    }
    return sd, config


# ---- GGUF, written the way llama.cpp's convert_hf_to_gguf.py does it ----

# HF module path inside model.layers.N -> llama.cpp tensor name (gguf-py tensor_mapping.py)
_LLAMACPP_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
_LLAMACPP_EXPERT = {
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
}
_LLAMACPP_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF Q/K rows -> llama.cpp's RoPE row order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state_to_gguf(state: dict[str, torch.Tensor], config: dict, arch: str) -> dict[str, np.ndarray]:
    """HF state dict -> llama.cpp tensors (names, Q/K permutation for arch 'llama', stacked experts)."""
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, tensor in state.items():
        array = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        if name in _LLAMACPP_TOP:
            out[_LLAMACPP_TOP[name]] = array
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        assert m, name
        layer, path, kind = m.groups()
        em = re.fullmatch(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)", path)
        if em:
            key = f"blk.{layer}.{_LLAMACPP_EXPERT[em.group(2)]}.{kind}"
            experts.setdefault(key, {})[int(em.group(1))] = array
            continue
        gname = _LLAMACPP_BLOCK[path]
        if arch == "llama" and gname == "attn_q":
            array = llamacpp_permute(array, config["num_attention_heads"])
        if arch == "llama" and gname == "attn_k":
            array = llamacpp_permute(array, config["num_key_value_heads"])
        if gname == "ffn_gate_inp_shexp":
            array = array.reshape(-1)
        out[f"blk.{layer}.{gname}.{kind}"] = array
    for key, per_expert in experts.items():
        out[key] = np.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def gguf_kv_from_config(config: dict, arch: str) -> dict[str, Any]:
    """The GGUF metadata llama.cpp writes for an HF config (the keys modelkin reads)."""
    kv: dict[str, Any] = {
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.rope.freq_base": float(config["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        f"{arch}.vocab_size": config["vocab_size"],
        "tokenizer.ggml.bos_token_id": config.get("bos_token_id", 1),
        "tokenizer.ggml.eos_token_id": config.get("eos_token_id", 2),
    }
    for hf_key, gguf_key in (
        ("num_experts", "expert_count"),
        ("num_local_experts", "expert_count"),
        ("num_experts_per_tok", "expert_used_count"),
        ("moe_intermediate_size", "expert_feed_forward_length"),
        ("shared_expert_intermediate_size", "expert_shared_feed_forward_length"),
        ("head_dim", "attention.key_length"),
    ):
        if hf_key in config:
            kv[f"{arch}.{gguf_key}"] = config[hf_key]
    return kv


def write_gguf_file(
    path: str | Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    kv: dict[str, Any] | None = None,
    qtypes: dict[str, str] | None = None,
) -> Path:
    """Write a GGUF file with llama.cpp-named tensors (torch-order numpy arrays) and metadata.

    Args:
        qtypes: tensor name -> GGUF type name ('Q8_0', 'Q4_0', 'BF16', 'F16', …) to store it as;
            others are stored in their numpy dtype.
    """
    import gguf

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for key, value in (kv or {}).items():
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            else:
                writer.add_array(key, list(value))
        for name, array in tensors.items():
            qname = (qtypes or {}).get(name)
            if qname is None:
                writer.add_tensor(name, np.ascontiguousarray(array))
            else:
                qtype = gguf.GGMLQuantizationType[qname]
                if qname == "F16":
                    writer.add_tensor(name, array.astype(np.float16))
                else:
                    data = gguf.quants.quantize(array.astype(np.float32), qtype)
                    writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
