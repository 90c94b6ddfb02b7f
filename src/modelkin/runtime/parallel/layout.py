"""The tp × ep layout of ranks and how sizes split across them: pure numbers, so planning needs no
process group. Ranks are numbered ``rank = ep_rank * tp + tp_rank`` (a tensor-parallel group's ranks
are consecutive: one node's fast links)."""

from __future__ import annotations

import dataclasses

from modelkin.errors import ConfigError, InputError


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
