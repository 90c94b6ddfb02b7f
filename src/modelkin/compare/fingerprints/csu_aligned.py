"""Zhu et al.'s csu independence test after aligning B's residual basis to A's through shared tokens.

Per layer, A's MLP units (gate and up rows with the input norm gain folded in) are matched to B's units
(B's rows mapped into A's residual basis, see align.py) by linear assignment on cosine similarity; the
statistic is the Spearman correlation of the matching with A's unit order. Null (H0: A and B come from
independent initialisations): A's hidden units are exchangeable - permuting them is a symmetry of A's own
training - and the alignment and the layer map read only quantities that permutation leaves unchanged
(embeddings, Gram matrices), so the matching is a uniformly random injection and the p-value is exact
whatever B is (Spearman's null via the t distribution, Fisher across layers).
Blind spot: a copy whose MLP hidden units were permuted keeps its function but scores like an unrelated
model here (the matching is then that permutation, not the identity).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from modelkin.compare import stats as sig
from modelkin.compare.fingerprints.align import ResidualAlignment, fit_alignment
from modelkin.compare.fingerprints.result import MethodResult, NotApplicable
from modelkin.compare.fingerprints.weights import ModelWeights, pick_layers, vocabulary
from modelkin.runtime.cpu_kernels import onednn_linear
from modelkin.tokenizer.canonical import canonical_vocabulary, shared_tokens
from modelkin.utils import trim_heap

NAME = "csu_aligned"
NULL_KIND = "exact"  # see result.NULL_KINDS
NULL = ("H0: A and B come from independent initialisations; A's MLP hidden units are exchangeable (a symmetry "
        "of A's own training) and the residual alignment and layer map depend only on quantities invariant to "
        "it, so each layer's unit matching is a uniformly random injection: exact Spearman p per layer, "
        "Fisher across layers. Valid whatever B is.")
BLIND = ("blind to a copy whose MLP hidden units were permuted (function-preserving); such a pair scores like "
         "an unrelated one here")
_ROLES = ("gate", "up")
MIN_SHARED = 256
ALIGN_TOKENS = 32768  # shared tokens the residual alignment uses at most (fit on half, scored on half)


def _unit_rows(w: ModelWeights, layer: int, align: ResidualAlignment | None,
               units: torch.Tensor | None = None) -> torch.Tensor:
    """[units, 2·d_A]: normalised gate and up rows (norm gain folded; B's mapped into A's basis) / √2; only
    the rows ``units`` (indices) when given."""
    gain = w.norm_gain(layer, w.mlp_input_norm(layer))
    parts = []
    for role in _ROLES:
        rows = w.get(layer, role)
        if units is not None:
            rows = rows.index_select(0, units)
        if gain is not None and gain.numel() == rows.shape[1]:
            rows = rows * gain[None, :]
        if align is not None:
            rows = align.apply(rows)
        parts.append(torch.nn.functional.normalize(rows, dim=1))
    return torch.cat(parts, dim=1) / math.sqrt(2.0)


def centred_gram(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(double-centred residual-side Gram matrix fᵀf, its Frobenius norm): computed once per layer."""
    k = f.T @ f
    k = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    return k, k.norm()


