"""Mixture-of-experts blocks shared by every MoE architecture: router policies (router.py), stacked
SwiGLU experts (experts.py) dispatched by one plan per forward (dispatch.py), the sparse block (block.py).

CPU execution (cpu.py), the Ascend fast path (npu_ops.py), checkpoint ⇄ stacked weights (weights.py)
and routing telemetry (telemetry.py) are submodules, imported by name.
"""

from __future__ import annotations

from modelkin.runtime.moe.block import SparseMoeBlock
from modelkin.runtime.moe.dispatch import ExpertsImpl, Plan, plan
from modelkin.runtime.moe.experts import StackedExperts, experts_gather, experts_sorted, swiglu
from modelkin.runtime.moe.router import Router, RouterPolicy, Routing, moge_topk, softmax_topk

__all__ = [
    "ExpertsImpl",
    "Plan",
    "Router",
    "RouterPolicy",
    "Routing",
    "SparseMoeBlock",
    "StackedExperts",
    "experts_gather",
    "experts_sorted",
    "moge_topk",
    "plan",
    "softmax_topk",
    "swiglu",
]
