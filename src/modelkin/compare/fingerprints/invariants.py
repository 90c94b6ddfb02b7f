"""HuRef-style invariant terms (ICS): attention and MLP maps seen through shared-token embeddings.

X = embedding rows of N tokens both vocabularies hold. For selected layers (default the last two of
each model) the N×N terms X·Wqᵀ·Wk·Xᵀ, X·Wvᵀ·Woᵀ·Xᵀ and the gated-MLP term ((X·Wgᵀ)⊙(X·Wuᵀ))·Wd... ·Xᵀ
(GQA key/value heads repeated per query head, attention/MLP norm weights folded into X) are invariant
to permuting or rescaling heads, MLP neurons and residual dimensions. Each row is standardised;
ICS = cosine of the flattened stacks. MoE layers sum the MLP term over every expert and the shared one.
"""

from __future__ import annotations

import re

import numpy as np
import torch

import modelkin.compare.stats as sig
from modelkin.compare.fingerprints.heads import repeat_kv
from modelkin.compare.fingerprints.result import MethodResult, NotApplicable
from modelkin.compare.fingerprints.weights import ATTENTION_ROLES, ModelWeights, vocab_strings
from modelkin.utils import trim_heap

NAME = "invariants"
NULL_KIND = "descriptive"  # see result.NULL_KINDS
NULL = ("H0: B's invariant terms have no token-by-token correspondence with A's; exact permutation p over "
        "random relabellings of B's tokens (rows and columns of every B term permuted jointly). Token "
        "structure that independently trained models learn from similar data (frequency, meaning) is not "
        "in this null, so read a small p together with the score.")
_SPECIAL = re.compile(r"^(<\|.*\|>|<[^<>\s]*>|\[[A-Z_]+\])$")


def shared_tokens(a: ModelWeights, b: ModelWeights, n: int) -> tuple[list[int], list[int], str]:
    """Ids in A and in B of up to ``n`` tokens both vocabularies spell the same way (last ids first)."""
    rows_a, rows_b = w_rows(a), w_rows(b)
    va, vb = vocab_strings(a), vocab_strings(b)
    if va is None or vb is None:
        if rows_a != rows_b:
            raise NotApplicable("no vocabulary in one checkpoint and the embeddings differ in size")
        ids = list(range(rows_a))[-n:]
        return ids, ids, f"no vocabulary found; assumed identical ids (last {len(ids)})"
    where_b = {t: i for i, t in enumerate(vb[:rows_b]) if t}
    same = va[:rows_a] == vb[:rows_b]
    pairs = []  # from A's last id down; one vocabulary needs only the last n (a whole scan took 0.13 s)
    for i in range(min(rows_a, len(va)) - 1, -1, -1):
        t = va[i]
        if t in where_b and not _SPECIAL.match(t):
            pairs.append((i, where_b[t]))
            if same and len(pairs) == n:
                break
    if len(pairs) < 16:
        raise NotApplicable(f"the vocabularies share only {len(pairs)} ordinary tokens")
    chosen = pairs[:n][::-1]
    how = "same vocabulary" if same else f"{len(pairs)} shared token strings"
    return [i for i, _ in chosen], [j for _, j in chosen], f"{how}; last {len(chosen)} of them by A's id"


def _embedding_role(w: ModelWeights) -> str:
    for role in ("embed", "lm_head"):
        if w.has(None, role):
            return role
    raise NotApplicable(f"{w.label} has no embedding matrix")


def w_rows(w: ModelWeights) -> int:
    """Number of embedding rows (vocabulary entries with a vector)."""
    return int(w.info(None, _embedding_role(w)).shape[0])


def embedding(w: ModelWeights, rows: list[int]) -> torch.Tensor:
    """Rows of the input embedding (lm_head for checkpoints that only store it)."""
    return w.rows(_embedding_role(w), rows)


def _mlp_term(w: ModelWeights, layer: int, x: torch.Tensor) -> torch.Tensor:
    if w.has(layer, "gate"):
        parts = [("gate", "up", "down", None)]
    else:
        parts = [("expert_gate", "expert_up", "expert_down", e) for e in w.experts(layer)]
        if w.has(layer, "shared_gate"):
            parts.append(("shared_gate", "shared_up", "shared_down", None))
    if not parts:
        raise NotApplicable(f"{w.label} layer {layer} has no MLP weights")
    total = torch.zeros(x.shape[0], x.shape[0], device=x.device)
    for g, u, d, e in parts:
        act = (x @ w.get(layer, g, e).T) * (x @ w.get(layer, u, e).T)
        total += act @ (x @ w.get(layer, d, e)).T
        if len(parts) > 1:  # an MoE's experts: each one's float32 copies are freed here (see trim_heap)
            del act
            trim_heap()
    return total


