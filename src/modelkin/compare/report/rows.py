"""What the terminal and HTML views of a comparison both show: number formatting and the behaviour rows."""

from __future__ import annotations

import math
from typing import Any

from modelkin.compare.behaviour.result import BehaviourResult

BEHAVIOUR_ROWS = (
    ("js_divergence", "next-token JS divergence, mean over positions (bits)"),
    ("js_divergence_max", "next-token JS divergence, max (bits)"),
    ("kl_ab", "KL(A‖B), mean (bits)"),
    ("kl_ba", "KL(B‖A), mean (bits)"),
    ("top1_agreement", "top-1 agreement"),
    ("topk_overlap", "top-k overlap"),
    ("greedy_token_agreement", "greedy continuations: token agreement"),
    ("greedy_exact_match", "greedy continuations: identical text (fraction of prompts)"),
    ("greedy_text_similarity", "greedy continuations: character similarity"),
    ("bpb_a", "bits per byte, A (mean)"),
    ("bpb_b", "bits per byte, B (mean)"),
    ("bpb_correlation", "bits-per-byte Pearson r across texts"),
    ("bpb_p_value", "  permutation p-value (one-sided)"),
    ("bpb_spearman", "bits-per-byte Spearman ρ across texts"),
    ("bpb_spearman_p_value", "  permutation p-value (one-sided)"),
)
_LOGIT_KEYS = ("js_divergence", "js_divergence_max", "kl_ab", "kl_ba", "top1_agreement", "topk_overlap")


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: None -> '–', small p-values in scientific notation (text is returned as is)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value != 0 and abs(value) < 10 ** -(digits - 1):
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def behaviour_rows(b: BehaviourResult) -> list[tuple[str, Any, str]]:
    """(label, value, note) rows shared by the HTML table and the terminal summary."""
    skipped = b.skipped or {}
    rows = []
    for key, label in BEHAVIOUR_ROWS:
        value = getattr(b, key)
        note = ""
        if value is None:
            group = "logits" if key in _LOGIT_KEYS else key.split("_")[0]
            note = skipped.get(group) or skipped.get("greedy_tokens" if group == "greedy" else key) or ""
        if key == "topk_overlap":
            label = f"top-{b.top_k if b.top_k is not None else 'k'} overlap"
        rows.append((label, value, note))
    mmd = b.mmd
    if mmd:
        rows.append((f"MMD² ({mmd['kernel']}, {mmd['n_prompts']}×{mmd['n_samples']} samples)", mmd["statistic"], ""))
        rows.append(("  permutation p-value (H0: same distribution)", mmd["p_value"], ""))
    else:
        rows.append(("two-sample MMD test", None, skipped.get("mmd", "")))
    routing = b.routing
    if routing:
        rows.append(("routing: expert-load JS, mean over layers (bits)", routing.get("load_js_mean"), ""))
        rows.append(("routing: entropy-profile correlation", routing.get("entropy_correlation"), ""))
    else:
        rows.append(("MoE routing similarity", None, skipped.get("routing", "")))
    return rows
