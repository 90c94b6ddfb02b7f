"""Exact unit-matching tests shared by permtest and upcycle: match on half the residual dims, score on the rest.

Residual dimensions are split at random into halves D1 and D2. Units (MLP neurons: gate row + up row,
each normalised, so per-unit rescaling is invisible) are matched on D1 only; the statistic is the mean
D2 cosine of matched pairs. Relabelling B's D2 dimensions among themselves is a symmetry of independent
training that leaves the D1 matching unchanged, so the randomisation p over such relabellings is exact,
and each draw costs one gather: Σ_c M[c, P(c)] with M = F2_Aᵀ·F2_B summed over matched pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from modelkin.compare.fingerprints.weights import ModelWeights


@dataclass(frozen=True)
class Split:
    """The residual halves and the random D2 relabellings shared by every layer of one test."""

    d1: torch.Tensor
    d2: torch.Tensor
    perms: np.ndarray  # [T, |D2|]

    @classmethod
    def make(cls, hidden: int, n_permutations: int, rng: np.random.Generator, device: torch.device) -> Split:
        order = rng.permutation(hidden)
        d1, d2 = np.sort(order[: hidden // 2]), np.sort(order[hidden // 2:])
        perms = np.stack([rng.permutation(d2.size) for _ in range(n_permutations)]) if n_permutations else \
            np.empty((0, d2.size), dtype=np.int64)
        return cls(torch.as_tensor(d1, device=device), torch.as_tensor(d2, device=device), perms)


def unit_features(w: ModelWeights, layer: int, roles: tuple[str, str], expert: int | None,
                  split: Split, units: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([units, 2|D1|], [units, 2|D2|]): gate and up rows restricted to each half, each normalised, / √2;
    only the rows ``units`` (indices) when given.

    A dot product of two such rows is the mean of the gate cosine and the up cosine on that half.
    """
    rows = [w.get(layer, r, expert) for r in roles]
    if units is not None:
        rows = [t.index_select(0, units) for t in rows]
    halves = []
    for cols in (split.d1, split.d2):
        # index_select: the same values as t[:, cols], gathered ~2x faster
        parts = [torch.nn.functional.normalize(t.index_select(1, cols), dim=1) for t in rows]
        halves.append(torch.cat(parts, dim=1) / math.sqrt(2.0))
    return halves[0], halves[1]


def cross_moment(fa2: torch.Tensor, fb2: torch.Tensor) -> np.ndarray:
    """M[c, c'] = Σ_i (fa2[i, c] fb2[i, c'] + same in the up half): [|D2|, |D2|] float64 numpy.

    Matched pairs are row-aligned (fb2 = B's matched units). trace(M) is the summed D2 cosine.
    """
    half = fa2.shape[1] // 2
    fa2, fb2 = fa2.cpu().double(), fb2.cpu().double()  # small [K, 2|D2|]; Ascend NPUs have no float64
    return (fa2[:, :half].T @ fb2[:, :half] + fa2[:, half:].T @ fb2[:, half:]).numpy()


def relabelled(m: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """Σ_c M[c, P(c)] for every relabelling P (rows of perms): the statistic's null draws."""
    cols = np.arange(m.shape[0])
    return m[cols[None, :], perms].sum(axis=1)
