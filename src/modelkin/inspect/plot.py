"""Per-layer std curves (q/k/v/o and the MLP roles) as a PNG, the picture the HonestAGI claim used."""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict

from modelkin.inspect.report import InspectionResult

ATTENTION_CURVES = ("q", "k", "v", "o")
MLP_CURVES = ("gate", "up", "down", "shared_gate", "shared_up", "shared_down",
              "expert_gate", "expert_up", "expert_down")


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modelkin.utils import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, roles, title in ((axes[0], ATTENTION_CURVES, "attention"),
                             (axes[1], MLP_CURVES, "MLP")):
        curves = std_curves(result, roles)
        for role, (layers, stds) in curves.items():
            ax.plot(layers, stds, marker="o", markersize=3, label=role)
        ax.set_title(f"{title}: std of weights per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("std")
        if curves:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no tensors selected", ha="center", transform=ax.transAxes)
    fig.suptitle(os.path.basename(result.path.rstrip("/")))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
