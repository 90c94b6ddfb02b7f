"""What the runtime API returns: a prompt's generation (GenerationResult, folded from streamed responses)
and a text's score (ScoreResult; ``score_logprobs`` is the one definition of bits per byte)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from modelkin.runtime.generate import GenerationResponse


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GenerationResult:
    """One prompt's generation: ``tokens`` are the generated ids (an ending EOS id included),
    ``text`` their decoded text (EOS and stop string excluded), ``finish_reason`` "stop" or "length".
    ``timings``: prefill_s, decode_s and tokens_per_s (decode steps per second, per sequence).
    ``routing``: MoE models only, per-layer expert counts and routing entropy of the whole call
    (prompt and generated tokens of every prompt in the batch; padding excluded)."""

    prompt_ids: list[int]
    tokens: list[int]
    text: str
    finish_reason: str
    timings: dict[str, float]
    logprobs: list[float] = dataclasses.field(default_factory=list)
    routing: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ScoreResult:
    """Log-likelihood of a text: ``logprobs[i]`` is ln p(tokens[i] | everything before it).

    ``nll`` is the summed negative log-likelihood in nats, ``bits_per_byte = nll / ln 2 / n_bytes``
    with ``n_bytes`` the UTF-8 size of the whole text.
    """

    tokens: list[int]
    logprobs: list[float]
    nll: float
    n_bytes: int
    bits_per_byte: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def score_logprobs(logprobs: torch.Tensor, ids: Sequence[int], text: str) -> ScoreResult:
    """Score ``text`` from its log-softmax rows [len(ids), V]: row i predicts ids[i + 1] (used by Model.score
    and by compare's behaviour pass, so bits per byte has one definition)."""
    target = torch.tensor(list(ids[1:]), device=logprobs.device)[:, None]
    values = logprobs[:-1].gather(-1, target)[:, 0].double().cpu().tolist()
    nll = -math.fsum(values)
    n_bytes = len(text.encode("utf-8"))
    return ScoreResult(tokens=list(ids[1:]), logprobs=values, nll=nll, n_bytes=n_bytes,
                       bits_per_byte=nll / math.log(2) / n_bytes)


def collect_result(prompt_ids: list[int], responses: list[GenerationResponse]) -> GenerationResult:
    """Fold one prompt's streamed responses into its GenerationResult."""
    last = responses[-1]
    steps = max(len(responses) - 1, 0)
    return GenerationResult(
        prompt_ids=prompt_ids,
        tokens=[r.token for r in responses],
        text="".join(r.text for r in responses),
        finish_reason=last.finish_reason or "length",
        timings={
            "prefill_s": last.prefill_s,
            "decode_s": last.decode_s,
            "tokens_per_s": steps / last.decode_s if last.decode_s > 0 else 0.0,
        },
        logprobs=[r.logprob for r in responses],
    )
