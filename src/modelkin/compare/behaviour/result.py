"""BehaviourResult: the behavioural metrics of one pair of models, typed, with their JSON form."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

# Written to JSON only once measured (the other fields are always present, None when not measured).
_ONLY_WHEN_MEASURED = ("n_positions", "bpb_texts", "token_vocabulary")


@dataclasses.dataclass(kw_only=True)
class BehaviourResult:
    """A vs B on the same prompts; every metric that could not run is None with a reason in ``skipped``.

    Units are bits. js_divergence … topk_overlap (per position): over the whole vocabulary when the
    tokenizers are identical, else over the byte-identical shared tokens (renormalised) at positions where
    both tokenisations end on the same byte (``token_vocabulary`` says so). Same tokenizer only: the greedy
    token metrics. Any tokenizers: greedy text similarity, bits per byte and their correlation across texts, the
    two-sample MMD test. MoE pairs: routing. ``result["key"]`` reads a field like the JSON dict does.
    """

    same_tokenizer: bool = False
    tokenizer_note: str | None = None
    units: str = "bits"
    n_prompts: int = 0
    skipped: dict[str, str | None] = dataclasses.field(default_factory=dict)
    js_divergence: float | None = None
    js_divergence_max: float | None = None
    kl_ab: float | None = None
    kl_ba: float | None = None
    top1_agreement: float | None = None
    topk_overlap: float | None = None
    top_k: int | None = None
    n_positions: int | None = None
    token_vocabulary: dict[str, Any] | None = None  # set when token metrics ran over a shared sub-vocabulary
    greedy_text_similarity: float | None = None
    greedy_exact_match: float | None = None
    greedy_token_agreement: float | None = None
    greedy_prefix_tokens: float | None = None
    greedy_tokens: int | None = None
    bpb_a: float | None = None
    bpb_b: float | None = None
    bpb_correlation: float | None = None
    bpb_p_value: float | None = None
    bpb_spearman: float | None = None
    bpb_spearman_p_value: float | None = None
    bpb_texts: int | None = None
    mmd: dict[str, Any] | None = None
    routing: dict[str, Any] | None = None
    routing_a: dict[str, Any] | None = None
    routing_b: dict[str, Any] | None = None
    per_prompt: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def update(self, **values: Any) -> None:
        for key, value in values.items():
            if key not in _FIELDS:
                raise AttributeError(f"BehaviourResult has no field {key!r}")
            setattr(self, key, value)

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS or (key in _ONLY_WHEN_MEASURED and getattr(self, key) is None):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def to_json(self) -> dict[str, Any]:
        return {k: copy.deepcopy(getattr(self, k)) for k in _FIELDS
                if not (k in _ONLY_WHEN_MEASURED and getattr(self, k) is None)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BehaviourResult:
        """The inverse of ``to_json``; missing keys keep their defaults."""
        return cls(**{k: copy.deepcopy(v) for k, v in data.items() if k in _FIELDS})


_FIELDS = tuple(f.name for f in dataclasses.fields(BehaviourResult))