def layer_terms(w: ModelWeights, layer: int, x: torch.Tensor) -> list[torch.Tensor]:
    """[QK, VO, MLP] N×N terms of one layer, rows standardised (float32 on the device)."""
    geo = w.geometry()
    xa = x * _gain(w, layer, "attn_norm")
    xm = x * _gain(w, layer, w.mlp_input_norm(layer))
    q, k, v, o = (w.get(layer, r) for r in ATTENTION_ROLES)
    k, v = repeat_kv(k, geo.num_heads, geo.num_kv_heads), repeat_kv(v, geo.num_heads, geo.num_kv_heads)
    qk = (xa @ q.T) @ (xa @ k.T).T
    vo = (xa @ v.T) @ (x @ o).T
    return [standardise_rows(t) for t in (qk, vo, _mlp_term(w, layer, xm))]


def stacked_terms(w: ModelWeights, ids: list[int], layers: list[int]) -> torch.Tensor:
    """[3·layers, N, N]: every chosen layer's terms over the embedding rows of ``ids``."""
    x = embedding(w, ids)
    return torch.stack([t for layer in layers for t in layer_terms(w, layer, x)])


def _gain(w: ModelWeights, layer: int, role: str) -> torch.Tensor | float:
    gain = w.norm_gain(layer, role)
    return 1.0 if gain is None else gain


def standardise_rows(t: torch.Tensor) -> torch.Tensor:
    sd = t.std(dim=1, keepdim=True, unbiased=False).clamp_min(torch.finfo(t.dtype).tiny)
    return (t - t.mean(dim=1, keepdim=True)) / sd


def _token_null(ta: torch.Tensor, tb: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """Σ <A terms, B terms with tokens relabelled by π> for n random π (rows and columns jointly)."""
    flat_a, flat_b = ta.reshape(-1), tb.reshape(tb.shape[0], -1)
    size = tb.shape[1]
    gen = torch.Generator().manual_seed(seed)
    out = np.empty(n)
    gathered = torch.empty_like(flat_b)  # one buffer for every draw: no fresh 6 MB allocation per draw
    for i in range(n):
        perm = torch.randperm(size, generator=gen).to(tb.device)
        # one gather of (perm[i], perm[j]) per element: the same values, in the same order, as
        # tb[:, perm][:, :, perm], without the intermediate copy
        flat = (perm[:, None] * size + perm[None, :]).reshape(-1)
        torch.index_select(flat_b, 1, flat, out=gathered)
        out[i] = float(torch.dot(flat_a, gathered.reshape(-1)))
    return out


def pick(w: ModelWeights, layers: list[int] | None) -> list[int]:
    """Layers by position (negative counts from the end); the last two by default."""
    chosen = layers if layers is not None else [-2, -1]
    try:
        return [w.layers[i] for i in chosen]
    except IndexError:
        raise NotApplicable(f"{w.label} has {w.num_layers} layers; cannot pick {chosen}") from None


def run(a: ModelWeights, b: ModelWeights, *, seed: int = 0, n_tokens: int = 512, layers: list[int] | None = None,
        n_permutations: int = 199) -> MethodResult:
    """ICS of a pair with a token-relabelling permutation p-value (descriptive). Its cost grows with
    ``n_tokens`` squared (token-by-token terms, relabelled ``n_permutations`` times): 512 tokens by default
    (1024 before; the score moves little, and it never decides)."""
    ids_a, ids_b, how = shared_tokens(a, b, n_tokens)
    la, lb = pick(a, layers), pick(b, layers)
    # A's terms depend on A and the tokens alone: compare_many's suspect makes them once for candidates that
    # share a vocabulary (6 MB at 512 tokens)
    ta = a.derived((NAME, "terms", tuple(ids_a), tuple(la)), lambda: stacked_terms(a, ids_a, la))
    tb = stacked_terms(b, ids_b, lb)
    norm = float(ta.norm()) * float(tb.norm())
    observed = float(torch.dot(ta.reshape(-1), tb.reshape(-1))) / norm
    per_term = (ta * tb).flatten(1).sum(1) / (ta.flatten(1).norm(dim=1) * tb.flatten(1).norm(dim=1))
    null = _token_null(ta, tb, n_permutations, seed) / norm
    names = [f"{kind}@{x}/{y}" for x, y in zip(la, lb) for kind in ("qk", "vo", "mlp")]
    details = {"ics": 100.0 * observed, "tokens": len(ids_b), "token_selection": how, "layers_a": la,
               "layers_b": lb, "per_term": dict(zip(names, per_term.tolist())), "n_permutations": n_permutations,
               "null_mean": float(null.mean()), "null_sd": float(null.std(ddof=1))}
    return MethodResult(name=NAME, null_kind=NULL_KIND, score=observed, p_value=sig.permutation_p(observed, null),
                        z=sig.zscore(observed, null), null=NULL, details=details).decide()
