"""HonestAGI's std-curve fingerprint, exactly as documented, with a surrogate-curve null and a library z-score.

Per layer: torch.std (unbiased, float64) of each q/k/v/o weight; each curve z-scored across layers
(population std); Pearson r per projection (the shorter model linearly interpolated onto the longer
depth, NaN -> 0); mean r; LeaFBench's score (mean r + 1) / 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import modelkin.compare.stats as sig
from modelkin.compare.fingerprints.result import MethodResult
from modelkin.compare.fingerprints.weights import ATTENTION_ROLES, ModelWeights, acc_dtype
from modelkin.errors import InputError
from modelkin.utils import atomic_write_text

NAME = "std_curve"
EXTRA_ROLES = ("q_bias", "k_bias", "v_bias", "attn_norm")
NULL_KIND = "descriptive"  # see result.NULL_KINDS
NULL = ("H0: B's z-scored per-layer std curves match A's no better than random curves of the same "
        "smoothness (multivariate phase-randomised and AAFT surrogates of each model's curves, keeping "
        "their power spectra and cross-correlations); p is the larger of the two surrogate p-values. "
        "Depth trends shared by unrelated model families are not in this null: with --null-library the "
        "z-score against unrelated models' curves is reported too.")
FORMAT = "modelkin-std-curves/1"


@dataclass
class StdCurves:
    """Per-layer std of each attention projection of one model (raw, not normalised)."""

    label: str
    layers: list[int]
    curves: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"label": self.label, "layers": self.layers, "curves": self.curves}

    @classmethod
    def from_json(cls, data: dict) -> StdCurves:
        return cls(label=str(data.get("label", "?")), layers=[int(i) for i in data["layers"]],
                   curves={k: [float(x) for x in v] for k, v in data["curves"].items()})

    def save(self, path: str | Path) -> None:
        """Write these curves as a one-model null-library file (atomic)."""
        save_curves([self], path)


def save_curves(models: list[StdCurves], path: str | Path) -> None:
    """Write std curves of several models to one JSON file (the --null-library format)."""
    text = json.dumps({"format": FORMAT, "models": [m.to_json() for m in models]}, indent=1)
    atomic_write_text(path, text + "\n")


def load_library(path: str | Path) -> list[StdCurves]:
    """Std curves from a JSON file written by save_curves, or from every *.json file in a directory.

    Raises:
        InputError: the path is missing or a file is not a std-curve library.
    """
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise InputError(f"null library {path} does not exist or holds no *.json files",
                         hint="write one with `modelkin fingerprint A B --save-curves FILE`")
    models: list[StdCurves] = []
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            models.extend(StdCurves.from_json(m) for m in data["models"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(f"{file} is not a std-curve library: {err}",
                             hint="write one with `modelkin fingerprint A B --save-curves FILE`") from None
    return models


def compute_std_curves(weights: ModelWeights, *, extra: bool = False) -> StdCurves:
    """torch.std (unbiased, float64 accumulation) of q/k/v/o per layer; reads only those tensors.

    With ``extra``, q/k/v biases and the attention norm (input_layernorm) weights get curves too
    where the checkpoint has them (HonestAGI README's "Update").
    """
    dtype = acc_dtype(weights.device)
    roles = ATTENTION_ROLES + (EXTRA_ROLES if extra else ())
    layers = [i for i in weights.layers if all(weights.has(i, r) for r in ATTENTION_ROLES)]
    curves: dict[str, list[float]] = {}
    for role in roles:
        if not all(weights.has(i, role) for i in layers):
            continue
        curves[role] = [float(torch.std(weights.get(i, role, dtype=dtype)).item()) for i in layers]
    return StdCurves(label=weights.label, layers=layers, curves=curves)


def normalise(curve: np.ndarray | list[float]) -> np.ndarray:
    """z-score across layers with the population std (all zeros for a constant curve)."""
    x = np.asarray(curve, dtype=np.float64)
    sd = x.std(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (x - x.mean(axis=-1, keepdims=True)) / sd
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def resample(curve: np.ndarray, length: int) -> np.ndarray:
    """Linear interpolation onto ``length`` points of a uniform grid (np.interp, LeaFBench's rule)."""
    x = np.asarray(curve, dtype=np.float64)
    if x.shape[-1] == length:
        return x
    grid_old, grid_new = np.linspace(0.0, 1.0, x.shape[-1]), np.linspace(0.0, 1.0, length)
    flat = x.reshape(-1, x.shape[-1])
    return np.stack([np.interp(grid_new, grid_old, row) for row in flat]).reshape(*x.shape[:-1], length)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis (broadcasting); NaN (a constant curve) -> 0."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.nan_to_num(r, nan=0.0)


def correlate(a: StdCurves, b: StdCurves, roles: tuple[str, ...] = ATTENTION_ROLES) -> dict[str, float]:
    """Pearson r per projection of two models' normalised curves (shorter one interpolated)."""
    length = max(len(a.layers), len(b.layers))
    out = {}
    for role in roles:
        if role in a.curves and role in b.curves:
            ca, cb = resample(normalise(a.curves[role]), length), resample(normalise(b.curves[role]), length)
            out[role] = float(pearson(ca, cb))
    return out


def _stack(c: StdCurves, roles: tuple[str, ...]) -> np.ndarray:
    return normalise(np.array([c.curves[r] for r in roles], dtype=np.float64))


def surrogate_null(a: StdCurves, b: StdCurves, roles: tuple[str, ...], n: int, rng: np.random.Generator,
                   kind: str) -> np.ndarray:
    """Mean r of A against surrogates of B, and of surrogates of A against B (n values in all)."""
    make = sig.phase_surrogates if kind == "phase" else sig.aaft_surrogates
    xa, xb = _stack(a, roles), _stack(b, roles)
    length = max(xa.shape[-1], xb.shape[-1])
    half = n // 2
    null_b = pearson(resample(xa, length)[None], resample(normalise(make(xb, half, rng)), length)).mean(-1)
    null_a = pearson(resample(normalise(make(xa, n - half, rng)), length), resample(xb, length)[None]).mean(-1)
    return np.concatenate([null_b, null_a])


def library_null(a: StdCurves, b: StdCurves, library: list[StdCurves], roles: tuple[str, ...]) -> np.ndarray:
    """Mean r of A and of B against each library model that is neither of them."""
    values = []
    for entry in library:
        shared = tuple(r for r in roles if r in entry.curves)
        if not shared or _same(a, entry) or _same(b, entry):
            continue
        for model in (a, b):
            values.append(float(np.mean(list(correlate(model, entry, shared).values()))))
    return np.array(values)


def _same(x: StdCurves, y: StdCurves) -> bool:
    return x.layers == y.layers and all(
        r in y.curves and np.allclose(x.curves[r], y.curves[r], rtol=1e-9, atol=0) for r in x.curves)


def compare_curves(a: StdCurves, b: StdCurves, *, n_surrogates: int = 2000, seed: int = 0,
                   library: list[StdCurves] | None = None) -> MethodResult:
    """Scores, surrogate p-values and z-scores of two models' std curves."""
    if len(a.layers) < 3 or len(b.layers) < 3:
        return MethodResult.skip(NAME, "std curves need at least 3 layers with q/k/v/o in both models", NULL)
    r = correlate(a, b)
    mean_r = float(np.mean(list(r.values())))
    rng = np.random.default_rng(seed)
    nulls = {kind: surrogate_null(a, b, ATTENTION_ROLES, n_surrogates, rng, kind) for kind in ("phase", "aaft")}
    p = {kind: sig.permutation_p(mean_r, v) for kind, v in nulls.items()}
    z = {kind: sig.zscore(mean_r, v) for kind, v in nulls.items()}
    extras = correlate(a, b, EXTRA_ROLES)
    details = {
        "r": r, "mean_r": mean_r, "leafbench_score": (mean_r + 1.0) / 2.0,
        "layers_a": len(a.layers), "layers_b": len(b.layers),
        "surrogates": {k: {"n": int(nulls[k].size), "p_value": p[k], "z": z[k],
                           "null_mean": float(nulls[k].mean()), "null_sd": float(nulls[k].std(ddof=1))}
                       for k in nulls},
        "curves": {"a": a.to_json(), "b": b.to_json()},
    }
    if extras:
        details["extra_r"] = extras
    if library:
        lib = library_null(a, b, library, ATTENTION_ROLES)
        details["library"] = {"n": int(lib.size), "z": sig.zscore(mean_r, lib),
                              "p_value": sig.permutation_p(mean_r, lib) if lib.size else None,
                              "null_mean": float(lib.mean()) if lib.size else None}
    zs = [v for v in z.values() if v is not None]
    return MethodResult(name=NAME, null_kind=NULL_KIND, score=mean_r, p_value=max(p.values()), z=min(zs) if zs else None,
                        null=NULL, details=details).decide()


def mean_r(a: StdCurves, b: StdCurves) -> float:
    """The published statistic: mean over q/k/v/o of Pearson r of the normalised curves."""
    r = correlate(a, b)
    if not r:
        raise ValueError("no attention projection in common")
    return float(np.mean(list(r.values())))


def run(a: ModelWeights, b: ModelWeights, *, seed: int = 0, n_surrogates: int = 2000, extra: bool = False,
        null_library: str | Path | list[StdCurves] | None = None, background: Any = None) -> MethodResult:
    """The std-curve fingerprint of a pair (reads only attention tensors).

    ``background`` (a fingerprints.background.Background) places the score among real unrelated pairs;
    with N >= 99 in every stratum its empirical p replaces the surrogate p (fingerprints.empirical).
    """
    library = load_library(null_library) if isinstance(null_library, (str, Path)) else null_library
    ca, cb = compute_std_curves(a, extra=extra), compute_std_curves(b, extra=extra)
    result = compare_curves(ca, cb, n_surrogates=n_surrogates, seed=seed, library=library)
    if background is None or result.skipped is not None:
        return result
    from modelkin.compare.fingerprints import empirical

    placed = empirical.place(NAME, result.score, ca, cb, background, score=mean_r,
                             same=lambda x, y: _same(x, y) or _same(y, x))
    return empirical.apply(result, placed)
