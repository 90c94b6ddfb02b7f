"""Run one model over a prompt set and keep what behavioural metrics need, compactly, on the CPU.

Per prompt, from one prefill (Model.prefill_decode): the next-token log-softmax at every prompt position
(float16), the top-k ids (from float32), bits per byte of the prompt text, MoE routing of the prompt
tokens; then a greedy continuation and sampled ones for the two-sample test, decoded together from that
prefill. Models are run one at a time, so two models never need to fit together.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelkin.compare.behaviour.prompts import Prompt
from modelkin.compare.settings import BehaviourSettings
from modelkin.errors import InputError
from modelkin.tokenizer.canonical import vocabulary
from modelkin.utils import trim_heap

Tick = Callable[[str], None]


@dataclasses.dataclass(kw_only=True)
class ModelOutputs:
    """Everything behavioural comparison reads from one model (CPU tensors and plain lists)."""

    path: str
    model_type: str
    logits_size: int
    vocab_hash: str | None           # sha256 of the tokenizer's id -> token table
    is_moe: bool
    prompt_ids: list[list[int]]
    logprobs: list[Any]              # per prompt: float16 Tensor [T, V]
    topk_ids: list[Any]              # per prompt: int32 Tensor [T, k]
    bpb: list[float | None]
    greedy_ids: list[list[int]]
    greedy_text: list[str]
    sample_ids: list[list[list[int]]]  # [prompt][sample] -> ids
    sample_text: list[list[str]]
    routing: dict[str, Any] | None
    timings: dict[str, float]
    vocab_pieces: list[str] | None = None  # token strings by id, for matching vocabularies byte by byte
    special_ids: set[int] | None = None
    sample_dtype: str | None = None  # the weights' dtype the sampled continuations decoded with


def model_identity(path: str | os.PathLike[str]) -> str:
    """A cheap identity for caching: resolved path plus size and mtime of its files."""
    p = Path(path).resolve()
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    parts = [str(p)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class OutputCache:
    """Keeps the outputs of the last ``max_entries`` (model, settings, prompts, seed) runs in memory."""

    def __init__(self, max_entries: int = 2):
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[Any, ...], ModelOutputs] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> ModelOutputs | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: tuple[Any, ...], outputs: ModelOutputs) -> None:
        self._items[key] = outputs
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


def vocab_hash(pieces: Sequence[str]) -> str:
    """sha256 over a vocabulary's id -> token strings; equal hashes mean identical vocabularies."""
    h = hashlib.sha256(str(len(pieces)).encode())
    for piece in pieces:
        h.update(b"\x00" + piece.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def collect_outputs(path: str | os.PathLike[str], prompts: Sequence[Prompt], settings: BehaviourSettings, *,
                    device: str = "auto", dtype: str = "auto", allow_fallback: bool | None = None,
                    seed: int, tick: Tick | None = None) -> ModelOutputs:
    """Load the model at ``path``, run it over ``prompts``, free it, and return its outputs."""
    import modelkin

    tick = tick or (lambda _msg: None)
    t0 = time.perf_counter()
    tick(f"loading {Path(path).name}")
    # batched prefill and decode only: row-major weights (see load's gemv_layout; same outputs, no copy)
    model = modelkin.load(path, device=device, dtype=dtype, allow_fallback=allow_fallback, gemv_layout=False)
    trim_heap()  # loading (GGUF dequantisation, conversions) leaves ~0.1 GB freed in the heap
    timings = {"load_s": time.perf_counter() - t0}
    try:
        return run_outputs(model, prompts, settings, seed=seed, tick=tick, timings=timings, consume=True)
    finally:
        backend, module = model.backend, weakref.ref(model.module)
        del model
        if module() is not None:  # held by a reference cycle: collect it (a full collection costs ~0.13 s)
            gc.collect()
        _empty_device_cache(backend)


def run_outputs(model: Any, prompts: Sequence[Prompt], settings: BehaviourSettings, *, seed: int,
                tick: Tick | None = None, timings: dict[str, float] | None = None,
                consume: bool = False) -> ModelOutputs:
    """Run an already loaded model over ``prompts`` (see collect_outputs). With ``consume`` the model may be
    converted in place for the sampled rows (settings.sample_dtype) and must not be used afterwards."""
    tick = tick or (lambda _msg: None)
    timings = dict(timings or {})
    tok = model.tokenizer
    if tok is None:
        raise InputError(f"{model.path} has no tokenizer, so it cannot run text prompts",
                         hint="add tokenizer files beside the weights, or compare weights only (--no-behaviour)")
    ids = [tok.encode(p.prompt, add_special_tokens=True) for p in prompts]
    for p, row in zip(prompts, ids):
        if not row:
            raise InputError(f"prompt {p.id!r} encodes to zero tokens for {model.path}", hint="remove it")
    tele = _telemetry(model)
    t = time.perf_counter()
    tick("prefill and continuations")
    scores = _Scores(prompts, ids, settings.top_k)
    rows, greedy_rows, sample_rows = _continuations(ids, settings, seed)
    options = _sample_options(model, settings)
    out = model.prefill_decode(ids, rows, on_logits=scores.add, in_place=consume, **options)
    timings["logits_s"] = scores.done_at - t
    timings["decode_s"] = time.perf_counter() - scores.done_at
    routing = tele.to_json() if tele is not None else None
    logprobs, topk, bpb = scores.logprobs, scores.topk, scores.bpb
    greedy_ids = [out[r] for r in greedy_rows]
    greedy_text = [_text(tok, row, model.eos_token_ids) for row in greedy_ids]
    n = settings.mmd_samples
    sample_ids = [[out[r] for r in sample_rows[j * n:(j + 1) * n]] for j in range(len(sample_rows) // n)]
    sample_text = [[_text(tok, row, model.eos_token_ids) for row in rows_j] for rows_j in sample_ids]
    pieces, special = vocabulary(tok)
    return ModelOutputs(
        path=str(model.path), model_type=str(getattr(model.config, "model_type", "?")),
        logits_size=int(logprobs[0].shape[-1]), vocab_hash=vocab_hash(pieces), is_moe=tele is not None, prompt_ids=ids,
        logprobs=logprobs, topk_ids=topk, bpb=bpb, greedy_ids=greedy_ids, greedy_text=greedy_text,
        sample_ids=sample_ids, sample_text=sample_text, routing=routing, timings=timings,
        vocab_pieces=pieces, special_ids=special,
        sample_dtype=str(options["sample_dtype"]).removeprefix("torch.") if sample_rows else None,
    )


class _Scores:
    """Token-level records of each prompt from its float32 logits: log-softmax (kept as float16),
    top-k ids and bits per byte."""

    def __init__(self, prompts: Sequence[Prompt], ids: list[list[int]], k: int):
        self.prompts, self.ids, self.k = prompts, ids, k
        self.logprobs: list[Any] = [None] * len(ids)
        self.topk: list[Any] = [None] * len(ids)
        self.bpb: list[float | None] = [None] * len(ids)
        self.done_at = time.perf_counter()

    def add(self, i: int, logits_LV: Any) -> None:
        import torch

        from modelkin.runtime.api import score_logprobs

        lp = logits_LV.float().log_softmax(dim=-1)
        self.topk[i] = lp.topk(min(self.k, lp.shape[-1]), dim=-1).indices.to(torch.int32).cpu()
        if len(self.ids[i]) >= 2:
            self.bpb[i] = score_logprobs(lp, self.ids[i], self.prompts[i].prompt).bits_per_byte
        self.logprobs[i] = lp.to(torch.float16).cpu()
        self.done_at = time.perf_counter()


def _continuations(ids: list[list[int]], settings: BehaviourSettings,
                   seed: int) -> tuple[list[Any], list[int], list[int]]:
    """The rows to decode: a greedy one per prompt, then ``mmd_samples`` sampled ones for each of the
    first ``mmd_prompts`` prompts; returns (rows, greedy row indices, sample row indices).

    A sampled row's tokens are drawn with its own uniforms, taken from a ``seed`` generator in
    row order, so they do not depend on how rows are batched.
    """
    import torch

    from modelkin.runtime.continuations import Continuation

    rows = []
    if settings.wants("greedy"):
        rows += [Continuation(prompt=i, max_new_tokens=settings.greedy_tokens) for i in range(len(ids))]
    greedy_rows = list(range(len(rows)))
    chosen = min(settings.mmd_prompts, len(ids)) if settings.wants("mmd") else 0
    count = chosen * settings.mmd_samples
    u = torch.rand(count, settings.mmd_tokens, generator=torch.Generator().manual_seed(seed))
    for r in range(count):
        rows.append(Continuation(prompt=r // settings.mmd_samples, max_new_tokens=settings.mmd_tokens,
                                 temperature=settings.temperature, uniforms=u[r]))
    return rows, greedy_rows, list(range(len(greedy_rows), len(rows)))


def _sample_options(model: Any, settings: BehaviourSettings) -> dict[str, Any]:
    """prefill_decode's dtype for sampled rows (see BehaviourSettings.sample_dtype)."""
    import torch

    want = settings.sample_dtype
    if want == "auto":
        want = "bfloat16" if native_bfloat16(model.device) else "model"
    return {"sample_dtype": torch.bfloat16 if want == "bfloat16" else model.dtype}


def native_bfloat16(device: Any) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (CPU flags avx512_bf16/amx_bf16 or ARM bf16;
    CUDA compute capability >= 8)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def _text(tok: Any, tokens: list[int], eos_ids: set[int]) -> str:
    """The text of generated ``tokens`` (an ending EOS id excluded), decoded once."""
    return tok.decode(tokens[:-1] if tokens and tokens[-1] in eos_ids else tokens)


def _telemetry(model: Any) -> Any | None:
    """The model's RoutingTelemetry (MoE models), or None for dense models."""
    return getattr(model, "routing_telemetry", None)


def _empty_device_cache(backend: Any) -> None:
    fn = getattr(backend, "empty_cache", None)
    if callable(fn):
        fn()
