"""Routing telemetry: per MoE layer, how many tokens each expert received and the routing entropy.

Accumulates on the device (no host sync per forward); numbers are read once, by `layers()`/`to_json()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from modelkin.runtime.moe.block import SparseMoeBlock


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerRouting:
    """What one MoE layer's router did over all recorded tokens.

    Attributes:
        layer: decoder layer index.
        num_tokens: tokens routed (padding excluded when a mask was given).
        top_k: experts per token.
        expert_counts: token–expert assignments per expert; sums to num_tokens × top_k.
        token_entropy: mean over tokens of the entropy (nats) of the full router distribution.
        load_entropy: entropy (nats) of the expert-load distribution expert_counts / sum.
        max_entropy: log(num_experts), the upper bound of both entropies.
    """

    layer: int
    num_tokens: int
    top_k: int
    expert_counts: list[int]
    token_entropy: float
    load_entropy: float
    max_entropy: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _float_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "npu" else torch.float64  # Ascend has no fast fp64


class _Accumulator:
    __slots__ = ("counts_E", "entropy_sum", "num_tokens", "top_k")

    def __init__(self, num_experts: int, top_k: int, device: torch.device):
        self.counts_E = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.entropy_sum = torch.zeros((), dtype=_float_dtype(device), device=device)
        self.num_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.top_k = top_k


class RoutingTelemetry:
    """Collects routing statistics from the routers of every `SparseMoeBlock` in a model.

    Recording is a forward hook on each block's `gate`, present only inside `recording(model)`,
    so the forward pass costs nothing extra when telemetry is off.

    Example:
        >>> tele = RoutingTelemetry()
        >>> with tele.recording(model):
        ...     model(input_ids)
        >>> tele.to_json()["layers"][0]["expert_counts"]

    Attributes:
        token_mask: optional bool mask over the tokens of the next forward calls (same layout as the
            model input, e.g. [B, L]); False tokens (padding) are not counted. Set it per call.
    """

    def __init__(self) -> None:
        self._acc: dict[int, _Accumulator] = {}
        self.token_mask: torch.Tensor | None = None
        self._call_mask: torch.Tensor | None = None

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[RoutingTelemetry]:
        """Record every MoE router of `model` while the block is active."""
        handles = [model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        for module in model.modules():
            if isinstance(module, SparseMoeBlock):
                handles.append(module.gate.register_forward_hook(self._hook(module.layer_idx)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Which of this call's tokens are real: from the KV cache's slot mask when the model gets
        one (generation: padding and the new slots it reserved), else `token_mask`."""
        self._call_mask = self.token_mask
        cache = kwargs.get("cache")
        ids = args[0] if args else kwargs.get("input_ids_BL")
        if cache is not None and hasattr(cache, "valid_BS") and isinstance(ids, torch.Tensor):
            start = cache.length
            self._call_mask = cache.valid_BS[:, start : start + ids.shape[-1]]

    def _hook(self, layer: int):
        def hook(_module: nn.Module, _args: Any, output: tuple[torch.Tensor, ...]) -> None:
            _, ids_TK, scores_TE = output
            self.record(layer, ids_TK, scores_TE, token_mask=self._call_mask)

        return hook

    def record(
        self,
        layer: int,
        ids_TK: torch.Tensor,
        scores_TE: torch.Tensor,
        *,
        token_mask: torch.Tensor | None = None,
    ) -> None:
        """Add one forward's routing of layer `layer`: chosen ids [T, K] and scores [T, E].

        Scores that are not a distribution (sigmoid routers) are normalised per token first.
        """
        num_experts = scores_TE.shape[-1]
        acc = self._acc.get(layer)
        if acc is None:
            acc = self._acc[layer] = _Accumulator(num_experts, ids_TK.shape[-1], scores_TE.device)
        p_TE = scores_TE.to(acc.entropy_sum.dtype)
        entropy_T = torch.special.entr(p_TE / p_TE.sum(dim=-1, keepdim=True)).sum(dim=-1)
        ids_S = ids_TK.reshape(-1)
        if token_mask is None:
            acc.counts_E += torch.bincount(ids_S, minlength=num_experts)
            acc.entropy_sum += entropy_T.sum()
            acc.num_tokens += ids_TK.shape[0]
        else:  # weighted counts instead of boolean indexing: no host sync
            keep_T = token_mask.reshape(-1).to(torch.int64)
            keep_S = keep_T.repeat_interleave(ids_TK.shape[-1])
            acc.counts_E += torch.bincount(ids_S, weights=keep_S.to(p_TE.dtype), minlength=num_experts).long()
            acc.entropy_sum += (entropy_T * keep_T).sum()
            acc.num_tokens += keep_T.sum()

    def reset(self) -> None:
        self._acc.clear()

    def __bool__(self) -> bool:
        return bool(self._acc)

    def layers(self) -> list[LayerRouting]:
        """Per-layer summaries, in layer order (one host sync per layer)."""
        out = []
        for layer in sorted(self._acc):
            acc = self._acc[layer]
            counts = acc.counts_E.cpu()
            num_tokens = int(acc.num_tokens)
            total = int(counts.sum())
            load = counts.double() / total if total else counts.double()
            out.append(
                LayerRouting(
                    layer=layer,
                    num_tokens=num_tokens,
                    top_k=acc.top_k,
                    expert_counts=counts.tolist(),
                    token_entropy=float(acc.entropy_sum) / num_tokens if num_tokens else 0.0,
                    load_entropy=float(torch.special.entr(load).sum()),
                    max_entropy=math.log(counts.numel()),
                )
            )
        return out

    def to_json(self) -> dict[str, Any]:
        """`{"layers": [LayerRouting as dict, ...]}` — what `modelkin run --json` writes under `routing`."""
        return {"layers": [layer.to_json() for layer in self.layers()]}


def has_moe(model: nn.Module) -> bool:
    """Whether `model` contains a routed MoE block (so routing telemetry means something)."""
    return any(isinstance(m, SparseMoeBlock) for m in model.modules())
