"""Relatives of a dense Llama/Qwen2 model made by weight surgery: depth pruning, width pruning (MLP units,
attention heads), a residual rotation with folded norm gains, a permutation of MLP hidden units, a
vocabulary extension, and a std-matched (unrelated) twin.

Each function maps (config, float32 tensors by HF name) to a new (config, tensors); write the result with
``modelkin.synth.variants.write_hf_checkpoint``. Fine-tuned relatives are made by ``synth.train.finetune``.
"""

from __future__ import annotations

import re
from typing import Any

Tensors = dict[str, Any]
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def drop_layers(config: dict[str, Any], tensors: Tensors, drop: list[int]) -> tuple[dict[str, Any], Tensors]:
    """Depth pruning: remove decoder layers ``drop`` and renumber the rest in order."""
    n = int(config["num_hidden_layers"])
    keep = [i for i in range(n) if i not in set(drop)]
    new_index = {old: new for new, old in enumerate(keep)}
    out: Tensors = {}
    for name, t in tensors.items():
        m = _LAYER.match(name)
        if m is None:
            out[name] = t
        elif int(m.group(1)) in new_index:
            out[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = t
    return {**config, "num_hidden_layers": len(keep)}, out


def prune_mlp(config: dict[str, Any], tensors: Tensors, keep_fraction: float = 0.75
              ) -> tuple[dict[str, Any], Tensors]:
    """Width pruning: keep each layer's MLP units of largest |up row|·|down column|, in their order."""
    import torch

    n_ff = int(config["intermediate_size"])
    k = max(1, int(round(keep_fraction * n_ff)))
    out = dict(tensors)
    for i in range(int(config["num_hidden_layers"])):
        pre = f"model.layers.{i}.mlp."
        score = tensors[pre + "up_proj.weight"].norm(dim=1) * tensors[pre + "down_proj.weight"].norm(dim=0)
        keep = torch.sort(torch.topk(score, k).indices).values
        out[pre + "gate_proj.weight"] = tensors[pre + "gate_proj.weight"][keep].contiguous()
        out[pre + "up_proj.weight"] = tensors[pre + "up_proj.weight"][keep].contiguous()
        out[pre + "down_proj.weight"] = tensors[pre + "down_proj.weight"][:, keep].contiguous()
    return {**config, "intermediate_size": k}, out


def prune_heads(config: dict[str, Any], tensors: Tensors, keep_fraction: float = 0.5
                ) -> tuple[dict[str, Any], Tensors]:
    """Width pruning of attention: keep each layer's query heads of largest |q rows|·|o columns|.

    With grouped KV heads the same number of query heads is kept in every group (k/v untouched), so the
    config stays valid; with one query head per KV head, whole heads (q, k, v rows and o columns) go.
    ``head_dim`` is written to the config, since heads × head_dim no longer equals hidden_size.
    """
    import torch

    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    group = heads // kv
    per_group = max(1, int(round(keep_fraction * group))) if group > 1 else group
    keep_kv = kv if group > 1 else max(1, int(round(keep_fraction * kv)))
    out = dict(tensors)

    def rows(idx: Any) -> Any:  # row indices of the heads ``idx``
        return (idx[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)

    for i in range(int(config["num_hidden_layers"])):
        pre = f"model.layers.{i}.self_attn."
        q, o = tensors[pre + "q_proj.weight"], tensors[pre + "o_proj.weight"]
        score = q.reshape(heads, -1).norm(dim=1) * o.reshape(o.shape[0], heads, hd).norm(dim=(0, 2))
        if group > 1:
            best = torch.topk(score.reshape(kv, group), per_group, dim=1).indices
            q_heads = torch.sort((best + torch.arange(kv)[:, None] * group).reshape(-1)).values
            kv_heads = torch.arange(kv)
        else:
            q_heads = kv_heads = torch.sort(torch.topk(score, keep_kv).indices).values
        q_rows, kv_rows = rows(q_heads), rows(kv_heads)
        for name, idx in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for kind in ("weight", "bias"):
                if pre + f"{name}.{kind}" in tensors:
                    out[pre + f"{name}.{kind}"] = tensors[pre + f"{name}.{kind}"][idx].contiguous()
        out[pre + "o_proj.weight"] = o[:, q_rows].contiguous()
    new_heads = keep_kv * per_group
    return {**config, "num_attention_heads": new_heads, "num_key_value_heads": keep_kv, "head_dim": hd}, out


def permute_mlp(config: dict[str, Any], tensors: Tensors, seed: int = 0) -> tuple[dict[str, Any], Tensors]:
    """Function-preserving relabelling of every layer's MLP hidden units (gate/up rows, down columns)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for i in range(int(config["num_hidden_layers"])):
        pre = f"model.layers.{i}.mlp."
        perm = torch.randperm(tensors[pre + "up_proj.weight"].shape[0], generator=gen)
        out[pre + "gate_proj.weight"] = tensors[pre + "gate_proj.weight"][perm].contiguous()
        out[pre + "up_proj.weight"] = tensors[pre + "up_proj.weight"][perm].contiguous()
        out[pre + "down_proj.weight"] = tensors[pre + "down_proj.weight"][:, perm].contiguous()
    return dict(config), out


def random_rotation(d: int, seed: int) -> Any:
    """A Haar-random d×d orthogonal matrix (float64)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotate_residual(config: dict[str, Any], tensors: Tensors, seed: int = 0
                    ) -> tuple[dict[str, Any], Tensors]:
    """Function-preserving rotation of the residual stream: x -> x·R, every RMSNorm gain folded into the
    matrices that read its output (gains become 1; RMSNorm commutes with an orthogonal R). The final
    norm's gain goes into an untied lm_head. Attention/MLP biases, if any, are unchanged (they act after
    the reading matrices or are rotated with o/down)."""
    import torch

    d = int(config["hidden_size"])
    r = random_rotation(d, seed)
    t = {k: v.double() for k, v in tensors.items()}
    out: Tensors = {}
    embed = t["model.embed_tokens.weight"]
    head = t.get("lm_head.weight", embed)
    out["model.embed_tokens.weight"] = embed @ r
    out["lm_head.weight"] = (head * t["model.norm.weight"][None, :]) @ r
    out["model.norm.weight"] = torch.ones(d, dtype=torch.float64)
    for i in range(int(config["num_hidden_layers"])):
        pre = f"model.layers.{i}."
        g_attn, g_mlp = t[pre + "input_layernorm.weight"], t[pre + "post_attention_layernorm.weight"]
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            out[pre + name + ".weight"] = (t[pre + name + ".weight"] * g_attn[None, :]) @ r
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            out[pre + name + ".weight"] = (t[pre + name + ".weight"] * g_mlp[None, :]) @ r
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            out[pre + name + ".weight"] = r.T @ t[pre + name + ".weight"]
            if pre + name + ".bias" in t:
                out[pre + name + ".bias"] = t[pre + name + ".bias"] @ r
        out[pre + "input_layernorm.weight"] = torch.ones(d, dtype=torch.float64)
        out[pre + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.float64)
    for name, v in t.items():
        out.setdefault(name, v)
    return {**config, "tie_word_embeddings": False}, {k: v.float().contiguous() for k, v in out.items()}


def std_matched(config: dict[str, Any], tensors: Tensors, seed: int = 0) -> tuple[dict[str, Any], Tensors]:
    """An unrelated twin: independent Gaussian matrices with each tensor's mean and std (vectors kept)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: Tensors = {}
    for name in sorted(tensors):
        t = tensors[name]
        out[name] = t if t.ndim < 2 else torch.randn(t.shape, generator=gen) * t.std() + t.mean()
    return dict(config), out


def extend_vocabulary(source_dir: str | Any, out_dir: str | Any, words: list[str]) -> Any:
    """Copy an HF checkpoint directory with ``words`` added to its tokenizer.json as new (non-special) tokens.

    Each new embedding row (and lm_head row when untied) is the mean of the rows of the tokens the word
    was split into before, the usual initialisation when a vocabulary is extended; the function is
    otherwise unchanged until the model is trained further (``synth.train.finetune``).
    """
    import json
    import shutil
    from pathlib import Path

    import torch
    from tokenizers import Tokenizer

    from modelkin.synth.variants import read_dense, write_hf_checkpoint
    from modelkin.utils import atomic_path

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    config, tensors = read_dense(source_dir)
    data = json.loads((source_dir / "tokenizer.json").read_text(encoding="utf-8"))
    old = Tokenizer.from_file(str(source_dir / "tokenizer.json"))
    embed = tensors["model.embed_tokens.weight"]
    first = int(config["vocab_size"])
    rows = []
    for n, word in enumerate(words):
        pieces = old.encode(word, add_special_tokens=False).ids
        rows.append(embed[pieces].mean(0))
        data.setdefault("added_tokens", []).append(
            {"id": first + n, "content": word, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": False})
    new = torch.stack(rows)
    tensors["model.embed_tokens.weight"] = torch.cat([embed, new])
    if "lm_head.weight" in tensors and not config.get("tie_word_embeddings"):
        head = tensors["lm_head.weight"]
        tensors["lm_head.weight"] = torch.cat([head, new])
    config = {**config, "vocab_size": first + len(words)}
    with atomic_path(out_dir) as tmp:
        write_hf_checkpoint(tmp, config, tensors)
        (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
            if (source_dir / name).is_file():
                shutil.copy(source_dir / name, tmp / name)
    return out_dir
