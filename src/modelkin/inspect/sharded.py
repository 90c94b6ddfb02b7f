"""Sharded inspection under torchrun: the tensors to read are split across ranks by bytes (largest
first, each to the least-loaded rank), every tensor's statistics are computed whole on one rank,
and the per-tensor results are gathered so every rank returns the single-process result.

    torchrun --nproc_per_node 4 -m modelkin inspect MODEL --json stats.json
"""

from __future__ import annotations

import heapq
from typing import Any


def balanced_owners(nbytes: list[int], parts: int) -> list[int]:
    """The rank that reads each item: largest first, each to the rank with the fewest bytes so far
    (ties to the lower rank), so the ranks' byte totals differ by at most one item."""
    owners = [0] * len(nbytes)
    loads = [(0, rank) for rank in range(parts)]
    for i in sorted(range(len(nbytes)), key=lambda i: (-nbytes[i], i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + nbytes[i], rank))
    return owners


class RankShare:
    """The `scan(..., shard=)` hook for one rank of a torch.distributed process group.

    Args:
        ctx: a runtime.parallel.DistContext (its gloo object group carries the results).
    """

    def __init__(self, ctx: Any, *, started: bool = False):
        self.ctx = ctx
        self.started = started  # this process group was started here, and is ended by finish()
        self.rank = ctx.layout.rank
        self.world_size = ctx.layout.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> Any:
        return self.ctx.backend.device

    def split(self, todo: list[str], nbytes: list[int]) -> tuple[list[str], list[str]]:
        """(the tensors to read, as rank 0 sees them; this rank's part of them, in file order).

        Rank 0's list is used everywhere: ranks whose caches differ still agree on the work.
        """
        todo, nbytes = self.ctx.broadcast_object((todo, nbytes))
        owners = balanced_owners(nbytes, self.world_size)
        return todo, [name for name, owner in zip(todo, owners) if owner == self.rank]

    def gather(self, entries: dict[str, Any], bytes_read: int) -> tuple[dict[str, Any], int]:
        """Every rank's per-tensor results (rank 0's win where both have one), total bytes read."""
        gathered = self.ctx.all_gather_object((entries, bytes_read))
        merged: dict[str, Any] = {}
        for part, _ in reversed(gathered):
            merged.update(part)
        return merged, sum(b for _, b in gathered)


def start(backend: Any) -> RankShare | None:
    """Join the torchrun process group when launched by it (WORLD_SIZE > 1), else None."""
    import torch.distributed as dist

    from modelkin.runtime.parallel import init_distributed, launched_world_size

    if launched_world_size() == 1 and not dist.is_initialized():
        return None
    started = not dist.is_initialized()
    return RankShare(init_distributed(backend), started=started)


def finish(share: RankShare | None) -> None:
    """Leave the process group if `start` started it."""
    if share is not None and share.started:
        from modelkin.runtime.parallel import shutdown

        shutdown()
