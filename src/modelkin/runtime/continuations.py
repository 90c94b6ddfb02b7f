"""Many continuations per prompt from one shared prefill (token ids only): ``prefill_decode`` prefills
every prompt once, hands its logits to a callback, then decodes greedy and sampled rows in batches of
gathered cache rows; sampled rows may decode with the weights in another dtype (``module_copy`` /
``module_cast``). compare's behaviour collection runs on it (compare/behaviour/outputs.py)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from modelkin.runtime.generate import check_finite, decode_step, left_pad
from modelkin.runtime.kv_cache import KVCache, gather_rows, make_kv_cache
from modelkin.runtime.sampling import inverse_cdf
from modelkin.utils import trim_heap


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
        for batch in prefill_batches([len(prompts[i]) for i in order], max(1, logits_budget // vocab), order):
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
        trim_heap()  # the prefill batches' logits and activations: hand their pages back
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
        trim_heap()  # the batch's cache and per-step logits: give their pages back
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
    sampled = [b for b, r in enumerate(rows) if r.uniforms is not None and step < len(r.uniforms)]
    if len(sampled) == len(rows):  # a batch of sampled rows: no argmax, no row copy, no division by 1
        temps = [r.temperature for r in rows]
        if any(t != 1.0 for t in temps):
            logits_BV = logits_BV / torch.tensor(temps, device=logits_BV.device)[:, None]
        top_B1 = logits_BV.amax(dim=-1, keepdim=True)  # one pass: the check's and the sampler's
        check_finite(top_B1[:, 0], step=step, dtype=logits_BV.dtype)
        # the float32 logits are this step's own (decode_rows reads them once): sample in their buffer
        return inverse_cdf(logits_BV, torch.stack([r.uniforms[step] for r in rows]).to(logits_BV.device),
                           overwrite=True, top_B1=top_B1)
    check_finite(logits_BV.amax(dim=-1), step=step, dtype=logits_BV.dtype)
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
    at a time, so at most one extra tensor is ever held; MoE prepacked experts are dropped and rebuilt.

    The old tensors' pages go back to the OS every 32 MB freed and at the end: once glibc's mmap threshold
    has grown (compare's fingerprints free many blocks first), tensors of a few MB live in its heap, and
    without a trim a GGUF model's float32 weights stayed resident beside their bfloat16 copies (compare_many:
    +0.25 GB while the suspect's sampled rows decode)."""
    for m in module.modules():
        if getattr(m, "packed", None) is not None:
            m.packed = None
    freed = 0
    with torch.inference_mode(False):
        for param in module.parameters():  # tied weights are one Parameter: converted once
            if param.is_floating_point() and param.dtype != dtype:
                freed += param.numel() * param.element_size()
                param.data = param.data.to(dtype).contiguous()
                if freed >= 32 << 20:  # hand the old tensors' pages back now, not after the last one
                    trim_heap()
                    freed = 0
    if freed:
        trim_heap()
    return module


BATCH_COST_TOKENS = 16  # a prefill batch's fixed cost (a pass over every layer's weights), in padded tokens


def prefill_batches(lengths: Sequence[int], max_tokens: int,
                    order: Sequence[int] | None = None) -> list[list[int]]:
    """Consecutive runs of prompts sorted by length (``lengths`` ascending; ``order`` their indices), each of
    at most ``max_tokens`` padded tokens (rows x longest; one prompt may exceed it alone), that minimise the
    padded tokens plus ``BATCH_COST_TOKENS`` per batch: fewer padding positions run through the model than
    when each batch is filled greedily (SmolLM2's 24 default prompts, 460 tokens: 643 padded in 3 batches
    -> 525 in 4)."""
    order = list(range(len(lengths))) if order is None else list(order)
    n = len(lengths)
    best = [0.0] + [math.inf] * n  # cost of the first i prompts
    cut = [0] * (n + 1)  # where their last run starts
    for i in range(1, n + 1):
        for j in range(i - 1, -1, -1):  # the last run is prompts j..i-1, longest lengths[i - 1]
            padded = (i - j) * lengths[i - 1]
            if padded > max_tokens and i - j > 1:
                break
            if best[j] + padded + BATCH_COST_TOKENS < best[i]:
                best[i], cut[i] = best[j] + padded + BATCH_COST_TOKENS, j
    runs, i = [], n
    while i > 0:
        runs.append(order[cut[i]:i])
        i = cut[i]
    return runs[::-1]


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
