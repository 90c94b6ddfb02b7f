"""Multi-device runs on torch.distributed: the tp × ep layout of ranks, how sizes split across them,
and the process groups and collectives (gloo on CPU, nccl on CUDA, hccl on Ascend) a run uses.

Ranks are numbered ``rank = ep_rank * tp + tp_rank``: the tp ranks of one tensor-parallel group are
consecutive (one node's fast links). Launch with ``torchrun --nproc_per_node N -m modelkin …``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable
from typing import Any

import torch

from modelkin.errors import ConfigError, InputError

Reduce = Callable[[torch.Tensor], torch.Tensor]  # in-place sum over a group; returns its argument


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Where one rank sits in a tp × ep grid (pure numbers: planning needs no process group).

    Attributes:
        tp: tensor-parallel degree (attention heads, MLP neurons, expert neurons split tp ways).
        ep: expert-parallel degree (routed experts, whole MoGE groups, split ep ways).
        rank: this process's global rank, in [0, tp * ep).
    """

    tp: int = 1
    ep: int = 1
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.tp * self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tp

    def ranks(self) -> list[Layout]:
        """The layout of every rank of the grid (for planning all of them from one process)."""
        return [dataclasses.replace(self, rank=r) for r in range(self.world_size)]


def check_degrees(tp: int, ep: int) -> None:
    """Raise InputError for a tp or ep below 1."""
    for name, value in (("--tp", tp), ("--ep", ep)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} {value} must be a positive integer", hint=f"pass {name} 1 or more")


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``total`` items split into ``parts`` balanced runs.

    The first ``total % parts`` parts get one item more (9 heads over 2 ranks: 5 and 4).
    """
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def head_ranges(num_heads: int, num_kv_heads: int, parts: int, index: int) -> tuple[range, range]:
    """(query heads, kv heads) of one tensor-parallel rank: KV heads split as evenly as they go,
    and every query head stays with its KV head (GQA groups are never cut).

    SmolLM2 (9 query, 3 KV heads) over 2 ranks: rank 0 holds KV 0-1 with query heads 0-5,
    rank 1 holds KV 2 with query heads 6-8.

    Raises:
        ConfigError: more ranks than KV heads (a rank would hold no attention head).
    """
    if parts > num_kv_heads:
        raise ConfigError(
            f"--tp {parts} exceeds the model's {num_kv_heads} key/value heads: every tensor-parallel "
            "rank needs at least one KV head",
            hint=f"use --tp {num_kv_heads} or less (add --ep for MoE models)",
        )
    group = num_heads // num_kv_heads
    k0, k1 = split_range(num_kv_heads, parts, index)
    return range(k0 * group, k1 * group), range(k0, k1)


def expert_range(num_experts: int, num_groups: int | None, parts: int, index: int) -> tuple[int, int]:
    """[first, stop) of the routed experts one expert-parallel rank holds.

    MoGE (``num_groups`` given): whole groups per rank, so every rank serves exactly
    ``num_groups / parts`` experts per token (balanced by construction). Other routers: experts
    split into balanced contiguous runs.

    Raises:
        ConfigError: more ranks than experts, or MoGE groups that do not divide by ``parts``.
    """
    if num_groups is not None:
        if num_groups % parts:
            raise ConfigError(
                f"--ep {parts} does not divide the {num_groups} MoGE expert groups: each rank must "
                "hold whole groups",
                hint="use an --ep that divides " + str(num_groups),
            )
        per_group = num_experts // num_groups
        g0, g1 = split_range(num_groups, parts, index)
        return g0 * per_group, g1 * per_group
    if parts > num_experts:
        raise ConfigError(
            f"--ep {parts} exceeds the model's {num_experts} experts",
            hint=f"use --ep {num_experts} or less",
        )
    return split_range(num_experts, parts, index)


# -- process groups --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DistContext:
    """A started process group and what this rank does in it.

    Attributes:
        layout: tp, ep and this rank.
        backend: the modelkin Backend of this rank's device (cuda:LOCAL_RANK, npu:LOCAL_RANK, cpu).
        tp_group / world_group: torch process groups (None when the degree is 1).
        object_group: a gloo group for Python-object collectives (results, seeds) on any device.
    """

    layout: Layout
    backend: Any
    tp_group: Any = None
    world_group: Any = None
    object_group: Any = None

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def is_main(self) -> bool:
        return self.layout.rank == 0

    def reduce_tp(self) -> Reduce | None:
        """Sum over this rank's tensor-parallel group (None when tp == 1)."""
        return None if self.layout.tp == 1 else _all_reduce(self.tp_group)

    def reduce_world(self) -> Reduce | None:
        """Sum over every rank (None for one process): the MoE combine."""
        return None if self.layout.world_size == 1 else _all_reduce(self.world_group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch.distributed as dist

        if self.layout.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.layout.world_size
        dist.all_gather_object(out, obj, group=self.object_group)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        if self.layout.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.object_group)
        return box[0]


