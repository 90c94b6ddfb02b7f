"""Inspection results: per-tensor records, totals, MoE summaries, and their JSON / CSV / table forms."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from modelkin.inspect.stats import STAT_KEYS

SPECTRAL_KEYS = ("spectral_norm", "stable_rank", "effective_rank", "alpha", "alpha_weighted",
                 "log_spectral_norm", "xmin", "ks_distance", "n_tail", "n_evals", "exact")


@dataclass(slots=True)
class TensorStats:
    """Statistics of one tensor. `stats` has the STAT_KEYS; `spectral` is None unless asked for,
    a dict of SPECTRAL_KEYS for a matrix, or {"experts": {index: dict}} for stacked experts."""

    name: str
    role: str
    layer: int | None
    expert: int | None
    shape: tuple[int, ...]
    dtype: str
    numel: int
    stats: dict[str, Any]
    spectral: dict[str, Any] | None = None

    @property
    def std(self) -> float:
        return self.stats["std_population"]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "role": self.role, "layer": self.layer, "expert": self.expert,
            "shape": list(self.shape), "dtype": self.dtype, "numel": self.numel,
        }
        out.update({k: self.stats.get(k) for k in STAT_KEYS})
        if self.spectral is not None:
            out["spectral"] = self.spectral
        return out


@dataclass(slots=True)
class InspectionResult:
    """What `inspect_checkpoint` returns.

    Attributes:
        path: the checkpoint; format: safetensors/gguf/torch/onnx.
        tensors: the selected tensors, in checkpoint order.
        totals: bytes_read, seconds, gb_per_s, device, counts and the MoE summary (or None).
        unknown: names whose role could not be determined (reported, still inspected).
    """

    path: str
    format: str
    select: str
    tensors: list[TensorStats]
    totals: dict[str, Any]
    unknown: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, TensorStats]:
        return {t.name: t for t in self.tensors}

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "select": self.select,
            "totals": self.totals, "unknown_roles": self.unknown,
            "tensors": [t.to_json() for t in self.tensors],
        }

    def to_csv(self) -> str:
        """One row per tensor (per expert slice for stacked spectral results is not flattened)."""
        spectral = any(isinstance(t.spectral, dict) and "alpha" in t.spectral for t in self.tensors)
        cols = ["name", "role", "layer", "expert", "shape", "dtype", "numel", *STAT_KEYS]
        cols += [f"spectral_{k}" for k in SPECTRAL_KEYS] if spectral else []
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(cols)
        for t in self.tensors:
            row = [t.name, t.role, _blank(t.layer), _blank(t.expert), "x".join(map(str, t.shape)),
                   t.dtype, t.numel, *(_cell(t.stats.get(k)) for k in STAT_KEYS)]
            if spectral:
                sp = t.spectral if t.spectral and "alpha" in t.spectral else {}
                row += [_cell(sp.get(k)) for k in SPECTRAL_KEYS]
            writer.writerow(row)
        return buf.getvalue()

    def summary(self) -> str:
        """A few plain-text lines: what was read, how fast, the MoE summary."""
        t = self.totals
        lines = [
            (f"{self.path} ({self.format}): {len(self.tensors)} tensors, "
             f"{t['params_selected']:,} parameters selected ({self.select})"),
            (f"read {t['bytes_read'] / 1e9:.3f} GB in {t['seconds']:.2f} s "
             f"({t['gb_per_s']:.2f} GB/s) on {t['device']}; {t['tensors_from_cache']} from cache"),
        ]
        moe = t.get("moe")
        if moe:
            lines.append(f"MoE: {moe['num_experts']} experts, top-{moe['experts_per_token']}: "
                         f"{moe['total_params']:,} total, {moe['active_params']:,} active parameters")
        if self.unknown:
            lines.append(f"{len(self.unknown)} tensors with unknown role, e.g. {self.unknown[0]}")
        return "\n".join(lines)


def _blank(v: Any) -> Any:
    return "" if v is None else v


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "" if v is None else str(v)
    return repr(v) if isinstance(v, float) else v


def _config_int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def moe_summary(infos: list[tuple[str, Any, tuple[int, ...]]], config: dict[str, Any],
                tensors: list[TensorStats]) -> dict[str, Any] | None:
    """Total vs active parameters (from all tensors' shapes) and per-expert std spread.

    Args:
        infos: (name, NameRole, shape) of every tensor in the checkpoint.
        config: HF config (num_experts_per_tok, num_experts / num_local_experts).
        tensors: inspected tensors, for the std spread across experts.
    Returns:
        None for a dense checkpoint.
    """
    expert_params, total, experts = 0, 0, defaultdict(set)
    for name, role, shape in infos:
        numel = math.prod(shape)
        total += numel
        if role.role.startswith("expert_"):
            expert_params += numel
            if role.expert is not None:
                experts[role.layer].add(role.expert)
            elif len(shape) == 3:
                experts[role.layer].update(range(shape[0]))
    if expert_params == 0:
        return None
    num = _config_int(config, "num_experts", "num_local_experts", "n_routed_experts")
    num = num or max((len(v) for v in experts.values()), default=0)
    top_k = _config_int(config, "num_experts_per_tok", "moe_top_k")
    active = total - expert_params + (expert_params * top_k // num if top_k and num else 0)
    return {
        "num_experts": num, "experts_per_token": top_k, "moe_layers": len(experts),
        "total_params": total, "expert_params": expert_params,
        "active_params": active if top_k else None,
        "expert_std_spread": expert_std_spread(tensors),
    }


def expert_std_spread(tensors: list[TensorStats]) -> list[dict[str, Any]]:
    """Per (layer, expert role): how much the experts' std differ (min, max, mean, cv)."""
    groups: dict[tuple[int, str], list[float]] = defaultdict(list)
    for t in tensors:
        if t.expert is not None and t.role.startswith("expert_") and math.isfinite(t.std):
            groups[(t.layer, t.role)].append(t.std)
    rows = []
    for (layer, role), stds in sorted(groups.items()):
        mean = statistics.fmean(stds)
        cv = statistics.pstdev(stds) / mean if mean > 0 and len(stds) > 1 else 0.0
        rows.append({"layer": layer, "role": role, "n_experts": len(stds), "std_min": min(stds),
                     "std_max": max(stds), "std_mean": mean, "std_cv": cv})
    return rows


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


ROLE_ORDER = ("embed", "attn_norm", "q", "q_bias", "k", "k_bias", "v", "v_bias", "qkv", "o",
              "o_bias", "q_norm", "k_norm", "rotary_inv_freq", "mlp_norm", "pre_mlp_norm", "gate",
              "up", "gate_up", "down", "router", "router_bias", "router_scale", "shared_router",
              "shared_gate", "shared_up", "shared_down", "expert_gate", "expert_up",
              "expert_gate_up", "expert_down", "post_mlp_norm", "final_norm", "lm_head")


def _row_key(layer: int | None, role: str) -> tuple:
    rank = ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)
    band = 1 if layer is not None else (0 if rank <= ROLE_ORDER.index("embed") else 2)
    return (band, layer or 0, rank, role)


