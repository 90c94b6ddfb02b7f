"""Settings of a behavioural comparison: how many prompts, tokens and samples, and which metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

from modelkin.errors import InputError

# Metric groups a user can ask for; `logits` and `greedy_tokens` need identical vocabularies.
METRICS = ("logits", "greedy", "bpb", "mmd", "routing")
SAME_TOKENIZER_METRICS = ("logits",)
SAMPLE_DTYPES = ("auto", "model", "bfloat16")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BehaviourSettings:
    """What `compare` runs on each model. Defaults are sized for a quick CPU run of a small model.

    The default budget per model: 24 prompts (each prefilled once; its logits give the token-level
    metrics), an 8-token greedy continuation of each, and for the MMD two-sample test 16 samples of
    8 tokens for each of the first 8 prompts (8 x 16 = 128 continuations, 4x the earlier 4 x 8).
    Greedy rows were 32 tokens, then 16; they feed no p-value: R2 reads them as its third guard (>= 95 %
    of tokens agree) after the per-position JS divergence and top-1 agreement over every prompt token,
    and the text similarity describes them. Where two functions differ, the first differing token is the
    evidence and the rest of the row follows another context, so long rows add cost, not evidence; on a
    2-core CPU each greedy step streams every float32 weight once (8 tokens: 0.74 s less per SmolLM2
    model than 16). Related models' rows drift apart as they go on, so agreement over 8 tokens reads
    higher than over 16 or 32 for a fine-tune (SmolLM2 and a 12-step fine-tune: 0.73, 0.58, 0.40); an
    identical function agrees on all of them, unrelated models on none (std-matched twin: 0.0).
    Sampled rows were 16 tokens before: the Hamming kernel's later positions add noise more than signal,
    and 8 tokens reject SmolLM2's light fine-tune as often as 16 (18/80 vs 15/80 seeds at 0.05, size 5/80
    vs 1/80; ``python -m bench.mmd_power``, bench/README.md) at half the sampled rows' cost.

    Attributes:
        max_prompts: prompts used (round-robin over categories); None for all.
        top_k: size of the top-k sets compared per position.
        greedy_tokens: length of each greedy continuation.
        mmd_prompts / mmd_samples / mmd_tokens: the two-sample test draws ``mmd_samples`` continuations
            of ``mmd_tokens`` tokens at ``temperature`` for each of the first ``mmd_prompts`` prompts.
        sample_dtype: the weights' dtype for the sampled continuations after their first token:
            "model" (the model's own), "bfloat16", or "auto" (bfloat16 where the device computes it
            natively: CPUs with AVX512-BF16/AMX/ARM BF16, CUDA GPUs of compute capability 8 or more;
            else the model's). On such CPUs bfloat16 matmuls run ~3x float32's rate. `compare` converts
            the model in place once its greedy rows are done (no second copy in memory). The prefill,
            token-level metrics and greedy decoding always run at the model's dtype, so functional
            identity (R2) is judged in full precision; the MMD test compares two samplers that round
            the same way. The dtype used is recorded per model (``sample_dtype`` in the report).
        permutations: permutations for the bpb-correlation and MMD p-values.
        seed: base seed; model B samples with a different stream than model A.
        metrics: the metric groups to run (subset of METRICS).
        explicit_metrics: True when the user named the metrics: a same-tokenizer metric that cannot
            run is then an error instead of a skipped metric.
    """

    max_prompts: int | None = 24
    top_k: int = 10
    greedy_tokens: int = 8
    mmd_prompts: int = 8
    mmd_samples: int = 16
    mmd_tokens: int = 8
    temperature: float = 1.0
    sample_dtype: str = "auto"
    permutations: int = 2000
    seed: int = 0
    metrics: tuple[str, ...] = METRICS
    explicit_metrics: bool = False

    def __post_init__(self) -> None:
        for name in ("top_k", "greedy_tokens", "mmd_samples", "mmd_tokens", "permutations"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.mmd_prompts < 0:
            raise InputError(f"mmd_prompts must be >= 0, got {self.mmd_prompts}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise InputError(f"max_prompts must be at least 1, got {self.max_prompts}",
                             hint="pass --max-prompts 1 or more")
        if self.sample_dtype not in SAMPLE_DTYPES:
            raise InputError(f"unknown sample dtype {self.sample_dtype!r}",
                             hint=f"choose from {', '.join(SAMPLE_DTYPES)}")
        if not self.temperature > 0:
            raise InputError(f"the sampling temperature must be > 0, got {self.temperature}")
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise InputError(f"unknown behaviour metric(s): {', '.join(unknown)}",
                             hint=f"choose from {', '.join(METRICS)}")

    @classmethod
    def quick(cls, **overrides: Any) -> BehaviourSettings:
        """Smaller budget for demos and tests."""
        base = {"max_prompts": 12, "greedy_tokens": 16, "mmd_prompts": 4, "mmd_samples": 8, "mmd_tokens": 12,
                "permutations": 1000}
        return cls(**{**base, **overrides})

    def wants(self, metric: str) -> bool:
        return metric in self.metrics

    def collect_key(self) -> tuple[Any, ...]:
        """What the per-model outputs depend on (permutations and verdict rules do not matter)."""
        return (self.top_k, self.greedy_tokens, self.mmd_prompts, self.mmd_samples, self.mmd_tokens,
                self.temperature, self.sample_dtype, tuple(sorted(self.metrics)))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
