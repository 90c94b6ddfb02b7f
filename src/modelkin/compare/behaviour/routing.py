"""Similarity of two MoE models' routing telemetry (tokens per expert and routing entropy per layer)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def routing_layers(summary: Any) -> dict[int, dict[str, Any]]:
    """Normalise a routing summary to {layer: {"counts": [tokens per expert], "entropy": float | None}}.

    Accepts {"layers": [{"layer": i, "expert_counts"|"tokens_per_expert"|"counts": [...],
    "token_entropy"|"entropy": x}]} (modelkin's RoutingTelemetry.to_json()),
    a list of such entries, or a mapping from layer index to an entry.
    """
    if not summary:
        return {}
    entries: Any = summary.get("layers", summary) if isinstance(summary, Mapping) else summary
    items: list[tuple[Any, Any]]
    if isinstance(entries, Mapping):
        items = list(entries.items())
    else:
        items = [(e.get("layer", i) if isinstance(e, Mapping) else i, e) for i, e in enumerate(entries)]
    layers: dict[int, dict[str, Any]] = {}
    for key, entry in items:
        if not isinstance(entry, Mapping):
            continue
        counts = next((entry[k] for k in ("tokens_per_expert", "expert_counts", "counts") if k in entry), None)
        if counts is None:
            continue
        try:
            layer = int(key)
        except (TypeError, ValueError):
            continue
        entropy = next((entry[k] for k in ("token_entropy", "entropy", "routing_entropy") if k in entry), None)
        layers[layer] = {"counts": [float(c) for c in _flat(counts)],
                         "entropy": float(entropy) if entropy is not None else None}
    return layers


def _flat(counts: Any) -> list[float]:
    if hasattr(counts, "tolist"):
        counts = counts.tolist()
    out: list[float] = []
    for c in counts:
        out.extend(_flat(c) if isinstance(c, (list, tuple)) else [c])
    return out


def load_js(p_counts: Sequence[float], q_counts: Sequence[float]) -> float:
    """Jensen-Shannon divergence (bits) between two expert-load distributions."""
    sp, sq = sum(p_counts), sum(q_counts)
    if sp <= 0 or sq <= 0:
        return math.nan
    js = 0.0
    for x, y in zip(p_counts, q_counts):
        p, q = x / sp, y / sq
        m = 0.5 * (p + q)
        if p > 0:
            js += 0.5 * p * math.log2(p / m)
        if q > 0:
            js += 0.5 * q * math.log2(q / m)
    return max(js, 0.0)


def routing_similarity(a: Any, b: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Compare two routing summaries layer by layer; (result, reason when nothing is comparable).

    Result: per-layer load JS (expert ids as given), load JS after sorting loads (invariant to a
    relabelling of experts), the entropy of each side, and the Pearson r of the entropy profiles.
    """
    la, lb = routing_layers(a), routing_layers(b)
    if not la or not lb:
        return None, "routing telemetry is missing for a model"
    common = sorted(i for i in set(la) & set(lb) if len(la[i]["counts"]) == len(lb[i]["counts"]))
    if not common:
        return None, "no layer has the same number of experts in both models"
    per_layer = []
    for i in common:
        ca, cb = la[i]["counts"], lb[i]["counts"]
        per_layer.append({"layer": i, "load_js": load_js(ca, cb),
                          "sorted_load_js": load_js(sorted(ca), sorted(cb)),
                          "entropy_a": la[i]["entropy"], "entropy_b": lb[i]["entropy"]})
    ent = [(r["entropy_a"], r["entropy_b"]) for r in per_layer
           if r["entropy_a"] is not None and r["entropy_b"] is not None]
    result = {
        "layers_compared": len(common),
        "load_js_mean": _mean([r["load_js"] for r in per_layer]),
        "sorted_load_js_mean": _mean([r["sorted_load_js"] for r in per_layer]),
        "entropy_correlation": _pearson([x for x, _ in ent], [y for _, y in ent]) if len(ent) >= 3 else None,
        "per_layer": per_layer,
    }
    return result, None


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None
