"""The sparse MoE block: router + stacked experts (+ a shared expert, ungated or sigmoid-gated)."""

from __future__ import annotations

import torch
from torch import nn

from modelkin.runtime.moe.experts import StackedExperts
from modelkin.runtime.moe.router import Router


class SparseMoeBlock(nn.Module):
    """Router + stacked experts (+ a shared expert, ungated or sigmoid-gated).

    Module names follow HF (`gate`, `experts`, `shared_expert`, `shared_expert_gate`, `router_scale`),
    so a remapped checkpoint loads with `load_state_dict` unchanged. `layer_idx` labels telemetry.
    """

    def __init__(
        self,
        *,
        gate: Router,
        experts: StackedExperts,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: bool = False,
        router_scale: bool = False,
        layer_idx: int = 0,
    ):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_expert = shared_expert
        dim = experts.dim
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_expert_gate else None
        self.router_scale = nn.Parameter(torch.empty(experts.num_experts)) if router_scale else None
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] → [..., D]. Routing telemetry hooks onto `gate` (telemetry.RoutingTelemetry)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        weights_TK, ids_TK, _ = self.gate(x_TD, self.router_scale)
        y_TD = self.experts(x_TD, weights_TK, ids_TK)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        return y_TD.view(shape)
