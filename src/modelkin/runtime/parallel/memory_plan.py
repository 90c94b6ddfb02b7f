"""Memory planning before loading: weights, KV cache, activations and the load buffer per device for a
tp × ep layout, against the device's free memory (or --memory-limit / MODELKIN_MEMORY_LIMIT).
What is exact and what is estimated: `RankPlan`."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import torch

from modelkin.errors import DeviceError, InputError
from modelkin.runtime.parallel.layout import Layout
from modelkin.runtime.parallel.shard import Shard, build
from modelkin.utils import human_bytes

MEMORY_LIMIT_ENV = "MODELKIN_MEMORY_LIMIT"
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'4GB', '512MiB', '1.5e9' or '4096' -> bytes.

    Raises:
        InputError: not a size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in _UNITS:
        raise InputError(f"cannot read {text!r} as a memory size", hint="write e.g. 4GB, 512MiB or 1e9")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclasses.dataclass(frozen=True, slots=True)
class RankPlan:
    """Bytes one rank needs.

    Weights are exact (parameters of the rank's meta-built model at the target dtype). The KV cache
    is exact for the requested batch and length. Activations are a rough upper estimate of one
    layer's transient tensors at prefill (layers run one at a time): the residual stream and its
    copies, q/k/v, the attention scores as if materialised in fp32, the MLP or the local experts'
    hidden states, and the fp32 logits of the last position. The load buffer is the largest tensor
    read at once (whole for formats that cannot read slices: GGUF, .bin).
    """

    rank: int
    weights: int
    kv_cache: int
    activations: int
    load_buffer: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.load_buffer


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MemoryPlan:
    """Per-rank needs, what is available, and whether it fits.

    On CPU every rank of one host shares its memory, so the sum over ranks is what must fit; on
    an accelerator each rank has its own device and the largest rank must fit.
    """

    model: str
    device: str
    dtype: str
    tp: int
    ep: int
    batch_size: int
    max_len: int
    ranks: list[RankPlan]
    available: int | None
    available_from: str  # "--memory-limit", "MODELKIN_MEMORY_LIMIT", "free device memory", "unknown"
    shared_host: bool

    @property
    def need(self) -> int:
        totals = [r.total for r in self.ranks]
        return sum(totals) if self.shared_host else max(totals)

    @property
    def fits(self) -> bool:
        return self.available is None or self.need <= self.available

    def to_json(self) -> dict[str, Any]:
        out = {
            k: getattr(self, k)
            for k in (
                "model",
                "device",
                "dtype",
                "tp",
                "ep",
                "batch_size",
                "max_len",
                "available",
                "available_from",
                "shared_host",
            )
        }
        out["ranks"] = [{**dataclasses.asdict(r), "total": r.total} for r in self.ranks]
        out.update(need=self.need, fits=self.fits)
        return out

    def render(self) -> str:
        """A small text table of the plan (what `modelkin run --dry-run` prints)."""
        head = (
            f"memory plan for {self.model}: {self.device} {self.dtype}, tp={self.tp} ep={self.ep}, "
            f"batch {self.batch_size} × {self.max_len} tokens"
        )
        rows = [
            (
                f"{'rank':>4}  {'weights':>10}  {'kv cache':>10}  {'activations':>11}  "
                f"{'load buf':>10}  {'total':>10}"
            )
        ]
        for r in self.ranks:
            rows.append(
                f"{r.rank:>4}  {human_bytes(r.weights):>10}  {human_bytes(r.kv_cache):>10}  "
                f"{human_bytes(r.activations):>11}  {human_bytes(r.load_buffer):>10}  "
                f"{human_bytes(r.total):>10}"
            )
        scope = "all ranks on this host" if self.shared_host else "largest rank, per device"
        verdict = "fits" if self.fits else "does NOT fit"
        tail = (
            f"need {human_bytes(self.need)} ({scope}); available {human_bytes(self.available)} "
            f"({self.available_from}): {verdict}"
        )
        return "\n".join([head, *rows, tail])


def plan_memory(
    source: Any,
    *,
    backend: Any,
    dtype: torch.dtype,
    tp: int = 1,
    ep: int = 1,
    batch_size: int = 1,
    max_len: int | None = None,
    prompt_len: int | None = None,
    memory_limit: int | str | None = None,
    available: tuple[int | None, str] | None = None,
) -> MemoryPlan:
    """Plan a run of the checkpoint behind ``source`` from one process: every rank's model is built
    on the meta device here, and no tensor data is read.

    Args:
        source: an open TensorSource.
        backend: the Backend (device family) the ranks run on; its free memory is the default budget.
        dtype: the dtype the weights will have.
        tp, ep: tensor- and expert-parallel degrees.
        max_len: KV cache length per sequence (default: the model's context).
        prompt_len: tokens of the prefill (default: ``max_len``).
        memory_limit: bytes (or '4GB') per device; default $MODELKIN_MEMORY_LIMIT, then free memory.
        available: (bytes, where from) measured by the caller; overrides ``memory_limit``.

    Raises:
        ConfigError, UnsupportedArchitectureError: the layout cannot split this model.
    """
    shards = [build(source, layout) for layout in Layout(tp, ep).ranks()]
    lengths = {"batch_size": batch_size, "max_len": max_len, "prompt_len": prompt_len}
    ranks = [rank_plan(source, s, dtype=dtype, **lengths) for s in shards]
    available = available or available_memory(backend, memory_limit)
    return _memory_plan(source, shards[0], ranks, backend, dtype, batch_size, max_len, available)


def plan_shard(
    source: Any,
    shard: Shard,
    *,
    backend: Any,
    dtype: torch.dtype,
    batch_size: int = 1,
    max_len: int | None = None,
    prompt_len: int | None = None,
    memory_limit: int | str | None = None,
    gather: Callable[[Any], list[Any]] | None = None,
) -> MemoryPlan:
    """Plan a run in which every rank has built its own ``shard`` (to load it next): each rank plans
    itself, and ``gather`` (a DistContext's ``all_gather_object``; None for one process) shares the
    RankPlans and the free memory every rank sees, so that all ranks take the same decision (the
    smallest free memory counts). Arguments as `plan_memory`.
    """
    lengths = {"batch_size": batch_size, "max_len": max_len, "prompt_len": prompt_len}
    mine = rank_plan(source, shard, dtype=dtype, **lengths)
    seen = [(mine, available_memory(backend, memory_limit))]
    if gather is not None:
        seen = gather(seen[0])
    known = [a for _, a in seen if a[0] is not None]
    available = min(known) if known else (None, "unknown")
    return _memory_plan(source, shard, [r for r, _ in seen], backend, dtype, batch_size, max_len, available)


def _memory_plan(
    source: Any,
    shard: Shard,
    ranks: list[RankPlan],
    backend: Any,
    dtype: torch.dtype,
    batch_size: int,
    max_len: int | None,
    available: tuple[int | None, str],
) -> MemoryPlan:
    return MemoryPlan(
        model=str(source.path),
        device=backend.name,
        dtype=str(dtype).removeprefix("torch."),
        tp=shard.layout.tp,
        ep=shard.layout.ep,
        batch_size=batch_size,
        max_len=_kv_length(shard, max_len),
        ranks=ranks,
        available=available[0],
        available_from=available[1],
        shared_host=backend.name == "cpu",
    )


def _kv_length(shard: Shard, max_len: int | None) -> int:
    context = shard.module.args.max_position_embeddings
    return min(max_len or context, context)


def available_memory(backend: Any, memory_limit: int | str | None = None) -> tuple[int | None, str]:
    """(bytes, where from): --memory-limit, else $MODELKIN_MEMORY_LIMIT, else the free memory."""
    if memory_limit is not None:
        return (
            parse_bytes(memory_limit) if isinstance(memory_limit, str) else int(memory_limit),
            "--memory-limit",
        )
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env:
        return parse_bytes(env), MEMORY_LIMIT_ENV
    free = backend.memory_info().get("free")
    return (int(free), "free device memory") if free is not None else (None, "unknown")


def rank_plan(
    source: Any,
    shard: Shard,
    *,
    dtype: torch.dtype,
    batch_size: int = 1,
    max_len: int | None = None,
    prompt_len: int | None = None,
) -> RankPlan:
    """The bytes ``shard`` needs on its device (see RankPlan), from its meta-built model."""
    from modelkin.runtime.layers import Attention

    model = shard.module
    length = _kv_length(shard, max_len)
    prompt = min(prompt_len or length, length)
    size = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    kv = sum(2 * a.num_kv_heads * a.head_dim for a in attns) * length * batch_size * size
    act = _activations(model, attns, batch_size, prompt, length, size)
    return RankPlan(shard.layout.rank, weights, kv, act, _load_buffer(source, model, shard.cuts, size))


def _activations(model: torch.nn.Module, attns: list, batch: int, prompt: int, length: int, size: int) -> int:
    """Rough peak of one layer's transients at prefill (see the module docstring)."""
    from modelkin.runtime.moe.experts import StackedExperts

    args = model.args
    tokens = batch * prompt
    hidden = 6 * tokens * args.hidden_size * size  # residual, normed input, attention/MLP outputs
    attn = 0
    if attns:
        a = max(attns, key=lambda m: m.num_heads)
        attn = tokens * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim * size * 2  # q/k/v + rotary
        attn += batch * a.num_heads * prompt * length * 4  # scores, if materialised in fp32
    widths = [
        m.out_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(("gate_proj", "up_proj"))
    ]
    mlp = 3 * tokens * max(widths, default=0) * size
    for experts in (m for m in model.modules() if isinstance(m, StackedExperts)):
        pairs = tokens * min(args.num_experts_per_tok, experts.num_experts)
        mlp = max(mlp, pairs * (3 * experts.hidden + 2 * experts.dim) * size)
    logits = 2 * batch * args.vocab_size * 4
    return hidden + attn + mlp + logits


def _load_buffer(source: Any, model: torch.nn.Module, plan: dict, size: int) -> int:
    """The largest tensor in flight while loading, as read (stored dtype, float32 when dequantised):
    a whole checkpoint tensor for formats without slice reads, else this rank's largest slice."""
    infos = [source.info(name) for name in source]
    if source.format != "safetensors" or not plan:
        return max((i.numel * i.torch_dtype.itemsize for i in infos), default=0)
    itemsize = max((i.torch_dtype.itemsize for i in infos), default=size)
    return max((p.numel() for p in model.parameters()), default=0) * itemsize


def fitting_tp(
    source: Any,
    *,
    backend: Any,
    dtype: torch.dtype,
    ep: int,
    batch_size: int,
    max_len: int | None,
    prompt_len: int | None,
    available: int,
    max_tp: int = 64,
) -> int | None:
    """The smallest --tp (with this --ep) whose plan fits ``available`` per device, or None."""
    from modelkin.errors import ConfigError

    for tp in range(1, max_tp + 1):
        try:
            plan = plan_memory(
                source,
                backend=backend,
                dtype=dtype,
                tp=tp,
                ep=ep,
                batch_size=batch_size,
                max_len=max_len,
                prompt_len=prompt_len,
                memory_limit=available,
            )
        except ConfigError:
            break  # more ranks than KV heads: larger tp cannot work either
        if plan.fits:
            return tp
    return None


def refuse(plan: MemoryPlan, *, suggestion: int | None) -> DeviceError:
    """The one-line error for a plan that does not fit, naming what would."""
    what = f"{plan.model} needs {human_bytes(plan.need)} "
    what += "on this host" if plan.shared_host else "per device"
    what += f" (tp={plan.tp}, ep={plan.ep}, {plan.dtype}) but {human_bytes(plan.available)} is available"
    if plan.shared_host:
        hint = (
            "on CPU every rank shares the host's memory, so --tp does not help: free memory, "
            "use --dtype bfloat16, or lower --max-new-tokens"
        )
    elif suggestion is not None:
        hint = (
            f"run with --tp {suggestion} (torchrun --nproc_per_node {suggestion * plan.ep} "
            f"-m modelkin run … --tp {suggestion}" + (f" --ep {plan.ep}" if plan.ep > 1 else "") + ")"
        )
    else:
        hint = "no --tp fits: use more devices with --ep (MoE), a smaller dtype, or a shorter context"
    return DeviceError(f"{what}: refusing to load", hint=hint)
