"""Controlled relatives of a dense Llama/Qwen2 checkpoint, written as HF directories for the demo and tests.

* ``permuted_copy``: the same function with re-parameterised weights: the residual stream, attention
  heads (whole KV groups), value dimensions and MLP neurons permuted, and q/k, v/o, up/down and
  norm/next-linear pairs rescaled by reciprocal factors. Outputs match the source up to float rounding.
* ``independent_twin``: the same architecture, shapes and tokenizer, with freshly initialised weights
  (normal(0, initializer_range), norms 1, biases 0): a model with no derivation from the source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelkin.errors import CheckpointError, TokenizerError, UnsupportedArchitectureError
from modelkin.tokenizer.write import copy_tokenizer_files, write_gguf_tokenizer
from modelkin.utils import atomic_path

DENSE_TYPES = ("llama", "qwen2")


def read_dense(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF config, float32 tensors by canonical name) of a dense Llama/Qwen2 checkpoint (any format)."""
    import torch

    from modelkin.checkpoint import open_checkpoint

    with open_checkpoint(path) as src:
        config = {k: v for k, v in src.config().items() if not k.startswith("_")}
        if config.get("model_type") not in DENSE_TYPES:
            raise UnsupportedArchitectureError(
                f"{path}: variants are built from dense {' / '.join(DENSE_TYPES)} checkpoints, "
                f"not model_type {config.get('model_type')!r}", hint="pass a Llama or Qwen2 checkpoint")
        names = list(src.keys())
        tensors = {name: src.get_tensor(name).to(torch.float32).contiguous() for name in names}
    return config, tensors


def _log_uniform(n: int, gen: Any, low: float = 0.5, high: float = 2.0) -> Any:
    import math

    import torch

    return torch.exp(torch.empty(n).uniform_(math.log(low), math.log(high), generator=gen))


def permute_dense(config: dict[str, Any], tensors: dict[str, Any], *, seed: int = 0,
                  rescale: bool = True) -> dict[str, Any]:
    """A function-preserving re-parameterisation of a dense decoder's weights (see module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    d_model, n_layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    scale: Callable[[int], Any] = (lambda n: _log_uniform(n, gen)) if rescale else (lambda n: torch.ones(n))
    perm_d = torch.randperm(d_model, generator=gen)
    out = dict(tensors)
    out["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:, perm_d]
    if "lm_head.weight" in tensors:
        out["lm_head.weight"] = tensors["lm_head.weight"][:, perm_d]
    out["model.norm.weight"] = tensors["model.norm.weight"][perm_d]
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        _permute_attention(config, tensors, out, pre, perm_d, gen, scale)
        _permute_mlp(tensors, out, pre, perm_d, gen, scale)
    return out


def _permute_attention(config: dict[str, Any], t: dict[str, Any], out: dict[str, Any], pre: str, perm_d: Any,
                       gen: Any, scale: Callable[[int], Any]) -> None:
    import torch

    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    group = heads // kv
    a = scale(perm_d.numel())                      # input_layernorm weight x a, q/k/v columns / a
    out[pre + "input_layernorm.weight"] = (t[pre + "input_layernorm.weight"] * a)[perm_d]
    kv_order = torch.randperm(kv, generator=gen)
    q_rows, k_rows, v_rows, o_cols = [], [], [], []
    qk_scale_rows, v_scale_rows, o_scale_cols = [], [], []
    for j in range(kv):                            # new KV head j is old head kv_order[j]
        old = int(kv_order[j])
        c = scale(1)                               # q x c, k / c keeps q.k (RoPE is linear)
        tau = torch.randperm(hd, generator=gen)    # value dimensions: v rows and o columns together
        d = scale(hd)
        k_rows.append(old * hd + torch.arange(hd))
        v_rows.append(old * hd + tau)
        qk_scale_rows.append(c.expand(hd))
        v_scale_rows.append(d)
        for g in torch.randperm(group, generator=gen).tolist():
            old_q = old * group + g
            q_rows.append(old_q * hd + torch.arange(hd))
            o_cols.append(old_q * hd + tau)
            o_scale_cols.append(d)
    q_rows, k_rows, v_rows, o_cols = (torch.cat(x) for x in (q_rows, k_rows, v_rows, o_cols))
    c_kv = torch.cat(qk_scale_rows)
    c_q = c_kv.view(kv, 1, hd).expand(kv, group, hd).reshape(-1)
    d_v, d_o = torch.cat(v_scale_rows), torch.cat(o_scale_cols)
    col = (a[perm_d])[None, :]
    for name, rows, s in (("q_proj", q_rows, c_q), ("k_proj", k_rows, 1.0 / c_kv), ("v_proj", v_rows, d_v)):
        out[pre + f"self_attn.{name}.weight"] = t[pre + f"self_attn.{name}.weight"][rows][:, perm_d] / col * s[:, None]
        if pre + f"self_attn.{name}.bias" in t:
            out[pre + f"self_attn.{name}.bias"] = t[pre + f"self_attn.{name}.bias"][rows] * s
    out[pre + "self_attn.o_proj.weight"] = t[pre + "self_attn.o_proj.weight"][perm_d][:, o_cols] / d_o[None, :]
    if pre + "self_attn.o_proj.bias" in t:
        out[pre + "self_attn.o_proj.bias"] = t[pre + "self_attn.o_proj.bias"][perm_d]


def _permute_mlp(t: dict[str, Any], out: dict[str, Any], pre: str, perm_d: Any, gen: Any,
                 scale: Callable[[int], Any]) -> None:
    import torch

    b = scale(perm_d.numel())                      # post_attention_layernorm x b, gate/up columns / b
    out[pre + "post_attention_layernorm.weight"] = (t[pre + "post_attention_layernorm.weight"] * b)[perm_d]
    col = (b[perm_d])[None, :]
    n_ff = t[pre + "mlp.up_proj.weight"].shape[0]
    perm_f = torch.randperm(n_ff, generator=gen)
    s = scale(n_ff)[perm_f]                        # up rows x s, down columns / s (gate . up is linear in up)
    out[pre + "mlp.gate_proj.weight"] = t[pre + "mlp.gate_proj.weight"][perm_f][:, perm_d] / col
    out[pre + "mlp.up_proj.weight"] = t[pre + "mlp.up_proj.weight"][perm_f][:, perm_d] / col * s[:, None]
    out[pre + "mlp.down_proj.weight"] = t[pre + "mlp.down_proj.weight"][perm_d][:, perm_f] / s[None, :]
    for name, rows, factor in (("gate_proj", perm_f, None), ("up_proj", perm_f, s), ("down_proj", perm_d, None)):
        key = pre + f"mlp.{name}.bias"
        if key in t:
            out[key] = t[key][rows] * (factor if factor is not None else 1.0)


def random_like(config: dict[str, Any], tensors: dict[str, Any], *, seed: int = 0) -> dict[str, Any]:
    """Fresh weights of the same shapes: matrices ~ normal(0, initializer_range), norms 1, biases 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    std = float(config.get("initializer_range") or 0.02)
    out = {}
    for name in sorted(tensors):
        shape = tensors[name].shape
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            out[name] = torch.zeros(shape)
        else:
            out[name] = torch.empty(shape).normal_(0.0, std, generator=gen)
    return out


