"""Significance tools shared by the comparisons: surrogate curves, permutation p-values, Fisher, Holm, z-scores.

Surrogates keep what a smooth per-layer curve has (its power spectrum, and for AAFT its values) and
destroy everything else (its phases), so "r this high by chance" is judged against curves as smooth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def permutation_p(observed: float, null: Sequence[float] | np.ndarray, *, greater: bool = True) -> float:
    """Monte-Carlo permutation p-value p = (1 + #{null >= obs}) / (1 + n) (``<=`` when greater=False).

    Exact (valid at every level) when the null draws are exchangeable with the observed statistic.
    """
    null = np.asarray(null, dtype=np.float64)
    hits = int(np.sum(null >= observed)) if greater else int(np.sum(null <= observed))
    return (1 + hits) / (1 + null.size)


def zscore(observed: float, null: Sequence[float] | np.ndarray) -> float | None:
    """(observed - mean(null)) / std(null) (sample std); None when the null has no spread."""
    null = np.asarray(null, dtype=np.float64)
    if null.size < 2:
        return None
    sd = float(null.std(ddof=1))
    if not math.isfinite(sd) or sd == 0.0:
        return None
    return float((observed - null.mean()) / sd)


def fisher_combine(p_values: Sequence[float]) -> float:
    """Fisher's method: -2 Σ ln p ~ χ² with 2k degrees of freedom under independent nulls."""
    from scipy.stats import combine_pvalues

    ps = np.clip(np.asarray(p_values, dtype=np.float64), 1e-300, 1.0)
    if ps.size == 0:
        raise ValueError("fisher_combine needs at least one p-value")
    return float(combine_pvalues(ps, method="fisher").pvalue)


def holm_bonferroni(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    ps = np.asarray(p_values, dtype=np.float64)
    m = ps.size
    order = np.argsort(ps, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        adjusted[i] = running
    return adjusted.tolist()


def _phase_randomise(x: np.ndarray, rng: np.random.Generator, mirror: bool) -> np.ndarray:
    """Randomise the Fourier phases of x [n, C, L]: one random phase set per n, shared by its C curves."""
    length = x.shape[-1]
    ext = np.concatenate([x, x[..., ::-1]], axis=-1) if mirror else x
    size = ext.shape[-1]
    phases = rng.uniform(0.0, 2.0 * np.pi, size=(x.shape[0], 1, size // 2 + 1))
    phases[..., 0] = 0.0  # DC (and Nyquist) stay real so the surrogate is real
    if size % 2 == 0:
        phases[..., -1] = 0.0
    out = np.fft.irfft(np.fft.rfft(ext, axis=-1) * np.exp(1j * phases), n=size, axis=-1)
    return out[..., :length]


def phase_surrogates(curves: np.ndarray, n: int, rng: np.random.Generator, *, mirror: bool = True) -> np.ndarray:
    """Fourier phase-randomised surrogates of C curves of length L -> array [n, C, L].

    The same random phases are applied to every curve (multivariate surrogates, Prichard & Theiler 1994),
    so the cross-correlations between the C curves are kept along with each curve's power spectrum.
    ``mirror`` randomises the even extension [x, reversed x] and keeps its first half, which avoids the
    spurious jump a periodic FFT sees between the two ends of a trending curve.
    """
    x = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    return _phase_randomise(np.broadcast_to(x, (n, *x.shape)), rng, mirror)


def aaft_surrogates(curves: np.ndarray, n: int, rng: np.random.Generator, *, mirror: bool = True) -> np.ndarray:
    """Amplitude-adjusted Fourier-transform surrogates (Theiler et al. 1992) -> array [n, C, L].

    Each curve is rank-mapped onto Gaussian values, phase-randomised (common phases across curves),
    and mapped back onto the curve's own sorted values: surrogates have exactly the original values
    and approximately the original spectrum.
    """
    x = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    ranks = np.argsort(np.argsort(x, axis=-1), axis=-1)
    gauss = np.sort(rng.standard_normal((n, *x.shape)), axis=-1)
    gaussianised = np.take_along_axis(gauss, np.broadcast_to(ranks, gauss.shape), axis=-1)
    randomised = _phase_randomise(gaussianised, rng, mirror)
    order = np.argsort(np.argsort(randomised, axis=-1), axis=-1)
    return np.take_along_axis(np.broadcast_to(np.sort(x, axis=-1), randomised.shape), order, axis=-1)


def normal_sf(z: float) -> float:
    """Upper-tail probability of a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))
