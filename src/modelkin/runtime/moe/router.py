"""MoE routers: router logits → (weights, expert ids, scores) under a routing policy.

Shape legend (suffixes): T tokens, D model dim, E routed experts, K experts per token, G expert groups.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from modelkin.errors import ConfigError

Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (weights_TK fp32, ids_TK int64, scores_TE fp32)


class RouterPolicy(str, enum.Enum):
    """How router logits become (weights, expert ids)."""

    SOFTMAX_TOPK = "softmax_topk"  # Mixtral, Qwen2-MoE, Qwen3-MoE (renormalised or not)
    MOGE = "moge"  # Pangu Pro MoE: global softmax, top-1 in each of G contiguous groups, × router_scale


def softmax_topk(logits_TE: torch.Tensor, top_k: int, *, renormalize: bool) -> Routing:
    """Softmax over all experts in fp32, keep the top-k; optionally renormalise them to sum 1."""
    scores_TE = torch.softmax(logits_TE.float(), dim=-1)  # fp32: bf16 ties change top-k
    weights_TK, ids_TK = torch.topk(scores_TE, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK, scores_TE


def moge_topk(logits_TE: torch.Tensor, num_groups: int, router_scale_E: torch.Tensor) -> Routing:
    """MoGE: one global softmax, the argmax inside each of G contiguous groups, weight p·scale[e].

    Selection uses the unscaled probabilities; the K = G weights are not renormalised.
    """
    num_tokens, num_experts = logits_TE.shape
    per_group = num_experts // num_groups
    scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    probs_TG, local_TG = scores_TE.view(num_tokens, num_groups, per_group).max(dim=-1)
    offsets_G = torch.arange(num_groups, device=logits_TE.device) * per_group
    ids_TK = local_TG + offsets_G
    weights_TK = probs_TG * router_scale_E.float().reshape(-1)[ids_TK]
    return weights_TK, ids_TK, scores_TE


class Router(nn.Module):
    """The gate: logits = x·Wᵀ (`weight` [E, D]), then a routing policy.

    Returns `(weights_TK, ids_TK, scores_TE)` so a forward hook sees the full score distribution.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        policy: RouterPolicy,
        top_k: int,
        num_groups: int = 1,
        norm_topk_prob: bool = False,
    ):
        super().__init__()
        _check_routing(num_experts, top_k, num_groups, policy)
        self.policy = RouterPolicy(policy)
        self.num_experts, self.top_k, self.num_groups = num_experts, top_k, num_groups
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, dim))

    def forward(self, x_TD: torch.Tensor, router_scale_E: torch.Tensor | None = None) -> Routing:
        logits_TE = F.linear(x_TD, self.weight)
        if self.policy is RouterPolicy.SOFTMAX_TOPK:
            return softmax_topk(logits_TE, self.top_k, renormalize=self.norm_topk_prob)
        if router_scale_E is None:
            raise ConfigError("the MoGE router needs mlp.router_scale", hint="check the checkpoint")
        return moge_topk(logits_TE, self.num_groups, router_scale_E)

    def extra_repr(self) -> str:
        groups = f", groups={self.num_groups}" if self.policy is RouterPolicy.MOGE else ""
        return f"policy={self.policy.value}, experts={self.num_experts}, top_k={self.top_k}{groups}"


def _check_routing(num_experts: int, top_k: int, num_groups: int, policy: RouterPolicy) -> None:
    if not 0 < top_k <= num_experts:
        raise ConfigError(
            f"num_experts_per_tok={top_k} must be between 1 and num_experts={num_experts}",
            hint="fix config.json",
        )
    if RouterPolicy(policy) is RouterPolicy.MOGE:
        if num_groups <= 0 or num_experts % num_groups:
            raise ConfigError(
                f"MoGE needs the {num_experts} experts to split evenly into {num_groups} groups",
                hint="num_experts must be a multiple of num_experts_per_tok (the group count)",
            )
        if top_k != num_groups:
            raise ConfigError(
                f"MoGE picks one expert per group, so top_k ({top_k}) must equal the groups ({num_groups})",
                hint="fix config.json",
            )