def _all_reduce(group: Any) -> Reduce:
    import torch.distributed as dist

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)
        return t

    return reduce


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by a distributed launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_degrees(tp: int | None, ep: int | None, world_size: int) -> tuple[int, int]:
    """The (tp, ep) for a run of ``world_size`` processes; an unset one takes what is left.

    Raises:
        InputError: tp × ep differs from the number of processes launched.
    """
    if tp is None and ep is None:
        tp, ep = world_size, 1
    elif tp is None:
        tp = max(world_size // ep, 1)
    elif ep is None:
        ep = max(world_size // tp, 1)
    check_degrees(tp, ep)
    if tp * ep != world_size:
        launch = f"torchrun --nproc_per_node {tp * ep} -m modelkin …"
        raise InputError(
            f"--tp {tp} × --ep {ep} needs {tp * ep} processes, but {world_size} were launched",
            hint=f"launch with `{launch}`" if tp * ep > 1 else "run without torchrun, or set --tp/--ep",
        )
    return tp, ep


def init_distributed(
    backend: Any, *, tp: int | None = None, ep: int | None = None, timeout_s: float = 1800.0
) -> DistContext:
    """Join (or reuse) the torchrun process group and build the tp/ep groups.

    ``backend`` is the Backend the user asked for; its ``dist_backend`` picks gloo/nccl/hccl, and
    accelerators run one device per local rank (cuda:LOCAL_RANK, npu:LOCAL_RANK).

    Raises:
        InputError: tp × ep does not match the launch (or tp/ep > 1 without torchrun).
        DeviceError: the local rank's device is unavailable.
    """
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_initialized() else launched_world_size()
    tp, ep = resolve_degrees(tp, ep, world_size)
    if world_size == 1:
        return DistContext(Layout(tp, ep, 0), backend)
    backend = _local_backend(backend)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if backend.dist_backend == "nccl":
            kwargs["device_id"] = backend.device
        dist.init_process_group(backend=backend.dist_backend, **kwargs)
    rank = dist.get_rank()
    layout = Layout(tp, ep, rank)
    tp_group = dist.group.WORLD
    if tp > 1 and ep > 1:
        for e in range(ep):  # every rank takes part in creating every group
            group = dist.new_group(list(range(e * tp, (e + 1) * tp)))
            if e == layout.ep_rank:
                tp_group = group
    object_group = dist.group.WORLD
    if backend.dist_backend != "gloo":
        object_group = dist.new_group(backend="gloo")
    return DistContext(layout, backend, tp_group, dist.group.WORLD, object_group)


def _local_backend(backend: Any) -> Any:
    """On accelerators, the device of this local rank, made current."""
    if backend.name == "cpu":
        return backend
    from modelkin.backends import get_backend

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local = get_backend(f"{backend.name}:{local_rank}", allow_fallback=False)
    getattr(torch, backend.name).set_device(local.device)
    return local


def shutdown() -> None:
    """Leave the process group (if one was started)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
