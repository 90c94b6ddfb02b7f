"""Behavioural comparison of two models' outputs on the same prompts.

Same tokenizer: per-position next-token Jensen-Shannon divergence and KL (bits), top-1 agreement,
top-k overlap, greedy continuations token by token. Any tokenizers: bits per byte per text and their
correlation across texts, greedy continuations as text. MoE pairs: routing similarity. Always: a
two-sample MMD test on sampled continuations. Every metric that cannot run is None with a reason.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

from modelkin.compare.behaviour.outputs import ModelOutputs
from modelkin.compare.behaviour.prompts import Prompt
from modelkin.compare.behaviour.result import BehaviourResult
from modelkin.compare.behaviour.routing import routing_similarity
from modelkin.compare.settings import SAME_TOKENIZER_METRICS, BehaviourSettings
from modelkin.compare.stats import correlation_test, mmd_test
from modelkin.errors import InputError

LN2 = math.log(2.0)


def position_divergences(lp_a: Any, lp_b: Any) -> dict[str, Any]:
    """JS divergence, KL(A||B) and KL(B||A) in bits for each position of two log-prob tables [T, V].

    Probabilities are exp(log-probs) renormalised in float64; identical inputs give exactly 0. Rows run in
    chunks of about 2^17 elements, so a chunk's float64 tables stay in the CPU's cache (3x faster than
    chunks of 2^20 elements on SmolLM2's 24 prompts); row sums run on one thread, so each row's values
    depend on that row only (a thread team splits the sum of a lone row, not of several).
    """
    import torch

    step = max(1, (1 << 17) // max(1, lp_a.shape[-1]))
    parts = [_divergences(lp_a[i:i + step], lp_b[i:i + step]) for i in range(0, lp_a.shape[0], step)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]} if len(parts) > 1 else parts[0]


def _divergences(lp_a: Any, lp_b: Any) -> dict[str, Any]:
    """Σ p·(log p − log m) and the like per row, a term counting 0 where its weight is 0 (0·log 0 = 0)."""
    p = lp_a.double().exp_()
    q = lp_b.double().exp_()
    p /= _row_sums(p)[:, None]
    q /= _row_sums(q)[:, None]
    log_p, log_q = p.log(), q.log()  # log 0 = -inf
    log_m = (p + q).mul_(0.5).log_()
    p_zero, q_zero = ~(p > 0), ~(q > 0)  # NaN weights count 0 too

    def kl(weight: Any, zero: Any, log_x: Any, log_y: Any) -> Any:
        return _row_sums((log_x - log_y).mul_(weight).masked_fill_(zero, 0.0))

    kl_pm, kl_qm = kl(p, p_zero, log_p, log_m), kl(q, q_zero, log_q, log_m)
    kl_ab, kl_ba = kl(p, p_zero, log_p, log_q), kl(q, q_zero, log_q, log_p)
    js = (0.5 * (kl_pm + kl_qm)).clamp(min=0.0) / LN2
    return {"js": js, "kl_ab": kl_ab.clamp(min=0.0) / LN2, "kl_ba": kl_ba.clamp(min=0.0) / LN2}


def _row_sums(x: Any) -> Any:
    from modelkin.runtime.cpu_kernels import one_cpu_thread

    with one_cpu_thread(x.device):
        return x.sum(-1)


def topk_agreement(ids_a: Any, ids_b: Any) -> tuple[Any, Any]:
    """Per position: top-1 equal (bool) and |top-k(A) ∩ top-k(B)| / k for id tables [T, k]."""
    top1 = ids_a[:, 0] == ids_b[:, 0]
    k = ids_a.shape[1]
    overlap = (ids_a[:, :, None] == ids_b[:, None, :]).any(-1).sum(-1).double() / k
    return top1, overlap


def greedy_token_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[float, int]:
    """(fraction of positions with equal tokens over the longer continuation, common prefix length)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0, 0
    same = sum(1 for x, y in zip(a, b) if x == y)
    prefix = 0
    for x, y in zip(a, b):
        if x != y:
            break
        prefix += 1
    return same / longest, prefix


def text_similarity(a: str, b: str) -> float:
    """Character-level similarity: difflib's ratio 2·matches / (len a + len b); 1.0 for two empty texts."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def same_tokenizer(a: ModelOutputs, b: ModelOutputs) -> tuple[bool, str | None]:
    """Whether token-level metrics are meaningful, and the reason when they are not."""
    if a.vocab_hash is None or b.vocab_hash is None:
        return False, "a model has no tokenizer"
    if a.vocab_hash != b.vocab_hash:
        return False, "the two models' vocabularies differ (token-level metrics would compare unrelated ids)"
    return True, None


def compare_outputs(a: ModelOutputs, b: ModelOutputs, prompts: Sequence[Prompt],
                    settings: BehaviourSettings) -> BehaviourResult:
    """All behavioural metrics of A vs B (see the module docstring).

    Raises:
        InputError: the user named a same-tokenizer metric and the vocabularies differ.
    """
    same, why = same_tokenizer(a, b)
    if not same and settings.explicit_metrics:
        asked = [m for m in SAME_TOKENIZER_METRICS if settings.wants(m)]
        shared, unusable = shared_vocabulary(a, b)
        if asked and shared is None:
            raise InputError(f"metric {asked[0]!r} needs identical tokenizers or at least {MIN_SHARED_TOKENS} "
                             f"byte-identical shared tokens, but {why} ({unusable})",
                             hint="drop it from --metrics; bpb, greedy (as text) and mmd work across tokenizers")
    out = BehaviourResult(same_tokenizer=same, tokenizer_note=why, n_prompts=len(prompts))
    per_prompt = [{"id": p.id, "category": p.category, "prompt": p.prompt} for p in prompts]
    _logit_metrics(out, per_prompt, a, b, same, why, settings)
    _greedy_metrics(out, per_prompt, a, b, same, why, settings)
    _bpb_metrics(out, per_prompt, a, b, settings)
    _mmd_metric(out, a, b, same, settings)
    _routing_metric(out, a, b, settings)
    out.per_prompt = per_prompt
    return out


def _logit_metrics(out: BehaviourResult, rows: list[dict[str, Any]], a: ModelOutputs, b: ModelOutputs,
                   same: bool, why: str | None, settings: BehaviourSettings) -> None:
    keys = ("js_divergence", "js_divergence_max", "kl_ab", "kl_ba", "top1_agreement", "topk_overlap")
    out.update(**dict.fromkeys(keys))
    out.top_k = settings.top_k
    if not settings.wants("logits"):
        out.skipped["logits"] = "not requested"
        return
    if not same:
        _shared_vocab_logit_metrics(out, rows, a, b, why, settings)
        return
    acc = _PositionMetrics()
    mismatched = 0
    for i, row in enumerate(rows):
        if a.prompt_ids[i] != b.prompt_ids[i]:
            mismatched += 1
            continue
        lp_a, lp_b = _common_vocab(a.logprobs[i], b.logprobs[i])
        acc.add(row, lp_a, lp_b, a.topk_ids[i], b.topk_ids[i])
    if mismatched:
        out.skipped["logits_prompts"] = f"{mismatched} prompt(s) tokenized differently by the two models"
    if not acc.js:
        out.skipped["logits"] = "no prompt is tokenized identically by both models"
        return
    acc.write(out)


class _PositionMetrics:
    """Per-position JS/KL, top-1 agreement and top-k overlap gathered over prompts, then averaged."""

    def __init__(self) -> None:
        self.js: list[Any] = []
        self.kl_ab: list[Any] = []
        self.kl_ba: list[Any] = []
        self.top1: list[Any] = []
        self.overlap: list[Any] = []

    def add(self, row: dict[str, Any], lp_a: Any, lp_b: Any, top_a: Any, top_b: Any) -> None:
        d = position_divergences(lp_a, lp_b)
        top1, overlap = topk_agreement(top_a, top_b)
        row.update(js=float(d["js"].mean()), top1_agreement=float(top1.double().mean()), n_positions=len(top1))
        self.js.append(d["js"])
        self.kl_ab.append(d["kl_ab"])
        self.kl_ba.append(d["kl_ba"])
        self.top1.append(top1.double())
        self.overlap.append(overlap)

    def write(self, out: BehaviourResult, **extra: Any) -> None:
        import torch

        js = torch.cat(self.js)
        out.update(js_divergence=float(js.mean()), js_divergence_max=float(js.max()),
                   kl_ab=float(torch.cat(self.kl_ab).mean()), kl_ba=float(torch.cat(self.kl_ba).mean()),
                   top1_agreement=float(torch.cat(self.top1).mean()),
                   topk_overlap=float(torch.cat(self.overlap).mean()), n_positions=int(js.numel()), **extra)


MIN_SHARED_TOKENS = 256


def _shared_vocab_logit_metrics(out: BehaviourResult, rows: list[dict[str, Any]], a: ModelOutputs,
                                b: ModelOutputs, why: str | None, settings: BehaviourSettings) -> None:
    """Token metrics when the vocabularies differ: over the byte-identical shared tokens, renormalised, at
    positions where both tokenisations of a prompt end on the same byte (so both predict what follows the
    same text)."""
    import torch

    from modelkin.tokenizer.canonical import canonical_bytes

    shared, unusable = shared_vocabulary(a, b)
    if shared is None:
        out.skipped["logits"] = f"{why}; {unusable}"
        return
    special_a, special_b = a.special_ids or set(), b.special_ids or set()
    bytes_a = canonical_bytes(a.vocab_pieces, special_ids=special_a, style=shared.style_a)
    bytes_b = canonical_bytes(b.vocab_pieces, special_ids=special_b, style=shared.style_b)
    ids_a, ids_b = torch.as_tensor(shared.ids_a), torch.as_tensor(shared.ids_b)
    k = min(settings.top_k, len(shared))
    acc, unaligned = _PositionMetrics(), 0
    for i, row in enumerate(rows):
        text = row["prompt"].encode("utf-8")
        pos_a = _byte_boundaries(a.prompt_ids[i], bytes_a, text)
        pos_b = _byte_boundaries(b.prompt_ids[i], bytes_b, text)
        common = sorted(set(pos_a) & set(pos_b)) if pos_a is not None and pos_b is not None else []
        if not common:
            unaligned += 1
            continue
        lp_a = a.logprobs[i][torch.as_tensor([pos_a[c] for c in common])][:, ids_a].float().log_softmax(-1)
        lp_b = b.logprobs[i][torch.as_tensor([pos_b[c] for c in common])][:, ids_b].float().log_softmax(-1)
        acc.add(row, lp_a, lp_b, lp_a.topk(k, dim=-1).indices, lp_b.topk(k, dim=-1).indices)
    if unaligned:
        out.skipped["logits_prompts"] = (f"{unaligned} prompt(s) with no position where both tokenisations "
                                         "end on the same byte")
    if not acc.js:
        out.skipped["logits"] = f"{why}; no prompt position where both tokenisations end on the same byte"
        return
    n = sum(len(js) for js in acc.js)
    acc.write(out, token_vocabulary={"kind": "shared byte-identical tokens, renormalised", "shared": len(shared),
                                     "vocab_a": shared.vocab_a, "vocab_b": shared.vocab_b,
                                     "raw_string_overlap": shared.raw_string_overlap, "aligned_positions": n})


def shared_vocabulary(a: ModelOutputs, b: ModelOutputs) -> tuple[Any, str | None]:
    """(byte-identical shared tokens of A and B within their output layers, None) or (None, why not)."""
    from modelkin.tokenizer.canonical import shared_tokens

    if a.vocab_pieces is None or b.vocab_pieces is None:
        return None, "a model's vocabulary is unknown"
    shared = shared_tokens(a.vocab_pieces, b.vocab_pieces, special_a=a.special_ids or set(),
                           special_b=b.special_ids or set(), rows_a=a.logits_size, rows_b=b.logits_size)
    if len(shared) < MIN_SHARED_TOKENS:
        return None, f"only {len(shared)} byte-identical shared tokens (need {MIN_SHARED_TOKENS})"
    return shared, None


def _byte_boundaries(ids: Sequence[int], token_bytes: Sequence[bytes | None], text: bytes) -> dict[int, int] | None:
    """Byte offset in ``text`` after each token -> the last position ending there; None when the tokens do
    not spell ``text`` (a SentencePiece dummy-prefix space is allowed)."""
    spelled = b"".join((token_bytes[i] or b"") if 0 <= i < len(token_bytes) else b"" for i in ids)
    if spelled == text:
        skip = 0
    elif spelled == b" " + text:
        skip = 1
    else:
        return None
    ends, offset = {}, -skip
    for t, i in enumerate(ids):
        offset += len((token_bytes[i] or b"") if 0 <= i < len(token_bytes) else b"")
        if offset >= 0:
            ends[offset] = t
    return ends


def _common_vocab(lp_a: Any, lp_b: Any) -> tuple[Any, Any]:
    """Identical tokenizers but padded output layers of different widths: compare the shared ids."""
    n = min(lp_a.shape[-1], lp_b.shape[-1])
    if lp_a.shape[-1] == lp_b.shape[-1]:
        return lp_a, lp_b
    return lp_a[:, :n].float().log_softmax(-1), lp_b[:, :n].float().log_softmax(-1)


def _greedy_metrics(out: BehaviourResult, rows: list[dict[str, Any]], a: ModelOutputs, b: ModelOutputs,
                    same: bool, why: str | None, settings: BehaviourSettings) -> None:
    out.update(greedy_text_similarity=None, greedy_exact_match=None, greedy_token_agreement=None,
               greedy_prefix_tokens=None, greedy_tokens=settings.greedy_tokens)
    if not settings.wants("greedy"):
        out.skipped["greedy"] = "not requested"
        return
    sims, exact, agree, prefix = [], [], [], []
    for i, row in enumerate(rows):
        ta, tb = a.greedy_text[i], b.greedy_text[i]
        sim = text_similarity(ta, tb)
        row.update(greedy_a=ta, greedy_b=tb, greedy_text_similarity=sim)
        sims.append(sim)
        exact.append(ta == tb)
        if same:
            frac, pre = greedy_token_agreement(a.greedy_ids[i], b.greedy_ids[i])
            row.update(greedy_token_agreement=frac)
            agree.append(frac)
            prefix.append(pre)
    out.update(greedy_text_similarity=_mean(sims), greedy_exact_match=_mean([float(e) for e in exact]))
    if same:
        out.update(greedy_token_agreement=_mean(agree), greedy_prefix_tokens=_mean(prefix))
    else:
        out.skipped["greedy_tokens"] = why


def _bpb_metrics(out: BehaviourResult, rows: list[dict[str, Any]], a: ModelOutputs, b: ModelOutputs,
                 settings: BehaviourSettings) -> None:
    out.update(bpb_a=None, bpb_b=None, bpb_correlation=None, bpb_p_value=None, bpb_spearman=None,
               bpb_spearman_p_value=None)
    if not settings.wants("bpb"):
        out.skipped["bpb"] = "not requested"
        return
    pairs = []
    for i, row in enumerate(rows):
        row.update(bpb_a=a.bpb[i], bpb_b=b.bpb[i])
        if a.bpb[i] is not None and b.bpb[i] is not None:
            pairs.append((a.bpb[i], b.bpb[i]))
    if pairs:
        out.update(bpb_a=_mean([x for x, _ in pairs]), bpb_b=_mean([y for _, y in pairs]))
    if len(pairs) < 3:
        out.skipped["bpb_correlation"] = f"needs at least 3 scored texts, got {len(pairs)}"
        return
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    pearson = correlation_test(xs, ys, method="pearson", permutations=settings.permutations, seed=settings.seed)
    spearman = correlation_test(xs, ys, method="spearman", permutations=settings.permutations,
                                seed=settings.seed + 1)
    out.update(bpb_correlation=pearson.statistic, bpb_p_value=pearson.p_value,
               bpb_spearman=spearman.statistic, bpb_spearman_p_value=spearman.p_value, bpb_texts=len(pairs))


def _mmd_metric(out: BehaviourResult, a: ModelOutputs, b: ModelOutputs, same: bool,
                settings: BehaviourSettings) -> None:
    out.mmd = None
    if not settings.wants("mmd") or not a.sample_ids or not b.sample_ids:
        out.skipped["mmd"] = "not requested" if not settings.wants("mmd") else "no sampled continuations"
        return
    if settings.mmd_samples < 2:
        out.skipped["mmd"] = "needs at least 2 samples per prompt"
        return
    if same:
        xs, ys, length, kernel = a.sample_ids, b.sample_ids, settings.mmd_tokens, "hamming over tokens"
    else:  # different vocabularies: compare characters of the decoded text
        xs = [[[ord(c) for c in t] for t in texts] for texts in a.sample_text]
        ys = [[[ord(c) for c in t] for t in texts] for texts in b.sample_text]
        length, kernel = 4 * settings.mmd_tokens, "hamming over characters"
    test = mmd_test(xs, ys, length=length, permutations=settings.permutations, seed=settings.seed + 2)
    out.mmd = {"statistic": test.statistic, "p_value": test.p_value, "kernel": kernel, "length": length,
                  "n_prompts": len(xs), "n_samples": settings.mmd_samples, "permutations": test.permutations,
                  "temperature": settings.temperature,
                  "null": "both models draw continuations from the same distribution"}


def _routing_metric(out: BehaviourResult, a: ModelOutputs, b: ModelOutputs, settings: BehaviourSettings) -> None:
    out.routing = None
    out.routing_a = a.routing
    out.routing_b = b.routing
    if not settings.wants("routing"):
        out.skipped["routing"] = "not requested"
    elif not (a.is_moe and b.is_moe):
        dense = [n for n, o in (("A", a), ("B", b)) if not o.is_moe]
        out.skipped["routing"] = f"model {' and '.join(dense)} {'is' if len(dense) == 1 else 'are'} dense"
    else:
        sim, why = routing_similarity(a.routing, b.routing)
        out.routing = sim
        if why:
            out.skipped["routing"] = why


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None
