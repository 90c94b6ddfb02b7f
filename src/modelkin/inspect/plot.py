"""Std-curve drawing (per-layer std of q/k/v/o and the MLP roles), the picture the HonestAGI claim used.

The one owner of std-curve plotting: `inspect --plot` draws one model here, and compare's report and
`fingerprint --plot` overlay two models with the same helpers (matplotlib's object API, no pyplot).
"""

from __future__ import annotations

import io
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from modelkin.inspect.report import InspectionResult

ATTENTION_CURVES = ("q", "k", "v", "o")
MLP_CURVES = ("gate", "up", "down", "shared_gate", "shared_up", "shared_down",
              "expert_gate", "expert_up", "expert_down")


def zscore(values: Sequence[float]) -> list[float]:
    """(v - mean) / population std; all zeros for a constant curve."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return [(v - mean) / sd if sd > 0 else 0.0 for v in values]


def relative_depth(n: int) -> list[float]:
    """x positions 0..1 for n layers, so models of different depth line up."""
    return [i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def draw_curves(ax: Any, series: Iterable[tuple[str, Sequence[float], Sequence[float], dict[str, Any]]], *,
                title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    """One panel: each (label, xs, ys, plot options) as a line; a note when there is nothing to draw."""
    drawn = False
    for label, xs, ys, style in series:
        ax.plot(xs, ys, label=label, **{"marker": "o", "markersize": 3, **style})
        drawn = True
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no tensors selected", ha="center", transform=ax.transAxes)
    elif legend:
        ax.legend(fontsize=7, loc="best")


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib Figure (rendered into memory). A figure with a layout engine (constrained)
    already fits its canvas: no "tight" bounding box, which would draw it twice (~25 % of the time)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=None if fig.get_layout_engine() is not None else "tight")
    return buf.getvalue()


def std_curves(result: InspectionResult, roles: tuple[str, ...]) -> dict[str, tuple[list, list]]:
    """role -> (layers, std per layer); experts of a layer are averaged."""
    per: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for t in result.tensors:
        if t.role in roles and t.layer is not None and math.isfinite(t.std):
            per[t.role][t.layer].append(t.std)
    return {role: (sorted(per[role]), [statistics.fmean(per[role][k]) for k in sorted(per[role])])
            for role in roles if role in per}


def plot_std_curves(result: InspectionResult, path: str | os.PathLike) -> None:
    """Write a two-panel PNG: std per layer for attention projections and for MLP roles."""
    from matplotlib.figure import Figure

    from modelkin.utils import atomic_write_bytes

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    for ax, roles, title in zip(fig.subplots(1, 2), (ATTENTION_CURVES, MLP_CURVES), ("attention", "MLP")):
        series = [(role, layers, stds, {}) for role, (layers, stds) in std_curves(result, roles).items()]
        draw_curves(ax, series, title=f"{title}: std of weights per layer", xlabel="layer", ylabel="std")
    fig.suptitle(os.path.basename(result.path.rstrip("/")))
    atomic_write_bytes(path, figure_png(fig, dpi=110))
