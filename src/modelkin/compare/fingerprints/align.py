"""Residual-basis alignment of B to A through the embeddings of byte-identical shared tokens.

The residual stream of a transformer has a gauge: permuting (and sign-flipping) its dimensions, or with
norm gains folded, rotating it, leaves the function unchanged. A derived model may sit in another gauge.
Both models embed the same tokens, so E_B[shared] ≈ E_A[shared]·R for a derived pair; R is fitted on a
random half of the shared tokens and its quality measured on the other half. Every choice here reads
embeddings only, so tests that randomise A's MLP hidden units (csu) stay exact after alignment.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelkin.runtime.cpu_kernels import onednn_linear
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
        """A reading matrix of B ([out, d_B], acting on the residual) in A's residual basis ([out, d_A]).

        A signed permutation is applied as a column gather with signs: the same values as the product
        (each output is one input times ±1, or 0 for an unmatched column) without its out·d_B·d_A cost.
        """
        if self.kind == SIGNED_PERMUTATION:
            return gather_with_signs(w_b, *self._sources_and_signs)
        return map_rows(w_b, self.kind, self.matrix)

    @functools.cached_property
    def _sources_and_signs(self) -> tuple[torch.Tensor, torch.Tensor]:  # read once, not at every layer
        return sources_and_signs(self.matrix)

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "fit_tokens": self.fit_tokens,
            "heldout_tokens": self.heldout_tokens,
            "heldout_cosine": self.heldout_cosine,
            "heldout_cosine_shuffled": self.heldout_cosine_shuffled,
            "candidates": self.candidates,
        }


def map_rows(x: torch.Tensor, kind: str, matrix: torch.Tensor) -> torch.Tensor:
    """``x @ matrix`` ([n, d_B] -> [n, d_A]); a signed permutation as a column gather with signs."""
    if kind == SIGNED_PERMUTATION:
        return gather_with_signs(x, *sources_and_signs(matrix))
    return onednn_linear(x, matrix.T.to(x.dtype).contiguous(), None)  # x @ matrix


def sources_and_signs(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A signed permutation matrix [d_B, d_A] as (B's dimension feeding each of A's, its sign)."""
    columns = torch.arange(matrix.shape[1], device=matrix.device)
    source = matrix.abs().argmax(dim=0)
    return source, matrix[source, columns]


