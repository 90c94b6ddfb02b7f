"""--tp / --ep / --dry-run / --memory-limit for `modelkin run`: start the torchrun process group,
plan memory before any weight is read (print it, or refuse when it cannot fit), load the shard."""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import sys
from typing import Any

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


@dataclasses.dataclass(slots=True)
class Setup:
    """What `prepare` decided: the process group (None for one process) and the rank's role."""

    ctx: Any = None
    started: bool = False  # this call started the process group, so it ends it

    def close(self) -> None:
        if self.started:
            from modelkin.runtime.parallel import shutdown

            shutdown()

    @property
    def is_main(self) -> bool:
        return self.ctx is None or self.ctx.is_main

    def describe(self) -> dict[str, int] | None:
        """tp, ep and world size for the --json report (None for one process)."""
        if self.ctx is None:
            return None
        layout = self.ctx.layout
        return {"tp": layout.tp, "ep": layout.ep, "world_size": layout.world_size}

    def load(self, args: argparse.Namespace) -> Any:
        from modelkin.runtime.parallel_load import load_parallel

        return load_parallel(args.model, self.ctx, dtype=args.dtype)


def prepare(args: argparse.Namespace) -> Setup | None:
    """Start distributed (when launched by torchrun or asked for tp/ep > 1), check the memory plan.

    Returns None after --dry-run (the plan was printed). Non-main ranks lose --json; the caller
    silences their output.

    Raises:
        InputError: tp × ep differs from the processes launched, or a bad --memory-limit.
        DeviceError: the plan does not fit (the plan is printed first, by rank 0).
    """
    from modelkin.runtime.parallel import (
        check_degrees,
        init_distributed,
        launched_world_size,
        resolve_degrees,
    )

    if args.engine != "torch":
        if launched_world_size() > 1 or (args.tp or 1) * (args.ep or 1) > 1:
            raise InputError(
                f"--engine {args.engine} runs on one process; --tp/--ep need the torch engine",
                hint="drop --engine, or run without torchrun",
            )
        return Setup()
    backend = common.backend_from_args(args)
    if args.dry_run:
        if "WORLD_SIZE" in os.environ:  # under torchrun: plan the launched layout
            tp, ep = resolve_degrees(args.tp, args.ep, launched_world_size())
        else:
            tp, ep = args.tp or 1, args.ep or 1
            check_degrees(tp, ep)
        if int(os.environ.get("RANK", "0")) == 0:
            plan = _plan(args, backend, tp, ep, None)
            _show(args, plan)
            common.emit_json(args, {"memory_plan": plan.to_json()})
        return None
    import torch.distributed as dist

    started = not dist.is_initialized()
    ctx = init_distributed(backend, tp=args.tp, ep=args.ep)
    distributed = ctx.layout.world_size > 1
    started = started and distributed
    available = _agreed_available(ctx, args) if distributed else None
    plan = _plan(args, ctx.backend, ctx.layout.tp, ctx.layout.ep, available)
    if not plan.fits:
        try:
            _refuse(args, ctx, plan)
        finally:
            Setup(ctx, started).close()
    if not distributed:
        return Setup()
    if args.temperature > 0 and args.seed is None:  # every rank must draw the same tokens
        args.seed = ctx.broadcast_object(secrets.randbits(31))
    if not ctx.is_main:
        args.json = None
    return Setup(ctx, started)


def _agreed_available(ctx: Any, args: argparse.Namespace) -> tuple[int | None, str]:
    """Every rank must take the same decision: the smallest free memory any rank sees."""
    from modelkin.runtime.memory_plan import available_memory

    seen = ctx.all_gather_object(available_memory(ctx.backend, args.memory_limit))
    known = [s for s in seen if s[0] is not None]
    return min(known) if known else (None, "unknown")


def _plan(
    args: argparse.Namespace, backend: Any, tp: int, ep: int, available: tuple[int | None, str] | None
) -> Any:
    from modelkin.checkpoint import open_checkpoint
    from modelkin.runtime.memory_plan import plan_memory

    prompt_len = _prompt_len(args)
    with open_checkpoint(args.model) as source:
        return plan_memory(
            source,
            backend=backend,
            dtype=backend.resolve_dtype(args.dtype),
            tp=tp,
            ep=ep,
            max_len=prompt_len + args.max_new_tokens,
            prompt_len=prompt_len,
            memory_limit=args.memory_limit,
            available=available,
        )


def _prompt_len(args: argparse.Namespace) -> int:
    """An upper bound of the prompt's tokens without loading the tokenizer: its UTF-8 bytes plus
    room for special and chat-template tokens."""
    return len((args.prompt or "").encode("utf-8")) + (256 if args.chat else 8)


def _show(args: argparse.Namespace, plan: Any) -> None:
    out = sys.stderr if common.json_to_stdout(args) else sys.stdout
    print(plan.render(), file=out)


def _refuse(args: argparse.Namespace, ctx: Any, plan: Any) -> None:
    from modelkin.checkpoint import open_checkpoint
    from modelkin.runtime.memory_plan import fitting_tp, refuse

    suggestion = None
    if not plan.shared_host and plan.available is not None:
        with open_checkpoint(args.model) as source:
            suggestion = fitting_tp(
                source,
                backend=ctx.backend,
                dtype=ctx.backend.resolve_dtype(args.dtype),
                ep=plan.ep,
                batch_size=plan.batch_size,
                max_len=plan.max_len,
                prompt_len=_prompt_len(args),
                available=plan.available,
            )
    if ctx.is_main:
        print(plan.render(), file=sys.stderr)
        common.emit_json(args, {"memory_plan": plan.to_json()})
    raise refuse(plan, suggestion=suggestion)
