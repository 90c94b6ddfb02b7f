"""The process groups and collectives of a multi-device run on torch.distributed (gloo on CPU, nccl on
CUDA, hccl on Ascend). Launch with ``torchrun --nproc_per_node N -m modelkin …``."""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable
from typing import Any

import torch

from modelkin.runtime.parallel.layout import Layout, resolve_degrees

Reduce = Callable[[torch.Tensor], torch.Tensor]  # in-place sum over a group; returns its argument


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


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by a distributed launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1