def write_tokenizer_files(source: str | os.PathLike[str], outdir: str | os.PathLike[str]) -> None:
    """Give ``outdir`` the tokenizer of checkpoint ``source`` as HF files.

    An HF directory's tokenizer files are copied; a GGUF vocabulary of the byte-level BPE kind is written
    as tokenizer.json + tokenizer_config.json (BOS/EOS policy and chat templates kept).

    Raises:
        TokenizerError: the source has no tokenizer, or a GGUF vocabulary kind we cannot export.
    """
    src, out = Path(source), Path(outdir)
    if src.suffix.lower() != ".gguf":
        if not copy_tokenizer_files(src if src.is_dir() else src.parent, out):
            raise TokenizerError(f"{source} has no tokenizer files to copy", hint="add tokenizer.json to it")
        return
    from modelkin.checkpoint import open_checkpoint

    with open_checkpoint(src) as ckpt:
        meta = ckpt.metadata()
    write_gguf_tokenizer(meta, str(src), out)


def write_hf_checkpoint(outdir: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, Any], *,
                        tokenizer_from: str | os.PathLike[str] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) as one directory, atomically."""
    from safetensors.torch import save_file

    outdir = Path(outdir)
    cfg = {**config, "torch_dtype": "float32"}
    if cfg.get("tie_word_embeddings"):
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    try:
        with atomic_path(outdir) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
            if tokenizer_from is not None:
                write_tokenizer_files(tokenizer_from, tmp)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {outdir}: {err.strerror or err}",
                              hint="choose a writable directory with enough free space") from err
    return outdir


def permuted_copy(source: str | os.PathLike[str], outdir: str | os.PathLike[str], *, seed: int = 0,
                  rescale: bool = True) -> Path:
    """Write a function-preserving permuted (and rescaled) copy of ``source`` to ``outdir``."""
    config, tensors = read_dense(source)
    return write_hf_checkpoint(outdir, config, permute_dense(config, tensors, seed=seed, rescale=rescale),
                               tokenizer_from=source)


def independent_twin(source: str | os.PathLike[str], outdir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a freshly initialised model with ``source``'s architecture and tokenizer to ``outdir``."""
    config, tensors = read_dense(source)
    return write_hf_checkpoint(outdir, config, random_like(config, tensors, seed=seed), tokenizer_from=source)
