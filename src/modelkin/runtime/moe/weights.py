"""Expert weights between checkpoint and runtime layout: per-expert HF tensors
(`…experts.{j}.gate_proj.weight`) ⇄ stacked `experts.gate_up_proj` [E, 2F, D] / `experts.down_proj` [E, D, F].

Works on real tensors and on the loader's LazyTensors (stacking then happens when the weight is read).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from modelkin.checkpoint.lazy import LazyTensor
from modelkin.errors import ConfigError

SWIGLU_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ("w1", "w3", "w2")  # gate, up, down


def stack_experts(
    state: dict[str, Any],
    prefix: str,
    num_experts: int | None = None,
    *,
    names: tuple[str, str, str] = SWIGLU_NAMES,
) -> dict[str, Any]:
    """Replace `{prefix}.{j}.{gate,up,down}.weight` (j < E) in `state` by the two stacked tensors.

    `num_experts` None counts the experts the checkpoint holds. A checkpoint already in the stacked
    layout (`{prefix}.gate_up_proj`) is left as it is.

    Raises:
        ConfigError: expert tensors are missing or numbered beyond `num_experts`.
    """
    if f"{prefix}.gate_up_proj" in state:
        return state
    found = _expert_indices(state, prefix)
    count = (max(found) + 1 if found else 0) if num_experts is None else num_experts
    gate, up, down = names
    keys = [[f"{prefix}.{j}.{n}.weight" for n in (gate, up, down)] for j in range(count)]
    missing = [k for row in keys for k in row if k not in state]
    if missing or not keys:
        raise ConfigError(
            f"{len(missing) or 'all'} expert tensors missing under {prefix}"
            + (f" (first: {missing[0]})" if missing else "")
            + (f"; the config says num_experts={num_experts}" if num_experts is not None else ""),
            hint="check the expert count in config.json against the checkpoint's experts",
        )
    extra = sorted(j for j in found if j >= count)
    if extra:
        raise ConfigError(
            f"the checkpoint has expert {extra[-1]} under {prefix}, but num_experts={count}",
            hint="fix the expert count in config.json",
        )
    rows = [[state.pop(k) for k in row] for row in keys]
    state[f"{prefix}.gate_up_proj"] = _stack([(g, u) for g, u, _ in rows])
    state[f"{prefix}.down_proj"] = _stack([(d,) for _, _, d in rows])
    return state


def stack_layer_experts(
    state: dict[str, Any], block: str = "mlp", *, names: tuple[str, str, str] = SWIGLU_NAMES
) -> dict[str, Any]:
    """`stack_experts` for every `model.layers.{i}.{block}.experts` the checkpoint holds."""
    pattern = re.compile(rf"^(model\.layers\.\d+\.{re.escape(block)}\.experts)\.\d+\.")
    prefixes = sorted({m.group(1) for k in state if (m := pattern.match(k))})
    for prefix in prefixes:
        stack_experts(state, prefix, names=names)
    return state


def unstack_experts(
    gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The inverse of `stack_experts` for one layer: per expert (gate [F, D], up [F, D], down [D, F])."""
    hidden = down_EDF.shape[-1]
    return [(gu[:hidden], gu[hidden:], d) for gu, d in zip(gate_up_EFD, down_EDF)]


def unstack_layer_experts(
    tensors: dict[str, torch.Tensor], *, names: tuple[str, str, str] = SWIGLU_NAMES
) -> dict[str, torch.Tensor]:
    """Runtime names → checkpoint names: every `….experts.gate_up_proj`/`down_proj` pair split per expert."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".experts.gate_up_proj")]:
        prefix = key.removesuffix(".gate_up_proj")
        parts = unstack_experts(out.pop(key), out.pop(f"{prefix}.down_proj"))
        for j, row in enumerate(parts):
            for name, tensor in zip(names, row):
                out[f"{prefix}.{j}.{name}.weight"] = tensor.clone()
    return out


def _expert_indices(state: dict[str, Any], prefix: str) -> set[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return {int(m.group(1)) for k in state if (m := pattern.match(k))}


def _stack(rows: list[tuple[Any, ...]]) -> Any:
    """Stack rows (each row concatenated along dim 0) into [E, …]; lazily for LazyTensors."""
    if not isinstance(rows[0][0], LazyTensor):
        return torch.stack([torch.cat(row) if len(row) > 1 else row[0] for row in rows])
    first = rows[0][0].shape
    shape = (len(rows), sum(t.shape[0] for t in rows[0]), *first[1:])

    def load() -> torch.Tensor:  # fills one preallocated tensor: peak memory = result + one expert
        out = None
        for j, row in enumerate(rows):
            start = 0
            for part in row:
                tensor = part.load()
                if out is None:
                    out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
                out[j, start : start + tensor.shape[0]] = tensor
                start += tensor.shape[0]
        return out

    sources = tuple(s for row in rows for t in row for s in t.sources)
    return LazyTensor(shape, load, sources, sum(t.nbytes for row in rows for t in row), _slicer(rows))


def _slicer(rows: list[tuple[Any, ...]]) -> Any:
    """Narrowing a lazy stack reads only what is kept: dim 0 picks experts (expert parallelism),
    dim 1 picks rows of the concatenated parts (tensor parallelism), later dims narrow every part."""

    def slicer(dim: int, start: int, stop: int) -> LazyTensor:
        if dim == 0:
            return _stack(rows[start:stop])
        if dim > 1:
            return _stack([tuple(p.narrow(dim - 1, start, stop) for p in row) for row in rows])
        cut = []
        for row in rows:
            kept, offset = [], 0
            for part in row:
                lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
                if lo < hi:
                    kept.append(part.narrow(0, lo, hi))
                offset += part.shape[0]
            cut.append(tuple(kept))
        return _stack(cut)

    return slicer
