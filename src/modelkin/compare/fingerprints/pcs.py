"""HuRef's parameter cosine similarity (PCS) over same-shape tensors, with an exact sign-flip null.

PCS = Σ_t <A_t, B_t> / (‖A‖ ‖B‖) over every tensor name both checkpoints hold with the same shape.
Null: flipping the sign of one residual (hidden-size) dimension of B — its embedding column, the input
columns of every projection reading the residual and the output rows of every projection writing it —
is a symmetry of the model, and independent training (zero-mean symmetric init, sign-equivariant
optimisers) is equivariant to it. The test statistic is the summed dot product of the tensors with a
residual axis, T = Σ_j g_j (g_j: the part carried by residual dimension j); under random flips
T_s = Σ_j s_j g_j has mean 0 and variance Σ_j g_j². One pass over the weights, no D×D products.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import modelkin.compare.stats as sig
from modelkin.compare.fingerprints.result import MethodResult, NotApplicable
from modelkin.compare.fingerprints.weights import ModelWeights, parse_name
from modelkin.utils import trim_heap

NAME = "pcs"
NULL_KIND = "exact"  # see result.NULL_KINDS
NULL = ("H0: B's residual dimensions carry independent random signs relative to A's (a symmetry of "
        "independent training); randomisation p over sign flips of the summed dot product of the tensors "
        "with a residual axis (norm weights and biases count in the score only); z from its exact variance.")
# roles whose residual (hidden-size) axis is dim 1, or dim 0
_COLS = {"embed", "lm_head", "q", "k", "v", "qkv", "gate", "up", "router", "expert_gate", "expert_up",
         "shared_gate", "shared_up", "shared_router"}
_ROWS = {"o", "down", "expert_down", "shared_down"}


_ROWS_PER_STEP = 1 << 22  # elements of a tensor's product held at once (16 MB in float32)


def _tensor_terms(ta: torch.Tensor, tb: torch.Tensor, role: str | None,
                  hidden: int) -> tuple[float, torch.Tensor | None]:
    """(<a, b>, residual contributions g or None) of one tensor pair, over blocks of rows so a large tensor
    (an embedding) never needs a full-size product in memory. float32 sums are cascaded (pairwise) in torch
    within a block: relative error ~1e-7, ample for a cosine. The squared norms: ``squared_norm``."""
    if ta.dim() != 2:
        return float((ta * tb).sum()), None
    step = _step(ta)
    reads_cols = role in _COLS and ta.shape[1] == hidden  # residual axis 1: g sums over rows
    reads_rows = role in _ROWS and ta.shape[0] == hidden  # residual axis 0: g is each row's sum
    d = 0.0
    cols, rows = None, []
    for start in range(0, ta.shape[0], step):
        product = ta[start:start + step] * tb[start:start + step]
        d += float(product.sum())
        if reads_cols:
            cols = product.sum(0) if cols is None else cols + product.sum(0)
        elif reads_rows:
            rows.append(product.sum(1))
    return d, cols if reads_cols else (torch.cat(rows) if reads_rows else None)


def _step(t: torch.Tensor) -> int:
    return max(1, _ROWS_PER_STEP // max(1, t.shape[1]))


def squared_norm(t: torch.Tensor) -> float:
    """‖t‖² summed in float32 blocks of ``_ROWS_PER_STEP`` elements (rows for a matrix), block sums added
    in float64: the same value whichever model it is paired with, so it is memoised per model."""
    if t.dim() != 2:
        return float(t.square().sum())
    step, total = _step(t), 0.0
    for start in range(0, t.shape[0], step):
        total += float(t[start:start + step].square().sum())
    return total


def shared_tensors(a: ModelWeights, b: ModelWeights) -> tuple[list[str], list[str]]:
    """Names both hold with equal shapes (float tensors), and names both hold with different shapes."""
    names_b = set(b.source.keys())
    same, mismatched = [], []
    for name in a.source.keys():
        if name not in names_b:
            continue
        ia, ib = a.source.info(name), b.source.info(name)
        if not ia.torch_dtype.is_floating_point or not ib.torch_dtype.is_floating_point:
            continue
        (same if tuple(ia.shape) == tuple(ib.shape) else mismatched).append(name)
    return same, mismatched


def sign_flip_null(g: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Σ_j s_j g_j for n random sign vectors s (in chunks of 1000 to bound memory)."""
    out = []
    for start in range(0, n, 1000):
        signs = rng.integers(0, 2, size=(min(1000, n - start), g.size)) * 2.0 - 1.0
        out.append(signs @ g)
    return np.concatenate(out) if out else np.empty(0)


def run(a: ModelWeights, b: ModelWeights, *, seed: int = 0, n_flips: int = 9999, top: int = 10) -> MethodResult:
    """PCS of a pair, per-tensor cosines (the ``top`` largest tensors in details) and the sign-flip p-value."""
    same, mismatched = shared_tensors(a, b)
    if not same:
        raise NotApplicable("the checkpoints share no tensor name with equal shapes")
    hidden = a.geometry().hidden_size if a.config.get("num_attention_heads") else -1
    dev = a.device
    dot = norm_a = norm_b = 0.0
    g = None
    per_tensor = []
    since_trim = 0
    for name in same:
        ta, tb = a.tensor(name, torch.float32).to(dev), b.tensor(name, torch.float32).to(dev)
        key = parse_name(name)
        # A's norms are the same for every B: kept per model (compare_many's suspect sums them once)
        na = a.derived(("pcs_squared_norm", name), lambda ta=ta: squared_norm(ta))
        nb = squared_norm(tb)
        d, part = _tensor_terms(ta, tb, key[1] if key else None, hidden)
        dot, norm_a, norm_b = dot + d, norm_a + na, norm_b + nb
        per_tensor.append((name, ta.numel(), d / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0))
        if part is not None:
            g = part.cpu().double() if g is None else g + part.cpu().double()  # no float64 on NPUs
        since_trim += ta.numel()
        del ta, tb
        if since_trim >= 1 << 23:  # the products (and float32 copies of bf16 tensors) are freed, small
            trim_heap()  # results kept: without a trim the heap fragments (+0.15 GB on SmolLM2)
            since_trim = 0
    score = dot / math.sqrt(norm_a * norm_b) if norm_a > 0 and norm_b > 0 else 0.0
    per_tensor.sort(key=lambda t: -t[1])
    details = {"tensors": len(same), "params": sum(n for _, n, _ in per_tensor),
               "skipped_shape_mismatch": mismatched,
               "only_in_a": len(set(a.source.keys()) - set(b.source.keys())),
               "only_in_b": len(set(b.source.keys()) - set(a.source.keys())),
               "cosines": {name: cos for name, _, cos in per_tensor[:top]}}
    if g is None:
        raise NotApplicable(f"no shared tensor has a residual axis of hidden_size {hidden}")
    g_np = g.cpu().double().numpy()
    observed, var = float(g_np.sum()), float((g_np * g_np).sum())
    null = sign_flip_null(g_np, n_flips, np.random.default_rng(seed))
    details.update({"test_statistic": observed, "n_flips": n_flips})
    return MethodResult(name=NAME, null_kind=NULL_KIND, score=score, p_value=sig.permutation_p(observed, null),
                        z=observed / math.sqrt(var) if var > 0 else None, null=NULL, details=details).decide()
