"""Generation in three layers: prefill/decode_step, generate_step (token, logprobs), and
stream_generate (frozen responses with text deltas, stop handling and timings). Many continuations
per prompt from one shared prefill (compare's behaviour rows) live in runtime/continuations.py."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from modelkin.errors import NumericalError
from modelkin.runtime.config import SamplingParams
from modelkin.runtime.kv_cache import KVCache, make_kv_cache
from modelkin.runtime.sampling import Sampler, make_sampler


def prefill(
    model: nn.Module, input_ids_BL: torch.Tensor, mask_BL: torch.Tensor | None, cache: KVCache
) -> torch.Tensor:
    """Run the prompt (left-padded) through the model, filling ``cache``; logits [B, V] of its end."""
    positions_BL, mask_BLS = cache.reserve(input_ids_BL.shape[1], mask_BL)
    logits = model(input_ids_BL, positions_BL=positions_BL, mask_BLS=mask_BLS, cache=cache, last_only=True)
    return logits[:, -1]


def decode_step(model: nn.Module, ids_B: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per sequence; logits [B, V] for the next one."""
    positions_BL, mask_BLS = cache.reserve(1)
    return model(ids_B[:, None], positions_BL=positions_BL, mask_BLS=mask_BLS, cache=cache)[:, -1]


def check_finite(picked_B: torch.Tensor, *, step: int, dtype: torch.dtype) -> None:
    """Raise NumericalError unless the picked tokens' log-probabilities are finite.

    A NaN or +Inf anywhere in a row of logits makes its whole log_softmax NaN, and argmax/sampling
    pick the NaN: checking the B picked values catches it without a pass over the vocabulary.
    """
    if not bool(torch.isfinite(picked_B).all()):
        raise NumericalError(
            f"the model produced NaN/Inf logits at generation step {step} (dtype {dtype})",
            hint="retry with --dtype float32; if that fails too the weights are damaged",
        )


def generate_step(
    model: nn.Module,
    input_ids_BL: torch.Tensor,
    *,
    mask_BL: torch.Tensor | None = None,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    generator: torch.Generator | None = None,
    cache: KVCache | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next ids [B], log-probabilities [B, V] float32) up to ``max_new_tokens`` times.

    The caller decides when to stop; the KV cache is sized for the prompt plus ``max_new_tokens``.
    """
    sampler = sampler or make_sampler()
    if cache is None:
        B, L = input_ids_BL.shape
        cache = make_kv_cache(model, batch_size=B, max_len=L + max_new_tokens)
    logits = prefill(model, input_ids_BL, mask_BL, cache)
    for step in range(max_new_tokens):
        ids_B = sampler(logits, generator)
        logprobs_BV = logits.float().log_softmax(dim=-1)
        check_finite(logprobs_BV.gather(-1, ids_B[:, None]), step=step, dtype=logits.dtype)
        yield ids_B, logprobs_BV
        if step + 1 < max_new_tokens:
            logits = decode_step(model, ids_B, cache)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GenerationResponse:
    """One new token of one prompt of the batch, with the text it completed.

    ``text`` is the new text since this prompt's previous response (may be empty while a multi-byte
    character is incomplete). ``finish_reason`` is None while running, then "stop" (EOS id or stop
    string) or "length".
    """

    index: int
    token: int
    logprob: float
    text: str
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    prefill_s: float
    decode_s: float


@dataclasses.dataclass(slots=True)
class _Row:
    prompt_len: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    emitted: str = ""  # text already handed out in responses
    done: bool = False


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as left-padded ids [B, L] and the mask [B, L] (1 = real token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


def stream_generate(
    model: nn.Module,
    tokenizer: Any | None,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    eos_ids: set[int],
    pad_id: int = 0,
) -> Iterator[GenerationResponse]:
    """Generate for a batch of prompts (left-padded); yield a response per new token per prompt.

    A prompt stops at an id in ``eos_ids`` (the id is kept in its tokens, not in its text), at a
    stop string (cut from the text), or after ``params.max_new_tokens``. Without a tokenizer the
    text fields stay empty and stop strings are not checked.
    """
    device = model.model.embed_tokens.weight.device
    ids_BL, mask_BL = left_pad(prompts, pad_id)
    rows = [_Row(prompt_len=len(p)) for p in prompts]
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    sampler = make_sampler(params.temperature, params.top_k, params.top_p, params.min_p)
    mask = None if bool(mask_BL.all()) else mask_BL.to(device)
    start = time.perf_counter()
    prefill_s = 0.0
    steps = generate_step(
        model,
        ids_BL.to(device),
        mask_BL=mask,
        max_new_tokens=params.max_new_tokens,
        sampler=sampler,
        generator=generator,
    )
    with torch.inference_mode():
        for step, (ids_B, logprobs_BV) in enumerate(steps):
            picked = logprobs_BV.gather(-1, ids_B[:, None])[:, 0].tolist()
            now = time.perf_counter()
            if step == 0:
                prefill_s = now - start
            decode_s = now - start - prefill_s
            for i, token in enumerate(ids_B.tolist()):
                row = rows[i]
                if row.done:
                    continue
                delta, reason = _advance(row, token, tokenizer, params, eos_ids)
                yield GenerationResponse(
                    index=i,
                    token=token,
                    logprob=picked[i],
                    text=delta,
                    finish_reason=reason,
                    prompt_tokens=row.prompt_len,
                    generation_tokens=len(row.tokens),
                    prefill_s=prefill_s,
                    decode_s=decode_s,
                )
            if all(r.done for r in rows):
                return


def _advance(
    row: _Row, token: int, tokenizer: Any | None, params: SamplingParams, eos_ids: set[int]
) -> tuple[str, str | None]:
    """Append ``token`` to ``row``; return (new text safe to show, finish reason or None).

    Text that could still turn into a stop string, or ends in an incomplete UTF-8 character, is
    held back until the next token decides it.
    """
    row.tokens.append(token)
    is_eos = token in eos_ids
    reason = "stop" if is_eos else ("length" if len(row.tokens) >= params.max_new_tokens else None)
    if tokenizer is None:
        row.done = reason is not None
        return "", reason
    text = tokenizer.decode(row.tokens[:-1] if is_eos else row.tokens)
    start = len(row.emitted)
    for stop in params.stop:
        cut = text.find(stop, max(0, start - len(stop) + 1))
        if cut >= 0:
            text, reason = text[:cut], "stop"
            break
    safe = len(text) if reason is not None else len(text) - _held_back(text, params.stop)
    delta = text[start:safe] if text.startswith(row.emitted) else ""
    row.emitted += delta
    row.done = reason is not None
    return delta, reason


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the tail of ``text`` that is undecided: a stop-string prefix or a partial char."""
    held = min(len(text) - len(text.rstrip("\ufffd")), 3)
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if stop.startswith(text[-n:]):
                held = n
                break
    return held
