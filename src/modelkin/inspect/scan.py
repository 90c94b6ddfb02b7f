"""Stream a checkpoint's tensors to the device, one at a time, and compute their statistics.

Reading runs one tensor (or a few raw pieces) ahead in a background thread; finished tensors go to a
resumable cache, so an interrupted scan continues where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from modelkin.checkpoint import TensorSource, open_checkpoint
from modelkin.errors import ModelkinError
from modelkin.inspect.cache import ScanCache
from modelkin.inspect.reader import Piece, Prefetcher, safetensors_locations
from modelkin.inspect.report import InspectionResult, TensorStats, moe_summary
from modelkin.inspect.roles import UNKNOWN, NameRole, classify, selector
from modelkin.inspect.spectral import (
    SpectralOptions,
    default_options,
    sampled_experts,
    spectral_stats,
    wants_spectral,
)
from modelkin.inspect.stats import ParallelAccumulator, cpu_threads, inspect_threads, policy_for


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanOptions:
    """What to compute: --select, --spectral, --sample-experts, cache and progress display."""

    select: str = "all"
    spectral: bool = False
    sample_experts: int | None = None
    cache: bool = True
    progress: bool | None = None  # None: only when stderr is a terminal


def inspect_checkpoint(path: str | os.PathLike, device: Any = "auto", select: str = "all",
                       spectral: bool = False, *, sample_experts: int | None = None,
                       cache: bool = True, progress: bool | None = None,
                       allow_fallback: bool | None = None) -> InspectionResult:
    """Statistics of every selected tensor of a checkpoint, computed on the device.

    Args:
        path: HF directory (safetensors / .bin, sharded or not), .gguf, .bin or .onnx file.
        device: "auto", "cpu", "cuda[:i]", "npu[:i]" or a Backend.
        select: "all", "attention", "mlp", "experts" (comma-joinable) or a regex on names.
        spectral: also compute singular-value statistics of weight matrices.
        sample_experts: spectral statistics for only this many experts per MoE layer.
        cache: reuse and update the resumable cache ($MODELKIN_CACHE_DIR or ~/.cache/modelkin).
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        InspectionResult with .tensors, .totals, .to_json(), .to_csv(), .summary().

    Raises:
        CheckpointError, DeviceError, InputError: unreadable checkpoint, device, bad --select.

    Example:
        >>> res = modelkin.inspect_checkpoint("SmolLM2.gguf", select="attention")
        >>> res.tensors[0].stats["std_population"]
    """
    from modelkin.backends import get_backend

    backend = get_backend(device, allow_fallback=allow_fallback)
    options = ScanOptions(select=select, spectral=spectral, sample_experts=sample_experts,
                          cache=cache, progress=progress)
    with open_checkpoint(path) as src:
        return scan(src, backend.device, options)


def _config(src: TensorSource) -> dict[str, Any]:
    try:
        return src.config() or {}
    except (ModelkinError, OSError, ValueError):
        return {}


def _spectral_plan(names: list[str], roles: dict[str, NameRole], shapes: dict[str, tuple],
                   options: ScanOptions) -> dict[str, set[int] | None]:
    """name -> None (whole matrix) or the expert slices of a stacked tensor, for spectral stats."""
    if not options.spectral:
        return {}
    per_layer: dict[Any, set[int]] = defaultdict(set)
    for n in names:
        if roles[n].expert is not None:
            per_layer[roles[n].layer].add(roles[n].expert)
    plan: dict[str, set[int] | None] = {}
    for n in names:
        role, shape = roles[n], shapes[n]
        if not wants_spectral(role.role, shape):
            continue
        if len(shape) == 3:
            plan[n] = sampled_experts(shape[0], options.sample_experts)
        elif role.expert is None:
            plan[n] = None
        else:
            pool = sorted(per_layer[role.layer])
            picked = sampled_experts(len(pool), options.sample_experts)
            if pool.index(role.expert) in picked:
                plan[n] = None
    return plan


def _spectral_of(tensor: torch.Tensor, experts: set[int] | None,
                 sp_options: SpectralOptions) -> dict[str, Any]:
    if tensor.dim() == 3:
        return {"experts": {str(e): spectral_stats(tensor[e], sp_options) for e in sorted(experts)}}
    return spectral_stats(tensor.reshape(tensor.shape[0], -1), sp_options)


def scan(src: TensorSource, device: torch.device | str, options: ScanOptions, *,
         shard: Any = None) -> InspectionResult:
    """Inspect an open TensorSource on ``device`` (see inspect_checkpoint).

    ``shard`` (inspect/sharded.py, under torchrun) splits the tensors to read across ranks and
    gathers every rank's per-tensor results, so each rank returns the whole, identical result.
    """
    device = torch.device(device)
    all_names = src.keys()
    aliases = _aliases(src)
    roles = {n: classify(aliases.get(n, n)) for n in all_names}
    shapes = {n: tuple(src.info(n).shape) for n in all_names}
    pick = selector(options.select)
    names = [n for n in all_names if pick(n, roles[n])]
    plan = _spectral_plan(names, roles, shapes, options)
    sp_options = default_options(device)
    cache = ScanCache.open(src.files(), {"spectral": options.spectral,
                                         "sample_experts": options.sample_experts},
                           enabled=options.cache)
    todo = [n for n in names if not _cached_ok(cache.get(n), n in plan)]
    raw = {n: loc for n, loc in safetensors_locations(src).items() if n not in plan}
    start_bytes, t0 = src.bytes_read, time.perf_counter()
    if shard is None:
        _compute(src, todo, raw, plan, device, cache, sp_options, options)
        bytes_read = src.bytes_read - start_bytes
    else:
        todo, mine = shard.split(todo, [src.info(n).nbytes for n in todo])
        _compute(src, mine, raw, plan, device, cache, sp_options, options)
        have = {n: cache.get(n) for n in names if cache.get(n) is not None}
        merged, bytes_read = shard.gather(have, src.bytes_read - start_bytes)
        cache.put_many(merged)
    cache.flush()
    seconds = time.perf_counter() - t0
    tensors = [_record(n, roles[n], src.info(n), cache.get(n)) for n in names]
    infos = [(n, roles[n], shapes[n]) for n in all_names]
    totals = {
        "bytes_read": bytes_read, "seconds": seconds,
        "gb_per_s": bytes_read / seconds / 1e9 if seconds > 0 else 0.0,
        "device": str(device), "tensors": len(tensors),
        "tensors_read": len(todo), "tensors_from_cache": len(names) - len(todo),
        "params_selected": sum(t.numel for t in tensors),
        "params_total": sum(src.info(n).numel for n in all_names),
        "unknown_roles": sum(roles[n].role == UNKNOWN for n in names),
        "moe": moe_summary(infos, _config(src), tensors),
    }
    unknown = [n for n in names if roles[n].role == UNKNOWN]
    return InspectionResult(str(src.path), src.format, options.select, tensors, totals, unknown)


def _aliases(src: TensorSource) -> dict[str, str]:
    """ONNX: canonical names of anonymous initialisers, from the graph (see roles.onnx_aliases)."""
    if src.format != "onnx" or not src.files():
        return {}
    from modelkin.inspect.roles import onnx_aliases

    try:
        return onnx_aliases(str(src.files()[0]))
    except Exception:  # noqa: BLE001 - roles are a convenience; the names are still reported
        return {}


def _cached_ok(entry: dict[str, Any] | None, need_spectral: bool) -> bool:
    return entry is not None and "stats" in entry and (not need_spectral or "spectral" in entry)


def _record(name: str, role: NameRole, info: Any, entry: dict[str, Any]) -> TensorStats:
    return TensorStats(name, role.role, role.layer, role.expert, tuple(info.shape), info.dtype,
                       info.numel, entry["stats"], entry.get("spectral"))


def _compute(src: TensorSource, todo: list[str], raw: dict, plan: dict, device: torch.device,
             cache: ScanCache, sp_options: SpectralOptions, options: ScanOptions) -> None:
    """Read `todo` in order (prefetched), compute on `device`, store each result in `cache`."""
    cpu = device.type == "cpu"
    acc = ParallelAccumulator(policy_for(device), inspect_threads() if cpu else 1)
    stop_after = int(os.environ.get("MODELKIN_TEST_STOP_AFTER", "0") or 0)
    total = sum(src.info(n).nbytes for n in todo)
    bar = _progress(options.progress, total)
    done = 0
    with cpu_threads(1 if cpu else torch.get_num_threads()), contextlib.ExitStack() as stack:
        stack.callback(acc.close)
        if bar is not None:
            stack.callback(bar[0].stop)
        for piece in Prefetcher(src, todo, raw, pin=device.type == "cuda"):
            on_device = _to_device(piece, device)
            acc.update(on_device)
            piece.release()
            if bar is not None:
                bar[0].advance(bar[1], piece.nbytes)
            if not piece.last:
                continue
            entry: dict[str, Any] = {"stats": acc.result()}
            if piece.name in plan:
                entry["spectral"] = _spectral_of(on_device, plan[piece.name], sp_options)
            acc.reset()
            cache.put(piece.name, entry)
            done += 1
            if stop_after and done >= stop_after:
                os._exit(75)  # test hook: die like a killed process, without flushing


def _to_device(piece: Piece, device: torch.device) -> torch.Tensor:
    data = piece.data
    if data.device == device:
        return data
    return data.to(device, non_blocking=piece.pool is not None and device.type == "cuda")


def _progress(enabled: bool | None, total: int):
    """A started rich progress bar with bytes and GB/s on stderr, or None."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress("inspect", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("inspect", total=total)
    bar.start()
    return bar, task
