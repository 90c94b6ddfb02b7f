"""A merged LoRA relative: low-rank adapters on chosen linear maps of a dense Llama/Qwen2 model, trained with
AdamW on real text while the base weights stay frozen, then merged (W + (alpha/r)·B·A) and written as HF.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from torch import nn

from modelkin.synth import train

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


class LoRALinear(nn.Module):
    """``base(x) + scale · x·Aᵀ·Bᵀ`` with A [r, in] ~ Kaiming-uniform and B [out, r] = 0 (starts as ``base``)."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        bound = 1.0 / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=gen))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        """The base Linear with the adapter folded in (in place)."""
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_B @ self.lora_A)
        return self.base


def attach(model: nn.Module, *, rank: int, alpha: float, seed: int,
           targets: tuple[str, ...] = TARGETS) -> list[str]:
    """Freeze ``model`` and wrap every layer's ``targets`` in a LoRALinear; returns the wrapped module names."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if any(name.endswith("." + t) for t in targets) and isinstance(module, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, LoRALinear(module, rank=rank, alpha=alpha, gen=gen))
            wrapped.append(name)
    return wrapped


def merge(model: nn.Module) -> int:
    """Replace every LoRALinear by its merged base Linear; returns how many were merged."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module.merged())
            count += 1
    return count


def lora_finetune(source: str | os.PathLike[str], out: str | os.PathLike[str], *, steps: int, lr: float,
                  seed: int, tokens: Any, rank: int = 8, alpha: float = 16.0,
                  targets: tuple[str, ...] = TARGETS, tokenizer_from: str | os.PathLike[str] | None = None,
                  batch: int = 8, seq: int = 64, **fit_options: Any) -> train.TrainResult:
    """Train LoRA adapters on ``source`` (``seed``: adapter init and data order), merge them, write ``out``.

    Raises:
        CheckpointError: ``source`` is not a dense Llama/Qwen2 checkpoint, or no module matched ``targets``.
    """
    from modelkin.errors import CheckpointError

    start = time.perf_counter()
    config, model = train.load_trainable(source)
    if not attach(model, rank=rank, alpha=alpha, seed=seed, targets=targets):
        raise CheckpointError(f"{source}: no linear map named like {', '.join(targets)}",
                              hint="pass a dense Llama/Qwen2 checkpoint")
    fit_options.setdefault("weight_decay", 0.0)
    losses = train.fit(model, tokens, steps=steps, lr=lr, data_seed=seed, batch=batch, seq=seq, **fit_options)
    merge(model)
    path = train.save(model, config, out, tokenizer_from or source)
    return train.TrainResult(path, losses, time.perf_counter() - start, steps, steps * batch * seq, model)
