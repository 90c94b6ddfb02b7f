"""Zhu et al.'s independence test for same-width dense models, extended to permuted-and-rescaled copies.

Per layer, sampled MLP units of A are matched to B's units by linear assignment on cosine similarity
(computed on half the residual dimensions, see unitmatch). Two exact tests:
- csu (Zhu et al.): Spearman correlation of the matching with the identity; null: B's hidden units
  relabelled at random (a symmetry of independent training), which makes the matching a uniformly
  random injection, so null draws need no recomputation. Fisher's method across layers.
- match: mean cosine of matched units on the other residual half; null: those dimensions of B relabelled
  at random (one relabelling shared by all layers, as the residual stream is), exact randomisation p.
  Unlike csu it still sees a copy whose hidden units were permuted.
p = min(1, 2·min(p_csu, p_match)) (Bonferroni over the two tests).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

import modelkin.compare.stats as sig
from modelkin.compare.fingerprints.result import MethodResult, NotApplicable
from modelkin.compare.fingerprints.unitmatch import Split, cross_moment, relabelled, unit_features
from modelkin.compare.fingerprints.weights import ModelWeights, pick_layers
from modelkin.runtime.cpu_kernels import onednn_linear

NAME = "permtest"
NULL_KIND = "exact"  # see result.NULL_KINDS
NULL = ("H0: A and B come from independent initialisations, so B's hidden-unit order and residual-dimension "
        "order are uniformly random relative to A's (symmetries of independent training); exact permutation "
        "p for the matching's Spearman correlation with the identity (csu, Fisher over layers) and for the "
        "matched units' cosine on held-out residual dimensions (match); Bonferroni over the two.")
_ROLES = ("gate", "up")


def _spearman_identity(matched: np.ndarray) -> np.ndarray:
    """Spearman r of each row of ``matched`` [..., K] with the ascending sampled unit ids (ranks 0..K-1)."""
    k = matched.shape[-1]
    if k < 2:
        return np.zeros(matched.shape[:-1])
    return _spearman_ranks(np.argsort(np.argsort(matched, axis=-1), axis=-1))


def _spearman_ranks(ranks: np.ndarray) -> np.ndarray:
    """Spearman r of rank rows (each a permutation of 0..K-1) with 0..K-1."""
    k = ranks.shape[-1]
    return 1.0 - 6.0 * ((ranks.astype(np.float64) - np.arange(k)) ** 2).sum(-1) / (k * (k * k - 1.0))


def check_pair(a: ModelWeights, b: ModelWeights) -> list[int]:
    """Layers where both dense models have MLPs of equal shape; raises NotApplicable otherwise."""
    if a.is_moe or b.is_moe:
        raise NotApplicable("permtest matches dense MLP units; an MoE is compared by the upcycle detector")
    if a.num_layers != b.num_layers:
        raise NotApplicable(f"different depths ({a.num_layers} vs {b.num_layers} layers)")
    layers = [i for i in a.layers if all(w.has(i, r) for w in (a, b) for r in _ROLES)]
    if not layers:
        raise NotApplicable("no layer with gate_proj and up_proj in both models")
    for i in layers:
        sa, sb = a.info(i, "up").shape, b.info(i, "up").shape
        if tuple(sa) != tuple(sb):
            raise NotApplicable(f"different MLP widths at layer {i} ({tuple(sa)} vs {tuple(sb)})")
    return layers


@functools.lru_cache(maxsize=4)
def _draws(seed: int, hidden: int, units: tuple[int, ...], max_units: int, n_permutations: int,
           device: torch.device) -> tuple[Split, tuple[tuple[np.ndarray, np.ndarray], ...]]:
    """The test's random draws: the residual split, then per layer the sampled units of A and the null
    draws of Spearman's r. They depend on the seed and the shapes alone, not on the weights, so a model
    compared with several others (``compare A B C ...``) draws them once (sorting 999 x 512 uniforms per
    layer took a quarter of the test's time)."""
    rng = np.random.default_rng(seed)
    split = Split.make(hidden, n_permutations, rng, device)
    per_layer = []
    for n in units:
        idx = np.sort(rng.choice(n, size=min(n, max_units), replace=False))
        # relabelling B's units by a uniform π makes the ranks of π[matched] a uniform permutation of
        # 0..K-1 (a uniform permutation is its own rank vector: _spearman_identity's two argsorts are not
        # needed)
        null_rho = _spearman_ranks(np.argsort(rng.random((n_permutations, len(idx))), axis=1)) \
            if len(idx) > 1 else np.zeros(n_permutations)
        per_layer.append((idx, null_rho))
    for array in (split.perms, *(x for pair in per_layer for x in pair)):
        array.flags.writeable = False  # shared by every later call with the same arguments
    return split, tuple(per_layer)


def _layer(a: ModelWeights, b: ModelWeights, layer: int, split: Split, idx: np.ndarray,
           null_rho: np.ndarray) -> tuple[dict, np.ndarray]:
    from scipy.optimize import linear_sum_assignment

    sel = torch.tensor(idx, device=a.device)  # a copy: idx is a shared read-only array
    (fa1, fa2), (fb1, fb2) = unit_features(a, layer, _ROLES, None, split, sel), \
        unit_features(b, layer, _ROLES, None, split)
    cos = onednn_linear(fa1, fb1, None).cpu().double().numpy()  # A's sampled units @ B's units.T
    _, matched = linear_sum_assignment(cos, maximize=True)
    rho = float(_spearman_identity(matched))
    moment = cross_moment(fa2, fb2[torch.as_tensor(matched, device=fb2.device)])
    stat, null = float(np.trace(moment)) / len(idx), relabelled(moment, split.perms) / len(idx)
    row = {"csu": rho, "p_csu": sig.permutation_p(rho, null_rho), "match": stat,
           "p_match": sig.permutation_p(stat, null), "identity_fraction": float(np.mean(matched == idx))}
    return row, moment


def run(a: ModelWeights, b: ModelWeights, *, seed: int = 0, max_layers: int | None = None, max_units: int = 512,
        n_permutations: int = 999) -> MethodResult:
    """The permutation test of a same-width dense pair."""
    layers = pick_layers(check_pair(a, b), max_layers)
    widths = tuple(int(a.info(layer, "up").shape[0]) for layer in layers)
    hidden = int(a.info(layers[0], "up").shape[1])
    split, draws = _draws(seed, hidden, widths, max_units, n_permutations, a.device)
    per_layer, total, units = {}, None, 0
    for layer, (idx, null_rho) in zip(layers, draws):
        row, moment = _layer(a, b, layer, split, idx, null_rho)
        per_layer[layer] = row
        total = moment if total is None else total + moment
        units += len(idx)
    p_csu = sig.fisher_combine([r["p_csu"] for r in per_layer.values()])
    observed, null = float(np.trace(total)) / units, relabelled(total, split.perms) / units
    p_match = sig.permutation_p(observed, null)
    details = {"layers": layers, "units_per_layer": units // len(layers), "p_csu": p_csu, "p_match": p_match,
               "match": observed, "match_null_mean": float(null.mean()), "match_null_sd": float(null.std(ddof=1)),
               "mean_csu": float(np.mean([r["csu"] for r in per_layer.values()])),
               "per_layer": per_layer, "n_permutations": n_permutations}
    return MethodResult(name=NAME, null_kind=NULL_KIND, score=observed, p_value=min(1.0, 2.0 * min(p_csu, p_match)),
                        z=sig.zscore(observed, null), null=NULL, details=details).decide()
