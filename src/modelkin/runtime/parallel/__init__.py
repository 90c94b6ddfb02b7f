"""Multi-device runs: the tp × ep layout (layout.py), process groups and collectives (dist.py), the
tensor/expert-parallel blocks (layers.py), one rank's model built and loaded (shard.py) and the
memory plan made before any weight is read (memory_plan.py)."""

from __future__ import annotations

from modelkin.runtime.parallel.dist import (
    DistContext,
    Reduce,
    init_distributed,
    launched_world_size,
    shutdown,
)
from modelkin.runtime.parallel.layout import (
    Layout,
    check_degrees,
    expert_range,
    head_ranges,
    resolve_degrees,
    split_range,
)

__all__ = [
    "DistContext",
    "Layout",
    "Reduce",
    "check_degrees",
    "expert_range",
    "head_ranges",
    "init_distributed",
    "launched_world_size",
    "resolve_degrees",
    "shutdown",
    "split_range",
]