def gather_with_signs(x: torch.Tensor, source: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x @ matrix`` for the signed permutation ``sources_and_signs`` read: x[:, source] * signs
    (``index_select``: the same values as advanced indexing, gathered ~2x faster)."""
    return x.index_select(1, source.to(x.device)) * signs.to(x.device, x.dtype)


_CHUNK = 4096  # token rows per step of the streamed products: a few MB of temporaries, never a centred copy


def centred_cross(ea: torch.Tensor, eb: torch.Tensor, mean_a: torch.Tensor,
                  mean_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C_Bᵀ·C_A [d_B, d_A], column norms of C_A, of C_B) in float64, with C = E − mean, streamed over
    row chunks in float32 (4x float64's rate on CPUs; agrees with float64 products to ~1e-6)."""
    cross = torch.zeros(eb.shape[1], ea.shape[1], dtype=torch.float64, device=ea.device)
    sq_a = torch.zeros(ea.shape[1], dtype=torch.float64, device=ea.device)
    sq_b = torch.zeros(eb.shape[1], dtype=torch.float64, device=ea.device)
    for start in range(0, ea.shape[0], _CHUNK):
        ca, cb = ea[start:start + _CHUNK] - mean_a, eb[start:start + _CHUNK] - mean_b
        cross += (cb.T @ ca).double()
        sq_a += ca.square_().sum(0).double()  # in place: the chunks are not read again
        sq_b += cb.square_().sum(0).double()
    return cross, sq_a.sqrt(), sq_b.sqrt()


def signed_permutation(cross: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """[d_B, d_A] one ±1 per matched dimension: LAP on |cosine| of the centred residual columns over tokens
    (``centred_cross``'s outputs). With different widths the narrower side's dimensions each get a distinct
    partner (rectangular LAP)."""
    from scipy.optimize import linear_sum_assignment

    tiny = 1e-12  # as torch.nn.functional.normalize
    cos = (cross / (norm_b.clamp_min(tiny)[:, None] * norm_a.clamp_min(tiny)[None, :])).cpu().numpy()
    rows, cols = linear_sum_assignment(np.abs(cos), maximize=True)
    out = torch.zeros(cos.shape, dtype=torch.float64)
    out[rows, cols] = torch.as_tensor(np.sign(cos[rows, cols]) + (cos[rows, cols] == 0))
    return out


def orthogonal(cross: torch.Tensor) -> torch.Tensor:
    """[d_B, d_A] orthogonal Procrustes: the (semi-)orthogonal R minimising ‖C_B·R − C_A‖ (up to scale),
    from ``centred_cross``'s C_Bᵀ·C_A."""
    u, _, vh = torch.linalg.svd(cross.cpu(), full_matrices=False)
    return u @ vh


def _gather(emb: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    return emb[torch.as_tensor(ids).to(emb.device)].float()


def _mean_row_cosine(emb_b: torch.Tensor, ids_b: np.ndarray, emb_a: torch.Tensor, ids_a: np.ndarray,
                     mean_b: torch.Tensor, mean_a: torch.Tensor, kind: str, mat: torch.Tensor) -> float:
    """Mean over k of cos((emb_b[ids_b[k]] − mean_b)·mat, emb_a[ids_a[k]] − mean_a), rows gathered and
    scored a chunk at a time (no copy of the held-out rows)."""
    total = 0.0
    for start in range(0, len(ids_b), _CHUNK):
        # the gathered rows are copies: centred in place (one chunk-sized temporary less each)
        mapped = map_rows(_gather(emb_b, ids_b[start:start + _CHUNK]).sub_(mean_b), kind, mat)
        rows_a = _gather(emb_a, ids_a[start:start + _CHUNK]).sub_(mean_a)
        total += float(torch.nn.functional.cosine_similarity(mapped, rows_a, dim=1).double().sum())
    return total / max(1, len(ids_b))


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
        emb_a, emb_b: full embedding matrices [V, d] of A and B (rows indexed by token id; float32 copies
            of the fit rows are made, the held-out rows are gathered a chunk at a time), or functions
            returning the rows of given ids (called once, for every token used).
        shared: byte-identical token pairs (``modelkin.tokenizer.canonical.shared_tokens``).
        rng: the random split (and subsample when more than ``max_tokens`` are shared).
    """
    n = len(shared)
    order = rng.permutation(n)[:max_tokens]
    half = len(order) // 2
    # token k of the split is shared token order[k]; the fit tokens come first
    ids_a, ids_b = np.asarray(shared.ids_a)[order], np.asarray(shared.ids_b)[order]
    if not isinstance(emb_a, torch.Tensor):
        emb_a, ids_a = emb_a(ids_a).float(), np.arange(len(order))
    if not isinstance(emb_b, torch.Tensor):
        emb_b, ids_b = emb_b(ids_b).float(), np.arange(len(order))
    fit_a, fit_b = _gather(emb_a, ids_a[:half]), _gather(emb_b, ids_b[:half])
    mean_a, mean_b = fit_a.mean(0), fit_b.mean(0)
    cross, norm_a, norm_b = centred_cross(fit_a, fit_b, mean_a, mean_b)
    del fit_a, fit_b
    makers = {SIGNED_PERMUTATION: lambda: signed_permutation(cross, norm_a, norm_b),
              ORTHOGONAL: lambda: orthogonal(cross)}
    held_a, held_b = ids_a[half:], ids_b[half:]
    scores: dict[str, float] = {}
    mats: dict[str, torch.Tensor] = {}
    for kind in kinds:
        mat = makers[kind]().float().to(mean_a.device)
        mats[kind] = mat
        scores[kind] = _mean_row_cosine(emb_b, held_b, emb_a, held_a, mean_b, mean_a, kind, mat)
    best = max(scores, key=scores.get)
    shuffled = rng.permutation(len(order) - half)
    return ResidualAlignment(
        kind=best,
        matrix=mats[best],
        fit_tokens=half,
        heldout_tokens=len(order) - half,
        heldout_cosine=scores[best],
        heldout_cosine_shuffled=_mean_row_cosine(emb_b, held_b, emb_a, held_a[shuffled], mean_b, mean_a, best,
                                                 mats[best]),
        candidates=scores,
    )
