"""Statistics of a comparison: permutation p-values, surrogate curves, Fisher, Holm and z-scores for the
fingerprints; a correlation test across texts and a two-sample MMD test (Hamming kernel) for behaviour."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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

    Surrogates keep what a smooth per-layer curve has (its power spectrum) and destroy its phases, so
    "r this high by chance" is judged against curves as smooth.
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


# Behaviour: permutation tests over texts and sampled continuations.

@dataclass(frozen=True, slots=True)
class TestResult:
    """A statistic with its permutation p-value ``p = (1 + #{perm >= observed}) / (1 + permutations)``."""

    statistic: float
    p_value: float
    permutations: int


def _rank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of ``x`` [n] against each row of ``y`` [P, n]; 0 where a side is constant."""
    xc = x - x.mean()
    yc = y - y.mean(axis=-1, keepdims=True)
    denom = np.sqrt((xc * xc).sum()) * np.sqrt((yc * yc).sum(axis=-1))
    num = (yc * xc).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(r, -1.0, 1.0)


def correlation_test(x: Sequence[float], y: Sequence[float], *, method: str = "pearson",
                     permutations: int = 2000, seed: int = 0) -> TestResult:
    """One-sided permutation test of a positive correlation between paired values.

    Under the null, the pairing of ``x`` and ``y`` is arbitrary, so ``y`` is shuffled across items.
    ``method`` is "pearson" or "spearman" (Pearson on ranks, average ranks for ties).
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1 or len(xa) < 3:
        raise ValueError("correlation_test needs two equally long sequences of at least 3 values")
    if method == "spearman":
        xa, ya = _rank(xa), _rank(ya)
    elif method != "pearson":
        raise ValueError(f"unknown correlation method {method!r}")
    observed = float(_pearson_rows(xa, ya[None, :])[0])
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.broadcast_to(ya, (permutations, len(ya))).copy(), axis=1)
    null = _pearson_rows(xa, perms)
    p = (1 + int(np.count_nonzero(null >= observed - 1e-12))) / (1 + permutations)
    return TestResult(statistic=observed, p_value=p, permutations=permutations)


def hamming_gram(seqs: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """K[i, j] = fraction of the first ``length`` positions where sequences i and j hold the same symbol.

    Shorter sequences are padded with a symbol no real token uses, so two sequences that both ended
    early match on their padding: stopping is behaviour too.
    """
    arr = np.full((len(seqs), length), -1, dtype=np.int64)
    for i, s in enumerate(seqs):
        s = list(s)[:length]
        arr[i, : len(s)] = s
    return (arr[:, None, :] == arr[None, :, :]).mean(axis=-1)


def _mmd2_unbiased(k: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for each label row of ``labels`` [P, N] (True = sample of A) on Gram ``k`` [N, N]."""
    a = labels.astype(np.float64)
    b = 1.0 - a
    k0 = k - np.diag(np.diag(k))
    na, nb = a.sum(axis=1), b.sum(axis=1)
    kaa = np.einsum("pi,ij,pj->p", a, k0, a) / (na * (na - 1))
    kbb = np.einsum("pi,ij,pj->p", b, k0, b) / (nb * (nb - 1))
    kab = np.einsum("pi,ij,pj->p", a, k, b) / (na * nb)
    return kaa + kbb - 2.0 * kab


def mmd_test(samples_a: Sequence[Sequence[Sequence[int]]], samples_b: Sequence[Sequence[Sequence[int]]], *,
             length: int, permutations: int = 1000, seed: int = 0) -> TestResult:
    """Two-sample MMD test on continuations grouped by prompt (H0: both models sample alike; Gao, Liang,
    Guestrin, "Model Equality Testing", ICLR 2025).

    The kernel on (prompt, continuation) pairs is 1[same prompt] x Hamming kernel, so the statistic is
    the mean over prompts of each prompt's unbiased MMD², and the permutation test shuffles the A/B labels
    within each prompt. Each side needs at least two samples per prompt.
    """
    if len(samples_a) != len(samples_b) or not samples_a:
        raise ValueError("mmd_test needs the same, non-zero number of prompts on both sides")
    rng = np.random.default_rng(seed)
    observed = 0.0
    null = np.zeros(permutations)
    for xs, ys in zip(samples_a, samples_b):
        if len(xs) < 2 or len(ys) < 2:
            raise ValueError("mmd_test needs at least two samples per prompt on each side")
        k = hamming_gram([*xs, *ys], length)
        labels = np.zeros(len(xs) + len(ys), dtype=bool)
        labels[: len(xs)] = True
        observed += float(_mmd2_unbiased(k, labels[None, :])[0])
        perm = rng.permuted(np.broadcast_to(labels, (permutations, len(labels))).copy(), axis=1)
        null += _mmd2_unbiased(k, perm)
    observed /= len(samples_a)
    null /= len(samples_a)
    p = (1 + int(np.count_nonzero(null >= observed - 1e-12))) / (1 + permutations)
    return TestResult(statistic=observed, p_value=p, permutations=permutations)
