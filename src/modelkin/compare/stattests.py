"""Permutation tests used by behavioural comparison: correlation across texts, and a two-sample MMD
with a Hamming string kernel (Gao, Liang, Guestrin, "Model Equality Testing", ICLR 2025)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
    """Two-sample MMD test on continuations grouped by prompt (H0: both models sample alike).

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