def _group_rows(tensors: list[TensorStats]) -> list[tuple[str, str, list[TensorStats]]]:
    """(layer label, role, tensors) by layer then role; experts of one role collapse into a row."""
    groups: dict[tuple[Any, str], list[TensorStats]] = {}
    for t in tensors:
        groups.setdefault((t.layer, t.role), []).append(t)
    ordered = sorted(groups.items(), key=lambda item: _row_key(*item[0]))
    return [("-" if layer is None else str(layer), role, ts) for (layer, role), ts in ordered]


def render_table(result: InspectionResult, console: Any, *, max_rows: int = 2000) -> None:
    """Print a rich table grouped by layer and role (experts of a role summarised in one row)."""
    from rich.table import Table

    spectral = any(t.spectral and "alpha" in t.spectral for t in result.tensors)
    table = Table(title=f"{result.path}", show_lines=False, header_style="bold")
    for col in ("layer", "role", "n", "shape", "dtype", "mean", "std", "rms", "absmax",
                "kurt(excess)", "zeros"):
        table.add_column(col, justify="left" if col in ("role", "shape", "dtype") else "right")
    if spectral:
        table.add_column("alpha", justify="right")
        table.add_column("stable rank", justify="right")
    rows = _group_rows(result.tensors)
    for layer, role, ts in rows[:max_rows]:
        first = ts[0]
        stds = [t.std for t in ts if math.isfinite(t.std)]
        std = _fmt(statistics.fmean(stds)) if stds else "-"
        if len(stds) > 1:
            std += f" [{_fmt(min(stds), '.3g')}..{_fmt(max(stds), '.3g')}]"

        def mean_of(key: str, ts: list[TensorStats] = ts) -> float:
            vals = [t.stats[key] for t in ts if t.stats[key] is not None and math.isfinite(t.stats[key])]
            return statistics.fmean(vals) if vals else math.nan

        numel = sum(t.numel for t in ts)
        zeros = sum(t.stats["zero_count"] for t in ts) / numel if numel else math.nan
        shape = "x".join(map(str, first.shape)) + (f" (x{len(ts)})" if len(ts) > 1 else "")
        cells = [layer, role, str(len(ts)), shape, first.dtype, _fmt(mean_of("mean"), ".3g"), std,
                 _fmt(mean_of("rms"), ".3g"), _fmt(max(t.stats["absmax"] for t in ts), ".3g"),
                 _fmt(mean_of("kurtosis_excess"), ".3g"), _fmt(zeros, ".2%")]
        if spectral:
            sp = [t.spectral for t in ts if t.spectral and "alpha" in t.spectral]
            alphas = [s["alpha"] for s in sp if math.isfinite(s["alpha"])]
            ranks = [s["stable_rank"] for s in sp if math.isfinite(s["stable_rank"])]
            cells += [_fmt(statistics.fmean(alphas), ".3g") if alphas else "-",
                      _fmt(statistics.fmean(ranks), ".4g") if ranks else "-"]
        table.add_row(*cells, style="red" if role == "unknown" else None)
    if not console.is_terminal:  # a pipe or file: do not crop columns to 80 characters
        from rich.console import Console

        console = Console(file=console.file, width=170, highlight=False, soft_wrap=True)
    console.print(table)
    if len(rows) > max_rows:
        console.print(f"... {len(rows) - max_rows} more rows (use --csv or --json for all)")
    console.print(result.summary())
