"""Spectral statistics of a weight matrix on its device: singular values, norms, ranks, power-law alpha.

The ESD is that of WᵀW (eigenvalues λ = σ², no 1/N normalisation), as in weightwatcher; alpha is
the continuous power-law MLE of the ESD tail with xmin chosen by the smallest KS distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SPECTRAL_ROLES = frozenset({
    "q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "router",
    "expert_gate", "expert_up", "expert_down", "expert_gate_up",
    "shared_gate", "shared_up", "shared_down", "embed", "lm_head",
})
EVAL_FLOOR = 1e-10  # eigenvalues below λmax·floor are numerically zero (rank deficiency)


@dataclass(frozen=True, slots=True)
class SpectralOptions:
    """max_exact: largest min(m, n) solved exactly; bigger matrices get the top `lowrank` values."""

    max_exact: int = 4096
    lowrank: int = 256


def default_options(device: torch.device | str) -> SpectralOptions:
    kind = torch.device(device).type
    return SpectralOptions(max_exact=2048 if kind == "cpu" else 8192)


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def eigenvalues(w: torch.Tensor, options: SpectralOptions) -> tuple[np.ndarray, bool]:
    """Ascending eigenvalues of WᵀW (= σ²) and whether the spectrum is complete.

    Small matrices: Gram matrix of the smaller side and eigvalsh, in float64 (float32 on devices
    without float64 linear algebra). Large ones: torch.svd_lowrank's top singular values.
    """
    m, n = w.shape
    x = w.to(_acc_dtype(w.device))
    if min(m, n) <= options.max_exact:
        gram = x.T @ x if n <= m else x @ x.T
        try:
            evals = torch.linalg.eigvalsh(gram)
        except (RuntimeError, NotImplementedError):  # no eigvalsh on this device: small, go to CPU
            evals = torch.linalg.eigvalsh(gram.cpu().double())
        return np.clip(evals.double().cpu().numpy(), 0.0, None), True
    k = min(options.lowrank, min(m, n))
    cuda = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # deterministic sketch, global RNG untouched
        torch.manual_seed(0)
        try:
            _, s, _ = torch.svd_lowrank(x.float(), q=k, niter=4)
        except (RuntimeError, NotImplementedError):  # no QR/SVD kernels on this device
            _, s, _ = torch.svd_lowrank(x.float().cpu(), q=k, niter=4)
    return np.sort(s.double().cpu().numpy() ** 2), False


def fit_powerlaw(evals: np.ndarray, *, min_tail: int = 2,
                 max_candidates: int = 1000) -> dict[str, float]:
    """Continuous power-law fit p(λ) ∝ λ^-alpha of the ESD tail (weightwatcher's alpha).

    For every candidate xmin (each distinct eigenvalue leaving at least ``min_tail`` in the tail;
    an evenly spaced subset of ``max_candidates`` of them when there are more, to keep the search
    O(N·max_candidates)) alpha = 1 + n / Σ ln(λ/xmin), and the KS distance between the tail's
    empirical CDF and the fitted one; the xmin with the smallest distance wins.

    Returns:
        alpha, xmin, ks_distance and n_tail; NaNs when fewer than min_tail+1 positive values.
    """
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > 0]
    nan = {"alpha": math.nan, "xmin": math.nan, "ks_distance": math.nan, "n_tail": 0}
    if x.size < min_tail + 1:
        return nan
    logs = np.log(x)
    suffix = np.cumsum(logs[::-1])[::-1]
    candidates = np.flatnonzero(np.r_[True, np.diff(x) > 0])  # first index of each distinct value
    candidates = candidates[x.size - candidates >= min_tail]
    if candidates.size > max_candidates:
        candidates = candidates[np.linspace(0, candidates.size - 1, max_candidates).astype(int)]
    best = (math.inf, 0, math.nan)
    for block in np.array_split(candidates, max(1, candidates.size * x.size // 4_000_000)):
        d, alpha = _ks_block(x, logs, suffix, block)
        j = int(np.nanargmin(d)) if np.isfinite(d).any() else -1
        if j >= 0 and d[j] < best[0]:
            best = (float(d[j]), int(block[j]), float(alpha[j]))
    if not math.isfinite(best[0]):
        return nan
    ks, i, alpha = best
    return {"alpha": alpha, "xmin": float(x[i]), "ks_distance": ks, "n_tail": int(x.size - i)}


def _ks_block(x: np.ndarray, logs: np.ndarray, suffix: np.ndarray, idx: np.ndarray):
    """KS distances and alphas for the candidate xmin indices ``idx`` (vectorised)."""
    size = x.size
    n_tail = (size - idx).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = 1.0 + n_tail / (suffix[idx] - n_tail * logs[idx])
        j = np.arange(size)[None, :]
        rank = (j - idx[:, None]).astype(np.float64)  # position inside the tail
        in_tail = rank >= 0
        log_ratio = np.maximum(logs[None, :] - logs[idx][:, None], 0.0)  # 0 outside the tail
        cdf = 1.0 - np.exp((1.0 - alpha[:, None]) * log_ratio)
        upper = (rank + 1.0) / n_tail[:, None] - cdf
        lower = cdf - rank / n_tail[:, None]
        d = np.where(in_tail, np.maximum(upper, lower), -np.inf).max(axis=1)
    d[~np.isfinite(alpha) | (alpha <= 1.0)] = np.nan
    return d, alpha


def spectral_stats(w: torch.Tensor, options: SpectralOptions | None = None) -> dict[str, Any]:
    """Spectral statistics of one 2-D matrix (on its device).

    Returns:
        spectral_norm (σmax), frobenius_norm, stable_rank (‖W‖F²/σmax²), effective_rank
        (exp of the entropy of σ/Σσ, Roy & Vetterli; NaN for a partial spectrum), alpha,
        alpha_weighted (alpha·log10 λmax), log_spectral_norm (log10 λmax), xmin, ks_distance,
        n_tail, n_evals and exact (False when only the top singular values were computed).
    """
    options = options or default_options(w.device)
    if w.device.type == "cpu":
        from modelkin.inspect.stats import cpu_threads, inspect_threads

        # OpenMP teams only pay off on big factorisations (and hurt a lot on shared cores)
        with cpu_threads(inspect_threads() if min(w.shape) >= 512 else 1):
            return _spectral_stats(w, options)
    return _spectral_stats(w, options)


def _spectral_stats(w: torch.Tensor, options: SpectralOptions) -> dict[str, Any]:
    frob_sq = float(torch.linalg.vector_norm(w, dtype=_acc_dtype(w.device))) ** 2
    evals, exact = eigenvalues(w, options)
    lam_max = float(evals[-1]) if evals.size else 0.0
    kept = evals[evals > lam_max * EVAL_FLOOR] if lam_max > 0 else evals[:0]
    fit = fit_powerlaw(kept)
    sv = np.sqrt(kept)
    erank = math.nan
    if exact and sv.size:
        p = sv / sv.sum()
        erank = float(math.exp(-(p * np.log(p)).sum()))
    log_lmax = math.log10(lam_max) if lam_max > 0 else math.nan
    return {
        "spectral_norm": math.sqrt(lam_max),
        "frobenius_norm": math.sqrt(frob_sq),
        "stable_rank": frob_sq / lam_max if lam_max > 0 else math.nan,
        "effective_rank": erank,
        "alpha": fit["alpha"],
        "alpha_weighted": fit["alpha"] * log_lmax,
        "log_spectral_norm": log_lmax,
        "xmin": fit["xmin"],
        "ks_distance": fit["ks_distance"],
        "n_tail": fit["n_tail"],
        "n_evals": int(kept.size),
        "exact": exact,
    }


def wants_spectral(role: str, shape: tuple[int, ...]) -> bool:
    """Matrices (2-D, or stacked experts 3-D) of a role with a meaningful spectrum."""
    return role in SPECTRAL_ROLES and len(shape) in (2, 3) and min(shape[-2:]) > 1


def sampled_experts(num_experts: int, sample: int | None) -> set[int]:
    """Evenly spaced expert indices (all when sample is None or >= num_experts)."""
    if sample is None or sample >= num_experts:
        return set(range(num_experts))
    if sample <= 0:
        return set()
    return {round(float(v)) for v in np.linspace(0, num_experts - 1, sample)}
