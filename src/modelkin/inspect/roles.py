"""Canonical tensor name -> (layer, role, expert), and the --select groups built on roles.

Covers the HF layouts of llama, qwen2, qwen3, gemma3, qwen2_moe, qwen3_moe, mixtral, Pangu Pro MoE
and openPangu-Embedded, raw GGUF block names, and ONNX initialisers named by torch's exporter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from modelkin.errors import InputError

UNKNOWN = "unknown"

# module path inside a decoder layer -> role ('.weight' keeps the role, '.bias' appends '_bias')
LAYER_MODULES: dict[str, str] = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
    "self_attn.o_proj": "o", "self_attn.qkv_proj": "qkv",
    "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
    "self_attn.rotary_emb.inv_freq": "rotary_inv_freq",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
    "pre_mlp_layernorm": "pre_mlp_norm", "post_mlp_layernorm": "post_mlp_norm",
    # Gemma-3's sandwich norms (its post_attention_layernorm norms the attention output; by name
    # it keeps the mlp_norm role of the other families)
    "pre_feedforward_layernorm": "pre_mlp_norm", "post_feedforward_layernorm": "post_mlp_norm",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
    "mlp.gate_up_proj": "gate_up",
    "mlp.gate": "router", "block_sparse_moe.gate": "router",
    "mlp.gate.e_score_correction_bias": "router_bias",
    "mlp.router_scale": "router_scale",
    "mlp.shared_expert_gate": "shared_router",
    # stacked experts [E, ...] (transformers 5 fused layout): no expert index
    "mlp.experts.gate_up_proj": "expert_gate_up", "mlp.experts.down_proj": "expert_down",
    # raw GGUF block names (a reader passes them through when it knows no HF name)
    "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "attn_qkv": "qkv",
    "attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
    "post_attention_norm": "mlp_norm", "post_ffw_norm": "post_mlp_norm",  # Gemma
    "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
    "ffn_gate_inp": "router", "ffn_gate_inp_shexp": "shared_router",
    "ffn_gate_exps": "expert_gate", "ffn_up_exps": "expert_up", "ffn_down_exps": "expert_down",
    "ffn_gate_shexp": "shared_gate", "ffn_up_shexp": "shared_up", "ffn_down_shexp": "shared_down",
}
for _prefix in ("mlp.shared_expert", "mlp.shared_experts"):
    for _proj, _role in (("gate_proj", "shared_gate"), ("up_proj", "shared_up"),
                         ("down_proj", "shared_down")):
        LAYER_MODULES[f"{_prefix}.{_proj}"] = _role

# module inside experts.N -> role
EXPERT_MODULES: dict[str, str] = {
    "gate_proj": "expert_gate", "up_proj": "expert_up", "down_proj": "expert_down",
    "w1": "expert_gate", "w3": "expert_up", "w2": "expert_down",  # mixtral
}

# module path outside the layers (any prefix such as 'model.') -> role
GLOBAL_MODULES: dict[str, str] = {
    "embed_tokens": "embed", "token_embd": "embed", "wte": "embed", "tok_embeddings": "embed",
    "lm_head": "lm_head", "output": "lm_head",
    "norm": "final_norm", "output_norm": "final_norm", "final_layernorm": "final_norm",
    "rope_freqs": "rotary_inv_freq",
}

_WEIGHTS = ("q", "k", "v", "o", "qkv")
ATTENTION_ROLES = frozenset(_WEIGHTS + tuple(f"{r}_bias" for r in _WEIGHTS))
_MLP = ("gate", "up", "down", "gate_up", "shared_gate", "shared_up", "shared_down",
        "router", "shared_router")
MLP_ROLES = frozenset(_MLP + tuple(f"{r}_bias" for r in _MLP) + ("router_scale", "router_bias"))
_EXPERTS = ("expert_gate", "expert_up", "expert_down", "expert_gate_up")
EXPERT_ROLES = frozenset(_EXPERTS + tuple(f"{r}_bias" for r in _EXPERTS))
SELECT_GROUPS = {"attention": ATTENTION_ROLES, "mlp": MLP_ROLES, "experts": EXPERT_ROLES}

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blk|h|blocks)\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(.+)$")
_SUFFIXES = ("weight", "bias")


@dataclass(frozen=True, slots=True)
class NameRole:
    """Where a tensor sits: decoder layer index (None outside layers), role, expert index."""

    layer: int | None
    role: str
    expert: int | None = None


def _normalise(name: str) -> str:
    # ONNX initialisers may use '/' or '::' separators
    return name.replace("::", ".").replace("/", ".").strip(".")


def _split_param(path: str) -> tuple[str, str | None]:
    module, _, last = path.rpartition(".")
    return (module, last) if module and last in _SUFFIXES else (path, None)


def _with_suffix(role: str, param: str | None) -> str:
    return f"{role}_bias" if param == "bias" else role


def classify(name: str) -> NameRole:
    """The (layer, role, expert) of a canonical tensor name; role 'unknown' when not recognised.

    Example:
        >>> classify("model.layers.3.block_sparse_moe.experts.5.w2.weight")
        NameRole(layer=3, role='expert_down', expert=5)
    """
    norm = _normalise(name)
    match = _LAYER_RE.search(norm)
    if match is None:
        module, param = _split_param(norm)
        for candidate in (module, module.rpartition(".")[2]):
            if candidate in GLOBAL_MODULES:
                return NameRole(None, _with_suffix(GLOBAL_MODULES[candidate], param))
        return NameRole(None, UNKNOWN)
    layer, rest = int(match.group(1)), match.group(2)
    if rest in LAYER_MODULES:  # parameters without a .weight suffix (router_scale, inv_freq)
        return NameRole(layer, LAYER_MODULES[rest])
    module, param = _split_param(rest)
    expert_match = _EXPERT_RE.match(module)
    if expert_match is not None:
        inner = expert_match.group(2)
        if inner in EXPERT_MODULES:
            return NameRole(layer, _with_suffix(EXPERT_MODULES[inner], param),
                            int(expert_match.group(1)))
        return NameRole(layer, UNKNOWN, int(expert_match.group(1)))
    if module in LAYER_MODULES:
        return NameRole(layer, _with_suffix(LAYER_MODULES[module], param))
    return NameRole(layer, UNKNOWN)


def selector(select: str | None) -> Callable[[str, NameRole], bool]:
    """A predicate for --select: 'all', a group ('attention', 'mlp', 'experts', comma-joined),
    or otherwise a regular expression searched in the tensor name.

    Raises:
        InputError: the value is neither a group nor a valid regular expression.
    """
    text = (select or "all").strip()
    if text == "all":
        return lambda name, role: True
    parts = [p.strip() for p in text.split(",")]
    if all(p in SELECT_GROUPS for p in parts):
        roles = frozenset().union(*(SELECT_GROUPS[p] for p in parts))
        return lambda name, role: role.role in roles
    try:
        pattern = re.compile(text)
    except re.error as err:
        raise InputError(
            f"--select {text!r} is neither a group nor a valid regular expression ({err})",
            hint="use attention, mlp, experts, all, or a Python regex such as 'layers\\.1\\.'",
        ) from None
    return lambda name, role: pattern.search(name) is not None


def unknown_names(names: Iterable[str]) -> list[str]:
    """The names classify() cannot place, in input order."""
    return [n for n in names if classify(n).role == UNKNOWN]


def onnx_aliases(model_path: str) -> dict[str, str]:
    """Canonical names for anonymous ONNX initialisers (torch's exporter names transposed weights
    ``onnx::MatMul_12`` or ``val_3``), recovered from the module path of the MatMul/Gemm that uses them.

    The legacy exporter names that node ``/model/layers.0/self_attn/q_proj/MatMul``; the dynamo
    exporter records ``pkg.torch.onnx.name_scopes`` in its metadata.
    """
    import ast

    import onnx

    model = onnx.load(model_path, load_external_data=False)
    names = {init.name for init in model.graph.initializer}
    aliases: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        module = None
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                parts = [s for s in ast.literal_eval(scopes) if s]
                module = parts[-2] if len(parts) >= 2 else None
            except (ValueError, SyntaxError):
                module = None
        elif node.name.startswith("/") and node.name.count("/") >= 2:
            module = node.name.strip("/").rpartition("/")[0].replace("/", ".")
        if not module:
            continue
        for inp in node.input:
            if inp in names and inp not in aliases and classify(inp).role == UNKNOWN:
                aliases[inp] = f"{module}.weight"
    return aliases
