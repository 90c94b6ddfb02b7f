"""Behaviour of two models on the same prompts: prompts, per-model outputs, metrics, MoE routing.

Re-exports the names of the former module `modelkin.compare.behaviour` (now metrics.py) for one release.
"""

from __future__ import annotations

from modelkin.compare.behaviour.metrics import (
    compare_outputs,
    greedy_token_agreement,
    position_divergences,
    same_tokenizer,
    text_similarity,
    topk_agreement,
)
from modelkin.compare.behaviour.result import BehaviourResult

__all__ = ["BehaviourResult", "compare_outputs", "greedy_token_agreement", "position_divergences",
           "same_tokenizer", "text_similarity", "topk_agreement"]
