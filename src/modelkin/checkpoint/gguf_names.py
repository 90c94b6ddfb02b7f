"""Bidirectional adapter between llama.cpp GGUF tensor names and canonical HF names.

Stacked expert tensors (``blk.N.ffn_gate_exps``) map to a template with an ``{expert}`` field.
"""

from __future__ import annotations

import re

# llama.cpp block tensor -> HF module path inside ``model.layers.N``
BLOCK_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "{moe}.gate",
    "ffn_gate_exps": "{moe}.experts.{expert}.{gate}",
    "ffn_up_exps": "{moe}.experts.{expert}.{up}",
    "ffn_down_exps": "{moe}.experts.{expert}.{down}",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# architectures whose block names differ from the table above (llama.cpp's Gemma sandwich norms)
ARCH_BLOCK_NAMES: dict[str, dict[str, str]] = {
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
TOP_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Mixtral is stored with architecture "llama"; its HF checkpoints name the MoE block differently.
_MIXTRAL_STYLE = {"moe": "block_sparse_moe", "gate": "w1", "up": "w3", "down": "w2"}
_QWEN_STYLE = {"moe": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_OLD_EXPERT = {"ffn_gate": "ffn_gate_exps", "ffn_up": "ffn_up_exps", "ffn_down": "ffn_down_exps"}

_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z0-9_]+?)(?:\.(\d+))?\.(weight|bias)")
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_EXPERT_RE = re.compile(r"(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)")


def block_names(arch: str) -> dict[str, str]:
    """GGUF block tensor kind -> HF module path for ``arch``."""
    return {**BLOCK_NAMES, **ARCH_BLOCK_NAMES.get(arch, {})}


def _style(arch: str) -> dict[str, str]:
    return _MIXTRAL_STYLE if arch == "llama" else _QWEN_STYLE


def gguf_to_hf(gguf_name: str, arch: str) -> str | None:
    """Canonical HF name of a GGUF tensor, or None when the name is not known.

    Stacked expert tensors give a template with an ``{expert}`` field; per-expert tensors of old
    Mixtral files (``blk.N.ffn_gate.E.weight``) give the expert's own name.

    Example:
        >>> gguf_to_hf("blk.3.attn_q.weight", "llama")
        'model.layers.3.self_attn.q_proj.weight'
    """
    top, _, suffix = gguf_name.rpartition(".")
    if top in TOP_NAMES and suffix in ("weight", "bias"):
        return f"{TOP_NAMES[top]}.{suffix}"
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None:
        return None
    layer, kind, expert, suffix = match.groups()
    if expert is not None:
        if kind not in _OLD_EXPERT:
            return None
        kind = _OLD_EXPERT[kind]
    template = block_names(arch).get(kind)
    if template is None:
        return None
    path = template.format(expert="{expert}" if expert is None else expert, **_style(arch))
    return f"model.layers.{layer}.{path}.{suffix}"


def hf_to_gguf(hf_name: str, arch: str) -> tuple[str, int | None] | None:
    """GGUF tensor name (and expert index into a stacked tensor) for a canonical HF name, or None.

    Example:
        >>> hf_to_gguf("model.layers.0.mlp.experts.5.up_proj.weight", "qwen2moe")
        ('blk.0.ffn_up_exps.weight', 5)
    """
    top, _, suffix = hf_name.rpartition(".")
    for gguf_top, hf_top in TOP_NAMES.items():
        if top == hf_top:
            return f"{gguf_top}.{suffix}", None
    match = _HF_BLOCK_RE.fullmatch(hf_name)
    if match is None:
        return None
    layer, path, suffix = match.groups()
    style = _style(arch)
    expert: int | None = None
    em = _HF_EXPERT_RE.fullmatch(path)
    if em is not None:
        expert = int(em.group(2))
        path = f"{em.group(1)}.experts.{{expert}}.{em.group(3)}"
    for kind, template in block_names(arch).items():
        rendered = template.format(expert="{expert}", **style)
        if rendered == path and (expert is None) == ("{expert}" not in rendered):
            return f"blk.{layer}.{kind}.{suffix}", expert
    return None


def fallback_name(gguf_name: str) -> str:
    """A stable name for a GGUF tensor with no known HF name: ``blk.N.x`` -> ``model.layers.N.x``."""
    if gguf_name.startswith("blk."):
        layer, _, rest = gguf_name[4:].partition(".")
        if layer.isdigit() and rest:
            return f"model.layers.{layer}.{rest}"
    return gguf_name