def _cka(ga: tuple[torch.Tensor, torch.Tensor], gb: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Linear CKA of two layers' Gram matrices (invariant to either model's unit order)."""
    (ka, na), (kb, nb) = ga, gb
    den = float(na * nb)
    return float((ka * kb).sum()) / den if den > 0 else 0.0


def monotone_map(sim: np.ndarray) -> list[tuple[int, int]]:
    """Order-preserving one-to-one pairing of min(L_A, L_B) layers maximising the summed similarity."""
    la, lb = sim.shape
    if la > lb:
        return [(i, j) for j, i in monotone_map(sim.T)]
    best = np.full((la + 1, lb + 1), -np.inf)
    best[0, :] = 0.0
    for i in range(1, la + 1):
        for j in range(i, lb + 1):
            best[i, j] = max(best[i, j - 1], best[i - 1, j - 1] + sim[i - 1, j - 1])
    pairs, i, j = [], la, lb
    while i > 0:
        if j > i and best[i, j] == best[i, j - 1]:
            j -= 1
        else:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
    return pairs[::-1]


def _spearman(matched: np.ndarray) -> float:
    k = len(matched)
    ranks = np.argsort(np.argsort(matched)).astype(np.float64)
    return 1.0 - 6.0 * float(((ranks - np.arange(k)) ** 2).sum()) / (k * (k * k - 1.0))


def spearman_p(rho: float, k: int) -> float:
    """One-sided p of Spearman's rho for k items under a uniformly random order (t approximation)."""
    from scipy import stats

    if k < 3:
        return 1.0
    rho = min(rho, 1.0 - 1e-15)
    t = rho * math.sqrt((k - 2) / max(1e-300, 1.0 - rho * rho))
    return float(stats.t.sf(t, k - 2))


def check_pair(a: ModelWeights, b: ModelWeights) -> tuple[list[int], list[int]]:
    if a.is_moe or b.is_moe:
        raise NotApplicable("csu_aligned matches dense MLP units; an MoE is compared by the upcycle detector")
    la = [i for i in a.layers if all(a.has(i, r) for r in _ROLES)]
    lb = [i for i in b.layers if all(b.has(i, r) for r in _ROLES)]
    if not la or not lb:
        raise NotApplicable("no layer with gate_proj and up_proj in " + ("A" if not la else "B"))
    if not (a.has(None, "embed") and b.has(None, "embed")):
        raise NotApplicable("an embedding matrix is missing, so the residual bases cannot be aligned")
    return la, lb


def _embedding(w: ModelWeights, rows: int) -> torch.Tensor | Callable[[np.ndarray], torch.Tensor]:
    """The whole embedding where ``w.rows`` would read it for ``rows`` distinct rows (the alignment then
    gathers the rows it needs a chunk at a time instead of copying them all); else a reader of given rows,
    called once (only those rows are read)."""
    whole = w.whole("embed", rows)
    return whole if whole is not None else (lambda ids: w.rows("embed", ids))


