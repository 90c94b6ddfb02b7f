"""--tp / --ep / --dry-run / --memory-limit for `modelkin run`, and the plan a run makes before any
weight is read: the torchrun process group, this rank's model built on the meta device, the memory check."""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import sys
from typing import Any

import torch

from modelkin.commands import common
from modelkin.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-device (launch with torchrun --nproc_per_node N)")
    group.add_argument(
        "--tp",
        type=int,
        default=None,
        metavar="N",
        help="tensor-parallel degree (default: the number of torchrun processes)",
    )
    group.add_argument(
        "--ep",
        type=int,
        default=None,
        metavar="N",
        help="expert-parallel degree for MoE models (MoGE: whole groups per rank)",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan (weights, KV cache, activations per device) and exit",
    )
    group.add_argument(
        "--memory-limit",
        default=None,
        metavar="BYTES",
        help="memory per device to plan against, e.g. 24GB (or MODELKIN_MEMORY_LIMIT; "
        "default: the device's free memory)",
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RunPlan:
    """What `modelkin run` decided before reading any weight (`start`, then `plan`; `args` stay as parsed).

    Attributes:
        backend: this rank's Backend (cuda:LOCAL_RANK, npu:LOCAL_RANK under torchrun).
        dtype: the weights' dtype (None until `plan`).
        shard: this rank's model on the meta device, for `runtime.api.load_source` to fill.
        memory: the memory plan the run passed (None until `plan`).
        ctx: the process group of a multi-process run, else None.
        started: this run started the process group, so `close` ends it.
        seed: the sampling seed (under torchrun with sampling and no --seed: rank 0's, on every rank).
    """

    backend: Any
    dtype: torch.dtype | None
    shard: Any = None
    memory: Any = None
    ctx: Any = None
    started: bool = False
    seed: int | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes (rank 0, or the only process)."""
        return self.ctx is None or self.ctx.is_main

    def describe(self) -> dict[str, int] | None:
        """tp, ep and world size for the --json report (None for one process)."""
        if self.ctx is None:
            return None
        layout = self.ctx.layout
        return {"tp": layout.tp, "ep": layout.ep, "world_size": layout.world_size}

    def close(self) -> None:
        if self.started:
            from modelkin.runtime.parallel import shutdown

            shutdown()


def check_one_process(args: argparse.Namespace) -> None:
    """--engine onnxruntime runs on one process: refuse torchrun and --tp/--ep."""
    from modelkin.runtime.parallel import launched_world_size

    if launched_world_size() > 1 or (args.tp or 1) * (args.ep or 1) > 1:
        raise InputError(
            f"--engine {args.engine} runs on one process; --tp/--ep need the torch engine",
            hint="drop --engine, or run without torchrun",
        )


def dry_run(args: argparse.Namespace, backend: Any) -> None:
    """--dry-run: plan every rank from this process (rank 0 alone under torchrun), print, write --json."""
    from modelkin.checkpoint import open_checkpoint
    from modelkin.runtime.parallel import check_degrees, launched_world_size, resolve_degrees
    from modelkin.runtime.parallel.memory_plan import plan_memory

    if "WORLD_SIZE" in os.environ:  # under torchrun: plan the launched layout
        tp, ep = resolve_degrees(args.tp, args.ep, launched_world_size())
    else:
        tp, ep = args.tp or 1, args.ep or 1
        check_degrees(tp, ep)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    with open_checkpoint(args.model) as source:
        memory = plan_memory(
            source,
            backend=backend,
            dtype=backend.resolve_dtype(args.dtype),
            tp=tp,
            ep=ep,
            memory_limit=args.memory_limit,
            **_lengths(args),
        )
    print(memory.render(), file=sys.stderr if common.json_to_stdout(args) else sys.stdout)
    common.emit_json(args, {"memory_plan": memory.to_json()})


def start(args: argparse.Namespace, backend: Any) -> RunPlan:
    """Join the process group when launched by torchrun (or asked for tp/ep > 1); `plan` completes
    the RunPlan. The caller closes it.

    Raises:
        InputError: tp × ep differs from the processes launched.
    """
    import torch.distributed as dist

    from modelkin.runtime.parallel import init_distributed

    started = not dist.is_initialized()
    ctx = init_distributed(backend, tp=args.tp, ep=args.ep)
    distributed = ctx.layout.world_size > 1
    return RunPlan(
        backend=ctx.backend,
        dtype=None,
        ctx=ctx if distributed else None,
        started=started and distributed,
        seed=args.seed,
    )


def plan(args: argparse.Namespace, source: Any, run: RunPlan) -> RunPlan:
    """`run` completed for the open checkpoint: this rank's model built on the meta device, the
    memory plan of every rank checked, the sampling seed agreed.

    Raises:
        InputError: a bad --memory-limit or --dtype.
        DeviceError: the plan does not fit (rank 0 prints the plan and writes it to --json first).
    """
    from modelkin.runtime.parallel.memory_plan import plan_shard
    from modelkin.runtime.parallel.shard import build

    run = dataclasses.replace(run, dtype=run.backend.resolve_dtype(args.dtype))
    shard = build(source, ctx=run.ctx)
    memory = plan_shard(
        source,
        shard,
        backend=run.backend,
        dtype=run.dtype,
        memory_limit=args.memory_limit,
        gather=run.ctx.all_gather_object if run.ctx else None,
        **_lengths(args),
    )
    if not memory.fits:
        _refuse(args, source, run, memory)
    seed = run.seed
    if run.ctx is not None and args.temperature > 0 and seed is None:  # every rank draws the same tokens
        seed = run.ctx.broadcast_object(secrets.randbits(31))
    return dataclasses.replace(run, shard=shard, memory=memory, seed=seed)


def _lengths(args: argparse.Namespace) -> dict[str, int]:
    """KV length and prefill tokens to plan for. The prompt's tokens are bounded without loading the
    tokenizer: its UTF-8 bytes plus room for special and chat-template tokens."""
    prompt_len = len((args.prompt or "").encode("utf-8")) + (256 if args.chat else 8)
    return {"max_len": prompt_len + args.max_new_tokens, "prompt_len": prompt_len}


def _refuse(args: argparse.Namespace, source: Any, run: RunPlan, memory: Any) -> None:
    from modelkin.runtime.parallel.memory_plan import fitting_tp, refuse

    suggestion = None
    if not memory.shared_host and memory.available is not None:
        suggestion = fitting_tp(
            source,
            backend=run.backend,
            dtype=run.dtype,
            ep=memory.ep,
            batch_size=memory.batch_size,
            max_len=memory.max_len,
            prompt_len=_lengths(args)["prompt_len"],
            available=memory.available,
        )
    if run.is_main:
        print(memory.render(), file=sys.stderr)
        common.emit_json(args, {"memory_plan": memory.to_json()})
    raise refuse(memory, suggestion=suggestion)
