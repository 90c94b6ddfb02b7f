"""Generation in three layers: prefill/decode_step, generate_step (token, logprobs), and
stream_generate (frozen responses with text deltas, stop handling and timings); plus
prefill_decode, many continuations per prompt from one shared prefill (token ids only)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from modelkin.errors import NumericalError
from modelkin.runtime.config import SamplingParams
from modelkin.runtime.kv_cache import KVCache, gather_rows, make_kv_cache
from modelkin.runtime.sampling import Sampler, inverse_cdf, make_sampler
from modelkin.utils import trim_heap


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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Continuation:
    """One continuation for prefill_decode: of prompt ``prompt`` (an index), up to ``max_new_tokens``
    tokens, greedy when ``uniforms`` is None, else sampled at ``temperature`` by inverse_cdf with
    ``uniforms[i]`` (in [0, 1)) drawing token i."""

    prompt: int
    max_new_tokens: int
    temperature: float = 1.0
    uniforms: torch.Tensor | None = None


def prefill_decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[Continuation],
    *,
    eos_ids: set[int],
    pad_id: int = 0,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
    logits_budget: int = 1 << 24,
    cache_budget: int = 3 << 26,
    record: Callable[[], Any] | None = None,
    sample_dtype: torch.dtype | None = None,
    in_place: bool = False,
) -> list[list[int]]:
    """Prefill every prompt once, then decode every row from its prompt's cache; ids per row.

    Prompts run in left-padded batches of at most ``logits_budget`` logits elements; each prompt's
    float32 logits at its real positions [n, V] go to ``on_logits(index, logits)``, and ``record()``
    (a context manager, e.g. MoE routing telemetry) is active around the prefills only. Rows then
    decode in batches whose caches hold at most ``cache_budget`` bytes, finished rows dropping out;
    a row stops after an id in ``eos_ids`` (kept) or ``max_new_tokens``. With a ``sample_dtype``
    other than the model's, sampled rows decode in batches of their own with the weights in that dtype
    (cache rows cast); greedy rows and the prefill use ``model`` as it is. The weights in ``sample_dtype``
    are a copy made for this call, or, with ``in_place``, ``model`` itself converted once the greedy
    rows are done (no second copy in memory; the caller must not use ``model`` afterwards).
    """
    device = model.model.embed_tokens.weight.device
    vocab = int(model.args.vocab_size)
    prefills: list[tuple[KVCache, int, torch.Tensor]] = []
    by_prompt: dict[int, int] = {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with torch.inference_mode():
        width = lambda batch: len(batch) * max(len(prompts[i]) for i in batch) * vocab  # noqa: E731
        for batch in _packs(order, width, logits_budget):
            ids_BL, mask_BL = left_pad([prompts[i] for i in batch], pad_id)
            cache = make_kv_cache(model, batch_size=len(batch), max_len=ids_BL.shape[1])
            mask = None if bool(mask_BL.all()) else mask_BL.to(device)
            with record() if record is not None else contextlib.nullcontext():
                positions_BL, mask_BLS = cache.reserve(ids_BL.shape[1], mask)
                logits_BLV = model(ids_BL.to(device), positions_BL=positions_BL, mask_BLS=mask_BLS,
                                   cache=cache)
            for b, i in enumerate(batch):
                n = len(prompts[i])
                if on_logits is not None:
                    on_logits(i, logits_BLV[b, -n:].float())
                by_prompt[i] = len(prefills)
                prefills.append((cache, b, logits_BLV[b, -1].float().clone()))
            del logits_BLV
        sample_model = None
        weight = model.model.embed_tokens.weight
        if sample_dtype not in (None, weight.dtype) and any(r.uniforms is not None for r in rows):
            sample_model = functools.partial(module_cast if in_place else module_copy, model, sample_dtype)
        return _decode_all(model, prompts, rows, prefills, by_prompt, eos_ids=eos_ids,
                           cache_budget=cache_budget, sample_model=sample_model,
                           sample_dtype=sample_dtype if sample_model is not None else None)


def _decode_all(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[Continuation],
    prefills: list[tuple[KVCache, int, torch.Tensor]],
    by_prompt: dict[int, int],
    *,
    eos_ids: set[int],
    cache_budget: int,
    sample_model: Callable[[], nn.Module] | None,
    sample_dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """prefill_decode's second half: rows packed by prompt length into batches of caches under
    ``cache_budget`` bytes (each batch's cache at the dtype it decodes in); with a ``sample_model`` (in
    ``sample_dtype``, made when the first sampled batch runs, after every greedy batch) the sampled rows
    decode apart with it."""
    out: list[list[int]] = [[] for _ in rows]
    if not rows:
        return out
    slot_floats = sum(2 * k[0, :, 0].numel() for k in prefills[0][0].keys)  # keys + values, all layers
    apart = [sample_model is not None and r.uniforms is not None for r in rows]
    element = {False: model.model.embed_tokens.weight.element_size(),
               True: torch.empty((), dtype=sample_dtype or model.model.embed_tokens.weight.dtype).element_size()}
    decoders: dict[bool, nn.Module] = {False: model}

    def size(batch: list[int]) -> int:  # cache bytes; one kind of row per batch
        if len({apart[r] for r in batch}) > 1:
            return cache_budget + 1
        slots = max(len(prompts[rows[r].prompt]) + rows[r].max_new_tokens for r in batch)
        return len(batch) * slots * slot_floats * element[apart[batch[0]]]

    row_order = sorted(range(len(rows)), key=lambda r: (apart[r], len(prompts[rows[r].prompt]), rows[r].prompt))
    for batch in _packs(row_order, size, cache_budget):
        if apart[batch[0]] and True not in decoders:
            decoders[True] = sample_model()  # type: ignore[misc]
        decoder = decoders[apart[batch[0]]]
        picked = [rows[r] for r in batch]
        sources: list[tuple[KVCache, int, int]] = []
        last = None
        for c in picked:  # consecutive rows of one prompt copy its prefill in one go
            if c.prompt == last:
                cache, b, copies = sources[-1]
                sources[-1] = (cache, b, copies + 1)
            else:
                cache, b, _ = prefills[by_prompt[c.prompt]]
                sources.append((cache, b, 1))
            last = c.prompt
        dtype = decoder.model.embed_tokens.weight.dtype
        cache = gather_rows(sources, extra=max(c.max_new_tokens for c in picked), dtype=dtype)
        first_BV = torch.stack([prefills[by_prompt[c.prompt]][2] for c in picked])
        for r, ids in zip(batch, decode_rows(decoder, cache, first_BV, picked, eos_ids=eos_ids)):
            out[r] = ids
        del cache
    return out


def decode_rows(
    model: nn.Module,
    cache: KVCache,
    logits_BV: torch.Tensor,
    rows: Sequence[Continuation],
    *,
    eos_ids: set[int],
) -> list[list[int]]:
    """Batched decoding of ``rows`` (cache row b is rows[b]) from their next-token logits; per-row
    temperature (None uniforms: greedy), length and EOS. Rows that finish are dropped from the
    batch once a quarter of it has finished."""
    tokens: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))  # rows[live[b]] is cache row b
    done = [False] * len(rows)  # by batch position
    step = 0
    while True:
        ids_B = _pick(logits_BV, [rows[r] for r in live], step)
        for b, (r, token) in enumerate(zip(live, ids_B.tolist())):
            if not done[b]:
                tokens[r].append(token)
                done[b] = token in eos_ids or len(tokens[r]) >= rows[r].max_new_tokens
        step += 1
        if all(done):
            return tokens
        if 4 * sum(done) >= len(live):
            keep = [b for b, d in enumerate(done) if not d]
            index = torch.tensor(keep, device=ids_B.device)
            cache, ids_B = cache.select(index), ids_B[index]
            live, done = [live[b] for b in keep], [False] * len(keep)
        logits_BV = decode_step(model, ids_B, cache)  # finished rows still in the batch run on, ignored


def _pick(logits_BV: torch.Tensor, rows: Sequence[Continuation], step: int) -> torch.Tensor:
    """Next ids: argmax for greedy rows, inverse_cdf at the row's temperature for sampled rows."""
    logits_BV = logits_BV.float()
    check_finite(logits_BV.amax(dim=-1), step=step, dtype=logits_BV.dtype)
    sampled = [b for b, r in enumerate(rows) if r.uniforms is not None and step < len(r.uniforms)]
    if len(sampled) == len(rows):  # a batch of sampled rows: no argmax, no row copy, no division by 1
        temps = [r.temperature for r in rows]
        if any(t != 1.0 for t in temps):
            logits_BV = logits_BV / torch.tensor(temps, device=logits_BV.device)[:, None]
        # the float32 logits are this step's own (decode_rows reads them once): sample in their buffer
        return inverse_cdf(logits_BV, torch.stack([r.uniforms[step] for r in rows]).to(logits_BV.device),
                           overwrite=True)
    ids_B = logits_BV.argmax(dim=-1)
    if sampled:
        index = torch.tensor(sampled, device=logits_BV.device)
        temps = torch.tensor([rows[b].temperature for b in sampled], device=logits_BV.device)
        u = torch.stack([rows[b].uniforms[step] for b in sampled]).to(logits_BV.device)
        ids_B[index] = inverse_cdf(logits_BV.index_select(0, index) / temps[:, None], u)
    return ids_B


