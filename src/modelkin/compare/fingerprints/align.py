"""Residual-basis alignment of B to A through the embeddings of byte-identical shared tokens.

The residual stream of a transformer has a gauge: permuting (and sign-flipping) its dimensions, or with
norm gains folded, rotating it, leaves the function unchanged. A derived model may sit in another gauge.
Both models embed the same tokens, so E_B[shared] ≈ E_A[shared]·R for a derived pair; R is fitted on a
random half of the shared tokens and its quality measured on the other half. Every choice here reads
embeddings only, so tests that randomise A's MLP hidden units (csu) stay exact after alignment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelkin.tokenizer.canonical import SharedTokens

SIGNED_PERMUTATION = "signed_permutation"
ORTHOGONAL = "orthogonal"


@dataclass(frozen=True)
class ResidualAlignment:
    """x_A ≈ x_B @ matrix for residual vectors; ``matrix`` is [d_B, d_A] (semi-)orthogonal."""

    kind: str
    matrix: torch.Tensor
    fit_tokens: int
    heldout_tokens: int
    heldout_cosine: float  # mean cosine of held-out token embeddings after alignment
    heldout_cosine_shuffled: float  # the same with the held-out token correspondence shuffled (contrast)
    candidates: dict[str, float]  # held-out cosine of every alignment tried

    def apply(self, w_b: torch.Tensor) -> torch.Tensor:
        """A reading matrix of B ([out, d_B], acting on the residual) in A's residual basis ([out, d_A])."""
        return w_b @ self.matrix.to(w_b.dtype)

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "fit_tokens": self.fit_tokens,
            "heldout_tokens": self.heldout_tokens,
            "heldout_cosine": self.heldout_cosine,
            "heldout_cosine_shuffled": self.heldout_cosine_shuffled,
            "candidates": self.candidates,
        }


def signed_permutation(ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """[d_B, d_A] one ±1 per matched dimension: LAP on |cosine| of residual columns over tokens.

    With different widths the narrower side's dimensions each get a distinct partner (rectangular LAP).
    """
    from scipy.optimize import linear_sum_assignment

    ca = torch.nn.functional.normalize(ea - ea.mean(0), dim=0)
    cb = torch.nn.functional.normalize(eb - eb.mean(0), dim=0)
    cos = (cb.T @ ca).cpu().double().numpy()  # [d_B, d_A]
    rows, cols = linear_sum_assignment(np.abs(cos), maximize=True)
    out = torch.zeros(cos.shape, dtype=torch.float64)
    out[rows, cols] = torch.as_tensor(np.sign(cos[rows, cols]) + (cos[rows, cols] == 0))
    return out


def orthogonal(ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """[d_B, d_A] orthogonal Procrustes: the (semi-)orthogonal R minimising ‖E_B·R − E_A‖ (up to scale)."""
    ea = ea - ea.mean(0)
    eb = eb - eb.mean(0)
    u, _, vh = torch.linalg.svd((eb.T @ ea).double(), full_matrices=False)
    return u @ vh


def _rows(emb: torch.Tensor | Callable[[np.ndarray], torch.Tensor], ids: np.ndarray) -> torch.Tensor:
    return emb[torch.as_tensor(ids)] if isinstance(emb, torch.Tensor) else emb(ids)


def _mean_row_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x, y, dim=1).mean())


def fit_alignment(
    emb_a: torch.Tensor | Callable[[np.ndarray], torch.Tensor],
    emb_b: torch.Tensor | Callable[[np.ndarray], torch.Tensor],
    shared: SharedTokens,
    *,
    rng: np.random.Generator,
    kinds: tuple[str, ...] = (SIGNED_PERMUTATION, ORTHOGONAL),
    max_tokens: int = 32768,
) -> ResidualAlignment:
    """Fit each alignment kind on a random half of the shared tokens; keep the best on the other half.

    Args:
        emb_a, emb_b: full embedding matrices [V, d] of A and B (rows indexed by token id), or functions
            returning the rows of given ids (only the rows of the tokens used are then read).
        shared: byte-identical token pairs (``modelkin.tokenizer.canonical.shared_tokens``).
        rng: the random split (and subsample when more than ``max_tokens`` are shared).
    """
    n = len(shared)
    order = rng.permutation(n)[:max_tokens]
    half = len(order) // 2
    # rows of the used tokens only, in ``order``: row k is shared token order[k]
    fit, held = np.arange(half), np.arange(half, len(order))
    ea = _rows(emb_a, np.asarray(shared.ids_a)[order]).double()
    eb = _rows(emb_b, np.asarray(shared.ids_b)[order]).double()
    ea_c, eb_c = ea - ea[fit].mean(0), eb - eb[fit].mean(0)
    makers = {SIGNED_PERMUTATION: signed_permutation, ORTHOGONAL: orthogonal}
    scores: dict[str, float] = {}
    mats: dict[str, torch.Tensor] = {}
    for kind in kinds:
        mat = makers[kind](ea[fit], eb[fit])
        mats[kind] = mat
        scores[kind] = _mean_row_cosine(eb_c[held] @ mat, ea_c[held])
    best = max(scores, key=scores.get)
    shuffled = held[rng.permutation(len(held))]
    return ResidualAlignment(
        kind=best,
        matrix=mats[best].float(),
        fit_tokens=len(fit),
        heldout_tokens=len(held),
        heldout_cosine=scores[best],
        heldout_cosine_shuffled=_mean_row_cosine(eb_c[held] @ mats[best], ea_c[shuffled]),
        candidates=scores,
    )
