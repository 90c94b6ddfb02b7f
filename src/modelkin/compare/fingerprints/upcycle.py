"""MoE-upcycling detector: do an MoE's experts come from a dense model's MLP neurons?

For sampled MoE layers, sampled units of every expert (and of the shared expert) — gate row and up
row, each normalised — are matched by best cosine against the dense model's MLP units, on half the
residual dimensions (see unitmatch): a few units per expert first pick the source dense layer among
all of them, then every sampled unit is matched inside that layer. The evidence is the matched pairs'
cosine on the other residual half, against random relabellings of those dimensions (the random-row
baseline), one exact randomisation test over all layers and experts.
"""

from __future__ import annotations

import numpy as np
import torch

import modelkin.compare.stats as sig
from modelkin.compare.fingerprints.result import MethodResult, NotApplicable
from modelkin.compare.fingerprints.unitmatch import Split, cross_moment, relabelled, unit_features
from modelkin.compare.fingerprints.weights import ModelWeights, pick_layers
from modelkin.utils import trim_heap

NAME = "upcycle"
NULL_KIND = "exact"  # see result.NULL_KINDS
NULL = ("H0: the MoE's expert units are unrelated to the dense model's MLP units, so the dense model's "
        "residual dimensions are in a random order relative to the MoE's (a symmetry of independent "
        "training); exact randomisation p of the matched units' cosine on residual dimensions not used for "
        "matching or for picking the source layer, pooled over layers and experts.")


def _groups(moe: ModelWeights, layer: int) -> list[tuple[str, tuple[str, str], int | None]]:
    groups: list[tuple[str, tuple[str, str], int | None]] = [
        (str(e), ("expert_gate", "expert_up"), e) for e in moe.experts(layer)]
    if moe.has(layer, "shared_gate"):
        groups.append(("shared", ("shared_gate", "shared_up"), None))
    return groups


def expert_units(moe: ModelWeights, layer: int, per_expert: int, split: Split, rng: np.random.Generator
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Sampled unit features (D1 half, D2 half) of each expert ("0", "1", …) and the shared one ("shared")."""
    out = {}
    for label, roles, expert in _groups(moe, layer):
        f1, f2 = unit_features(moe, layer, roles, expert, split)
        pick = torch.as_tensor(np.sort(rng.choice(f1.shape[0], size=min(per_expert, f1.shape[0]),
                                                  replace=False)), device=f1.device)
        out[label] = (f1[pick], f2[pick])
        del f1, f2
        trim_heap()  # else each expert's freed features stay in glibc's heap (see trim_heap)
    return out


def _pair(moe: ModelWeights, dense: ModelWeights) -> tuple[list[int], list[int]]:
    moe_layers = [i for i in moe.layers if moe.experts(i)]
    dense_layers = [i for i in dense.layers if dense.has(i, "gate") and dense.has(i, "up")]
    if not moe_layers or not dense_layers:
        raise NotApplicable("no MoE layer with experts, or no dense MLP layer")
    d_moe = moe.info(moe_layers[0], "expert_gate", moe.experts(moe_layers[0])[0]).shape[1]
    d_dense = dense.info(dense_layers[0], "gate").shape[1]
    if d_moe != d_dense:
        raise NotApplicable(f"different hidden sizes ({d_moe} vs {d_dense}): units cannot be compared")
    return moe_layers, dense_layers


def _find_sources(moe_units: dict, dense: ModelWeights, dense_layers: list[int], split: Split,
                  search_rows: int) -> dict[int, np.ndarray]:
    """Mean best D1 cosine of the first ``search_rows`` units per expert against each dense layer."""
    scores = {m: np.zeros(len(dense_layers)) for m in moe_units}
    for k, d in enumerate(dense_layers):  # one pass over the dense model serves every MoE layer
        d1, _ = unit_features(dense, d, ("gate", "up"), None, split)
        for m, experts in moe_units.items():
            rows = torch.cat([f1[:search_rows] for f1, _ in experts.values()])
            scores[m][k] = float((rows @ d1.T).max(dim=1).values.mean())
        del d1
        trim_heap()
    return scores


def run(a: ModelWeights, b: ModelWeights, *, seed: int = 0, max_layers: int | None = 4, rows_per_expert: int = 32,
        search_rows: int = 4, threshold: float = 0.5, n_permutations: int = 999) -> MethodResult:
    """Upcycling evidence of an (MoE, dense) pair in either order; skipped for other pairs."""
    if a.is_moe == b.is_moe:
        raise NotApplicable("the upcycle detector needs one MoE and one dense model")
    moe, dense = (a, b) if a.is_moe else (b, a)
    moe_layers, dense_layers = _pair(moe, dense)
    rng = np.random.default_rng(seed)
    split = Split.make(dense.info(dense_layers[0], "gate").shape[1], n_permutations, rng, moe.device)
    chosen = pick_layers(moe_layers, max_layers)
    units = {m: expert_units(moe, m, rows_per_expert, split, rng) for m in chosen}
    search = _find_sources(units, dense, dense_layers, split, search_rows)
    layers, total, count = {}, None, 0
    for m in chosen:
        source = dense_layers[int(np.argmax(search[m]))]
        d1, d2 = unit_features(dense, source, ("gate", "up"), None, split)
        experts = {}
        for label, (f1, f2) in units[m].items():
            best = (f1 @ d1.T).argmax(dim=1)
            moment = cross_moment(f2, d2[best])
            cos = (f2 * d2[best]).sum(1).cpu().double().numpy()
            null = relabelled(moment, split.perms) / len(cos)
            experts[label] = {"matched_fraction": float(np.mean(cos > threshold)), "mean_cosine": float(cos.mean()),
                              "null_mean": float(null.mean()), "p_value": sig.permutation_p(float(cos.mean()), null)}
            total = moment if total is None else total + moment
            count += len(cos)
        del d1, d2
        trim_heap()
        layers[m] = {"source_layer": source, "experts": experts,
                     "search_scores": dict(zip(dense_layers, np.round(search[m], 4).tolist()))}
    observed, null = float(np.trace(total)) / count, relabelled(total, split.perms) / count
    fractions = [e["matched_fraction"] for layer in layers.values() for e in layer["experts"].values()]
    details = {"moe": moe.label, "dense": dense.label, "threshold": threshold, "mean_cosine": observed,
               "null_mean": float(null.mean()), "source_layers": {m: layers[m]["source_layer"] for m in layers},
               "layers": layers, "rows_per_expert": rows_per_expert, "n_permutations": n_permutations}
    return MethodResult(name=NAME, null_kind=NULL_KIND, score=float(np.mean(fractions)), p_value=sig.permutation_p(observed, null),
                        z=sig.zscore(observed, null), null=NULL, details=details).decide()
