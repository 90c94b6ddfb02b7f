"""Tiny random checkpoints of every supported architecture, in the real on-disk layout.

A tiny model is its architecture file's ``TINY`` entry (config.json as the real checkpoints spell
it, a tokenizer kind) plus random tensors made by walking the meta-built model's parameters and
mapped to the checkpoint's names by the architecture's ``to_checkpoint``; used by tests and examples.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from modelkin.errors import InputError
from modelkin.runtime.models import modules
from modelkin.runtime.models.causal_lm import Tiny

Tensors = dict[str, torch.Tensor]

TINY: dict[str, Tiny] = {name: module.TINY for name, module in modules().items()}


def random_tensors(model: torch.nn.Module, seed: int) -> Tensors:
    """Random weights for every parameter of a (meta-built) model, by parameter name and role.

    Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 0.25^2), norm weights ~ 1 + N(0, 0.1^2),
    biases ~ N(0, 0.1^2), MoGE router scales 1 + 0.2·tanh(N(0, 1)) (positive, around 1): activations
    stay O(1) and logits are far from uniform, tied or not.
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
        elif name.endswith(".router_scale"):
            out[name] = 1.0 + 0.2 * noise.tanh()
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

    Files: config.json, generation_config.json, model.safetensors and (when ``tokenizer``) the
    tiny tokenizer files of the architecture's kind.

    Raises:
        InputError: unknown ``arch``.
    """
    from safetensors.torch import save_file

    from modelkin.runtime.models import get_architecture
    from modelkin.utils import atomic_path

    config = tiny_config(arch, overrides)
    outdir = Path(outdir)
    with atomic_path(outdir) as tmp:
        tmp.mkdir(parents=True)
        if tokenizer:
            from modelkin.tokenizer import write_tiny_tokenizer

            # a real trained tokenizer whose ids stay below the config's vocab_size
            write_tiny_tokenizer(tmp, TINY[arch].tokenizer, vocab_size=config["vocab_size"])
        module = get_architecture(config)
        args = module.ModelArgs.from_hf_config(config)
        with torch.device("meta"):
            model = module.Model(args)
        tensors = module.to_checkpoint(random_tensors(model, seed), args)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors", {"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}, indent=2) + "\n")
    return outdir