def run(a: ModelWeights, b: ModelWeights, *, seed: int = 0, max_layers: int | None = None,
        max_units: int = 512) -> MethodResult:
    """The aligned csu test of a dense pair (any widths, depths and tokenizers with enough shared tokens).

    ``max_units``: A's units sampled per layer and matched against all of B's (512, as permtest; 1024
    before). The null is exact at any size; halving the units halves the matching's products and most of
    its linear-assignment time (a 135M pair 2.0-2.4 -> 1.3-1.6 s) and lowers each layer's Spearman t by
    ~√2. On nine real relatives of SmolLM2-135M (fine-tunes of 12 and 60 AdamW steps, MLP width pruned to
    75 % and to 50 % with three layers dropped, a layer dropped, half the heads pruned, the residual
    rotated, re-quantised to Q4_0) p underflowed to 0 at both sizes; on SmolLM2 against its std-matched
    twin, its permuted copy and Gemma-3-270M p stayed at 0.29-0.96 (bench/README.md, stop 25)."""
    layers_a, layers_b = check_pair(a, b)
    va, vb = vocabulary(a), vocabulary(b)
    if va is None or vb is None:
        raise NotApplicable(f"{'A' if va is None else 'B'} carries no vocabulary (GGUF tokens or tokenizer.json)")
    shared = shared_tokens(va[0], vb[0], special_a=va[1], special_b=vb[1],
                           rows_a=a.info(None, "embed").shape[0], rows_b=b.info(None, "embed").shape[0],
                           canonical_a=a.derived("canonical_vocabulary", lambda: canonical_vocabulary(*va)))
    if len(shared) < MIN_SHARED:
        raise NotApplicable(f"only {len(shared)} byte-identical shared tokens (need {MIN_SHARED}) to align "
                            "the residual bases")
    rng = np.random.default_rng(seed)
    used = min(len(shared), ALIGN_TOKENS)
    align = fit_alignment(_embedding(a, used), _embedding(b, used), shared, rng=rng, max_tokens=ALIGN_TOKENS)
    trim_heap()  # the alignment's gathered token rows (~0.1 GB at 32k tokens) are freed: give their pages back
    sim = None
    # features are made when a layer pair is scored, not kept: one layer pair in memory at a time
    def feats_a(i: int, units: np.ndarray | None = None) -> torch.Tensor:
        return _unit_rows(a, i, None, None if units is None else torch.as_tensor(units, device=a.device))

    def feats_b(j: int) -> torch.Tensor:
        return _unit_rows(b, j, align)

    def layer(i: int, j: int) -> dict:  # A's sampled units only: a third of its rows at 512 of 1536
        units_a = int(a.info(i, "up").shape[0])
        return _layer(functools.partial(feats_a, i), units_a, feats_b(j), rng, max_units)

    if len(layers_a) == len(layers_b):
        pairs = pick_layers(list(zip(layers_a, layers_b)), max_layers)
    else:  # depth alignment on Gram matrices, which no relabelling of either model's units changes
        grams_a = {i: centred_gram(feats_a(i)) for i in layers_a}
        grams_b = {j: centred_gram(feats_b(j)) for j in layers_b}
        sim = np.array([[_cka(grams_a[i], grams_b[j]) for j in layers_b] for i in layers_a])
        del grams_a, grams_b
        pairs = pick_layers([(layers_a[i], layers_b[j]) for i, j in monotone_map(sim)], max_layers)
    per_layer = {}
    for la_, lb_ in pairs:
        per_layer[f"{la_}->{lb_}"] = layer(la_, lb_)
    # within-pair contrast (descriptive): the same statistic on deliberately mismatched layer pairs
    shift = max(1, len(pairs) // 2)
    mismatched = [(pairs[k][0], pairs[(k + shift) % len(pairs)][1]) for k in range(len(pairs))] \
        if len(pairs) > 1 else []
    off = [layer(x, y)["rho"] for x, y in mismatched[:4]]
    p = sig.fisher_combine([r["p"] for r in per_layer.values()])
    score = float(np.mean([r["rho"] for r in per_layer.values()]))
    details = {
        "shared_tokens": shared.summary(),
        "alignment": align.summary(),
        "layer_pairs": [f"{x}->{y}" for x, y in pairs],
        "per_layer": per_layer,
        "mismatched_layers_mean_rho": float(np.mean(off)) if off else None,
        "blind_to": BLIND,
    }
    if sim is not None:
        details["layer_map_similarity"] = [[round(float(v), 4) for v in row] for row in sim]
    return MethodResult(name=NAME, null_kind=NULL_KIND, score=score, p_value=p, null=NULL, details=details).decide()


def _layer(feats_a: Callable[[np.ndarray], torch.Tensor], units_a: int, fb: torch.Tensor,
           rng: np.random.Generator, max_units: int) -> dict:
    """One layer pair: ``k`` of A's ``units_a`` units drawn at random, their features ``feats_a(idx)``
    matched to all of B's ``fb``."""
    from scipy.optimize import linear_sum_assignment

    k = min(units_a, fb.shape[0], max_units)
    idx = np.sort(rng.choice(units_a, size=k, replace=False))
    cos = onednn_linear(feats_a(idx), fb, None).cpu().double().numpy()  # A's units idx @ fb.T
    _, matched = linear_sum_assignment(cos, maximize=True)
    rho = _spearman(matched)
    return {"rho": rho, "p": spearman_p(rho, k), "units": k,
            "matched_cosine": float(cos[np.arange(k), matched].mean())}
