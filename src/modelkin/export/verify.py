"""Check an export against the torch engine: logits of every prompt position, then teacher-forced
decode steps through both engines' KV caches, as maximum absolute differences."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published"


def compare_engines(
    torch_model: Any, ort_model: Any, prompts: Sequence[Sequence[int]], *, steps: int = 16
) -> dict[str, Any]:
    """Max |logits(ort) - logits(torch)| for ``prompts`` (a batch, left-padded as generation pads).

    ``prefill_max_abs_diff`` covers every position of the (right-padded) prompts, through
    ``Model.logits``; ``decode_max_abs_diff`` the ``steps`` decode steps, each engine fed the torch
    engine's greedy token through its own KV cache. ``tokens`` are those greedy tokens per prompt.
    """
    from modelkin.runtime.generate import decode_step, left_pad, prefill
    from modelkin.runtime.kv_cache import make_kv_cache

    full_t, full_o = torch_model.logits(prompts), ort_model.logits(prompts)
    valid = _right_padded_mask(prompts, full_t.shape[1])
    prefill_diff = ((full_t.cpu() - full_o) * valid[..., None]).abs().max().item()
    ids_BL, mask_BL = left_pad(prompts, torch_model.pad_token_id)
    mask = None if bool(mask_BL.all()) else mask_BL
    batch, length = ids_BL.shape
    engines = (torch_model.module, ort_model.module)
    caches = [make_kv_cache(m, batch_size=batch, max_len=length + steps) for m in engines]
    diffs, tokens = [], []
    with torch.inference_mode():
        last = [prefill(m, ids_BL.to(_device(m)), _to(mask, m), c) for m, c in zip(engines, caches)]
        diffs.append(_diff(*last))
        for _ in range(steps):
            next_B = last[0].argmax(dim=-1).cpu()
            tokens.append(next_B.tolist())
            last = [decode_step(m, next_B.to(_device(m)), c) for m, c in zip(engines, caches)]
            diffs.append(_diff(*last))
    return {
        "prefill_max_abs_diff": prefill_diff,
        "decode_max_abs_diff": max(diffs[1:], default=0.0),
        "last_prompt_token_max_abs_diff": diffs[0],
        "max_abs_diff": max(prefill_diff, *diffs),
        "max_abs_logit": full_t.abs().max().item(),
        "steps": steps,
        "tokens": [list(t) for t in zip(*tokens)],
    }


def _device(module: Any) -> torch.device:
    return module.model.embed_tokens.weight.device


def _to(mask: torch.Tensor | None, module: Any) -> torch.Tensor | None:
    return None if mask is None else mask.to(_device(module))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def _right_padded_mask(prompts: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    mask = torch.zeros(len(prompts), width)
    for i, p in enumerate(prompts):
        mask[i, : len(p)] = 1
    return mask


def verify_export(
    model: str | os.PathLike[str], outdir: str | os.PathLike[str], *, steps: int = 4
) -> dict[str, Any]:
    """Load ``model`` with the torch engine and ``outdir`` with onnxruntime (both on CPU, in the
    export's dtype) and compare them on a sample prompt batch (``compare_engines``)."""
    from modelkin.export.ort_engine import load as load_ort
    from modelkin.runtime.api import load as load_torch

    ort_model = load_ort(outdir, device="cpu")
    torch_model = load_torch(model, device="cpu", dtype=ort_model.manifest.dtype)
    if torch_model.tokenizer is not None:
        ids = torch_model.tokenizer.encode(SAMPLE_TEXT)
    else:
        ids = [(7 * i + 3) % torch_model.config.vocab_size for i in range(16)]
    return compare_engines(torch_model, ort_model, [ids, ids[: max(1, len(ids) // 2)]], steps=steps)
