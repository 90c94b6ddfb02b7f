"""Figures of a comparison report as PNG bytes (matplotlib's object API: no pyplot, no global state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modelkin.compare.behaviour.result import BehaviourResult
from modelkin.compare.behaviour.routing import routing_layers
from modelkin.inspect.plot import ATTENTION_CURVES, draw_curves, figure_png, relative_depth, zscore

COLOURS = {"a": "#1f5fa8", "b": "#d9541e"}
STYLES = {"a": {"lw": 2.6, "ls": "-", "alpha": 0.55}, "b": {"lw": 1.3, "ls": "--", "alpha": 1.0}}  # overlap stays visible


def std_curves_png(curves_a: Mapping[str, Sequence[float]], curves_b: Mapping[str, Sequence[float]],
                   labels: tuple[str, str], *, r: Mapping[str, float] | None = None,
                   title: str = "") -> bytes | None:
    """Both models' z-scored per-layer std curves overlaid, one panel per projection (q, k, v, o).

    ``curves_a``/``curves_b`` map a projection to its per-layer std; depth is drawn as a fraction of the
    model's layers so models of different depth line up; ``r`` adds each projection's correlation.
    """
    from matplotlib.figure import Figure

    roles = [p for p in ATTENTION_CURVES if p in curves_a and p in curves_b]
    if not roles:
        return None
    fig = Figure(figsize=(12, 3.2), layout="constrained")
    axes = fig.subplots(1, len(roles), squeeze=False)[0]
    for i, (ax, role) in enumerate(zip(axes, roles)):
        series = []
        for side, curves, label in (("a", curves_a, labels[0]), ("b", curves_b, labels[1])):
            values = list(curves[role])
            series.append((label, relative_depth(len(values)), zscore(values),
                           {"color": COLOURS[side], "markersize": 2.5, **STYLES[side]}))
        heading = f"{role}_proj std (z-scored)" + (f"   r = {r[role]:.3f}" if r and role in r else "")
        draw_curves(ax, series, title=heading, xlabel="depth (fraction of layers)", ylabel="", legend=i == 0)
    if title:
        fig.suptitle(title, fontsize=11)
    return figure_png(fig)


STRATUM_COLOURS = ("#2a9d4a", "#8e44ad", "#7f8c8d", "#b8860b", "#17becf", "#1f5fa8")


def strip_png(methods: Sequence[tuple[str, float, Mapping[str, Sequence[float]]]], *,
              title: str = "") -> bytes | None:
    """Per method, one lane per stratum of background (unrelated-pair) scores as dots, and the observed
    score of this pair as a red line: where the score falls among real unrelated pairs.

    ``methods``: (name, observed score, {stratum: scores}); methods without background scores are left out.
    """
    from matplotlib.figure import Figure

    rows = [(n, obs, {k: list(v) for k, v in strata.items() if len(v)}) for n, obs, strata in methods
            if obs is not None and any(len(v) for v in strata.values())]
    if not rows:
        return None
    lanes = sorted({k for _, _, strata in rows for k in strata})
    colour = {k: STRATUM_COLOURS[i % len(STRATUM_COLOURS)] for i, k in enumerate(lanes)}
    fig = Figure(figsize=(10, 0.5 + 1.1 * len(rows) * max(1, len(lanes)) ** 0.5), layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    rng = np.random.default_rng(0)  # jitter only: the same picture every time
    for ax, (name, observed, strata) in zip(axes, rows):
        for y, (stratum, scores) in enumerate(strata.items()):
            jitter = rng.uniform(-0.25, 0.25, len(scores))
            ax.scatter(scores, y + jitter, s=7, alpha=0.55, color=colour[stratum])
        ax.axvline(observed, color="#b3261e", lw=2)
        lo, hi = ax.get_xlim()
        right = observed > (lo + hi) / 2  # label on the side with room
        ax.annotate(f"this pair {observed:.4g}", (observed, len(strata) - 0.5), color="#b3261e", fontsize=7,
                    xytext=(-3 if right else 3, 0), textcoords="offset points", va="center",
                    ha="right" if right else "left")
        ax.set_yticks(range(len(strata)))
        ax.set_yticklabels([f"{k} (N={len(v)})" for k, v in strata.items()], fontsize=7)
        ax.set_ylim(-0.6, len(strata) - 0.4)
        ax.set_title(f"{name}: score of this pair among unrelated pairs", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_png(fig)


def bpb_scatter_png(rows: Sequence[Mapping[str, Any]], labels: tuple[str, str]) -> bytes | None:
    """Bits per byte of each text under A (x) and B (y), coloured by category."""
    from matplotlib.figure import Figure

    pts = [(r["bpb_a"], r["bpb_b"], r.get("category", "")) for r in rows
           if r.get("bpb_a") is not None and r.get("bpb_b") is not None]
    if not pts:
        return None
    fig = Figure(figsize=(4.6, 4), layout="constrained")
    ax = fig.subplots()
    cats = sorted({c for _, _, c in pts})
    cmap = ["#1f5fa8", "#d9541e", "#2a9d4a", "#8e44ad", "#c0392b", "#7f8c8d", "#b8860b", "#17becf"]
    for i, cat in enumerate(cats):
        xs = [x for x, _, c in pts if c == cat]
        ys = [y for _, y, c in pts if c == cat]
        ax.scatter(xs, ys, s=18, color=cmap[i % len(cmap)], label=cat)
    lo = min(min(x, y) for x, y, _ in pts)
    hi = max(max(x, y) for x, y, _ in pts)
    ax.plot([lo, hi], [lo, hi], color="#999", lw=0.8, ls="--")
    ax.set_xlabel(f"bits per byte, {labels[0]}", fontsize=8)
    ax.set_ylabel(f"bits per byte, {labels[1]}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    return figure_png(fig)


def per_prompt_png(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Per prompt: mean next-token JS divergence (when measured) and greedy text similarity."""
    from matplotlib.figure import Figure

    js = [r.get("js") for r in rows]
    sim = [r.get("greedy_text_similarity") for r in rows]
    panels = [(v, t, c) for v, t, c in ((js, "mean JS divergence (bits)", COLOURS["a"]),
                                        (sim, "greedy text similarity", COLOURS["b"]))
              if any(x is not None for x in v)]
    if not panels:
        return None
    fig = Figure(figsize=(10, 2.2 * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
    for ax, (values, title, colour) in zip(axes, panels):
        ax.bar(range(len(values)), [v if v is not None else 0.0 for v in values], color=colour)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(ids)))
        ax.set_xticklabels(ids, rotation=70, fontsize=6)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    return figure_png(fig)


def routing_png(behaviour: BehaviourResult, labels: tuple[str, str]) -> bytes | None:
    """Mean router entropy per layer for each MoE side (nats)."""
    from matplotlib.figure import Figure

    series = [(side, routing_layers(getattr(behaviour, f"routing_{side}"))) for side in ("a", "b")]
    series = [(s, layers) for s, layers in series if layers and any(v["entropy"] is not None for v in layers.values())]
    if not series:
        return None
    fig = Figure(figsize=(6, 2.6), layout="constrained")
    ax = fig.subplots()
    for side, layers in series:
        xs = sorted(layers)
        ax.plot(xs, [layers[i]["entropy"] for i in xs], color=COLOURS[side], marker="o", ms=3,
                label=labels[0 if side == "a" else 1])
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("router entropy (nats)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return figure_png(fig)