def module_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` with its floating-point parameters in ``dtype``, row-major (batched matmuls' best
    layout), buffers copied as they are, tied weights still tied; no full-precision intermediate."""
    memo: dict[int, Any] = {}
    for m in module.modules():  # copies derived from the weights (MoE prepacked experts): rebuilt
        if getattr(m, "packed", None) is not None:
            memo[id(m.packed)] = None
    with torch.inference_mode(False):  # ordinary tensors: MoE weight packing reads their versions
        for param in module.parameters():
            if param.is_floating_point():
                memo[id(param)] = nn.Parameter(param.detach().to(dtype).contiguous(), requires_grad=False)
        return copy.deepcopy(module, memo)


def module_cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` itself with its floating-point parameters converted to ``dtype`` (row-major), one tensor
    at a time, so at most one extra tensor is ever held; MoE prepacked experts are dropped and rebuilt."""
    for m in module.modules():
        if getattr(m, "packed", None) is not None:
            m.packed = None
    with torch.inference_mode(False):
        for param in module.parameters():  # tied weights are one Parameter: converted once
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype).contiguous()
                if param.numel() >= 1 << 20:  # hand the old tensor's pages back now, not after the last one
                    trim_heap(collect=False)
    return module


def _packs(order: Sequence[int], cost: Callable[[list[int]], int], budget: int) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` whose ``cost`` is at most ``budget`` (at least one item each)."""
    batch: list[int] = []
    for i in order:
        if batch and cost(batch + [i]) > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
