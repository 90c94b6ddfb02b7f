"""Plot of two models' std curves overlaid per projection (matplotlib object API, PNG)."""

from __future__ import annotations

import io
from pathlib import Path

from modelkin.compare.fingerprints.std_curve import StdCurves, normalise
from modelkin.utils import atomic_write_bytes

PROJECTIONS = ("q", "k", "v", "o")


def std_curves_png(a: StdCurves, b: StdCurves, *, title: str = "", r: dict[str, float] | None = None) -> bytes:
    """PNG bytes: one panel per projection, both models' z-scored std curves over relative depth."""
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend switch

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    for ax, proj in zip(axes.flat, PROJECTIONS):
        for curves, style in ((a, "-o"), (b, "--s")):
            if proj in curves.curves:
                y = normalise(curves.curves[proj])
                x = [i / max(1, len(y) - 1) for i in range(len(y))]
                ax.plot(x, y, style, markersize=3, linewidth=1.2, label=f"{curves.label} ({len(y)} layers)")
        heading = f"{proj}_proj"
        if r and proj in r:
            heading += f"   r = {r[proj]:.3f}"
        ax.set_title(heading, fontsize=10)
        ax.set_ylabel("std (z-score over layers)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("relative depth", fontsize=8)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_std_curves_plot(a: StdCurves, b: StdCurves, path: str | Path, **kwargs) -> None:
    """Write std_curves_png to ``path`` atomically."""
    atomic_write_bytes(path, std_curves_png(a, b, **kwargs))
