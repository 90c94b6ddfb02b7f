"""Behaviour metrics and tests against independent implementations (scipy, brute force), no model needed."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, pearsonr, spearmanr

from modelkin.compare import stats as stattests
from modelkin.compare.behaviour import metrics as behaviour
from modelkin.compare.behaviour.routing import load_js, routing_layers, routing_similarity


def _logprobs(rng: np.random.Generator, t: int, v: int) -> torch.Tensor:
    return torch.tensor(rng.normal(size=(t, v)) * 2.0).log_softmax(-1).float()


def test_js_and_kl_match_scipy():
    rng = np.random.default_rng(0)
    a, b = _logprobs(rng, 5, 40), _logprobs(rng, 5, 40)
    d = behaviour.position_divergences(a, b)
    p, q = a.double().exp().numpy(), b.double().exp().numpy()
    for t in range(5):
        assert d["js"][t].item() == pytest.approx(jensenshannon(p[t], q[t], base=2) ** 2, rel=1e-9, abs=1e-12)
        assert d["kl_ab"][t].item() == pytest.approx(entropy(p[t], q[t], base=2), rel=1e-9)
        assert d["kl_ba"][t].item() == pytest.approx(entropy(q[t], p[t], base=2), rel=1e-9)


def test_long_tables_run_in_row_chunks_with_the_same_values_as_one_pass():
    """A 45-position table over a 49152-token vocabulary is split into chunks of 21 rows: every value equals
    the single-pass one exactly, and scipy's per row."""
    rng = np.random.default_rng(2)
    a, b = _logprobs(rng, 45, 49152).half(), _logprobs(rng, 45, 49152).half()
    chunked, whole = behaviour.position_divergences(a, b), behaviour._divergences(a, b)
    for key in ("js", "kl_ab", "kl_ba"):
        assert chunked[key].shape == (45,) and torch.equal(chunked[key], whole[key])
    p, q = a.double().exp(), b.double().exp()
    p, q = (p / p.sum(-1, keepdim=True)).numpy(), (q / q.sum(-1, keepdim=True)).numpy()
    for t in (0, 21, 44):
        assert chunked["js"][t].item() == pytest.approx(jensenshannon(p[t], q[t], base=2) ** 2, rel=1e-9)


def test_js_of_identical_tables_is_exactly_zero_and_bounded_by_one():
    rng = np.random.default_rng(1)
    a = _logprobs(rng, 7, 100).half()
    d = behaviour.position_divergences(a, a.clone())
    assert torch.count_nonzero(d["js"]) == 0 and torch.count_nonzero(d["kl_ab"]) == 0
    one_hot_a = torch.full((1, 4), -math.inf)
    one_hot_a[0, 0] = 0.0
    one_hot_b = torch.full((1, 4), -math.inf)
    one_hot_b[0, 3] = 0.0
    assert behaviour.position_divergences(one_hot_a, one_hot_b)["js"].item() == pytest.approx(1.0)


def test_topk_agreement_and_greedy_token_agreement():
    ids_a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ids_b = torch.tensor([[1, 9, 2], [5, 4, 0]])
    top1, overlap = behaviour.topk_agreement(ids_a, ids_b)
    assert top1.tolist() == [True, False]
    assert overlap.tolist() == pytest.approx([2 / 3, 2 / 3])
    assert behaviour.greedy_token_agreement([1, 2, 3, 4], [1, 2, 9, 4, 5]) == (3 / 5, 2)
    assert behaviour.greedy_token_agreement([], []) == (1.0, 0)


def test_text_similarity_is_difflib_ratio():
    assert behaviour.text_similarity("Paris.", "Paris.") == 1.0
    assert behaviour.text_similarity("abcd", "abxd") == pytest.approx(0.75)
    assert behaviour.text_similarity("", "") == 1.0


@pytest.mark.parametrize("method,reference", [("pearson", pearsonr), ("spearman", spearmanr)])
def test_correlation_statistic_matches_scipy_and_p_value_is_exact_for_small_n(method, reference):
    x = [0.9, 1.3, 2.2, 1.1, 3.0, 2.0]
    y = [1.0, 1.1, 2.5, 1.6, 2.8, 2.4]
    res = stattests.correlation_test(x, y, method=method, permutations=5000, seed=3)
    assert res.statistic == pytest.approx(reference(x, y)[0], rel=1e-9)
    # exact one-sided permutation p over all 720 pairings
    xa = np.array(x) if method == "pearson" else np.argsort(np.argsort(x)).astype(float)
    ya = np.array(y) if method == "pearson" else np.argsort(np.argsort(y)).astype(float)
    rs = [np.corrcoef(xa, ya[list(perm)])[0, 1] for perm in itertools.permutations(range(6))]
    exact = np.mean([r >= res.statistic - 1e-12 for r in rs])
    assert res.p_value == pytest.approx(exact, abs=0.02)


def test_correlation_test_rejects_short_input():
    with pytest.raises(ValueError):
        stattests.correlation_test([1.0, 2.0], [2.0, 1.0])


def _brute_mmd2(xs, ys, length):
    def k(u, v):
        u = (list(u) + [-1] * length)[:length]
        v = (list(v) + [-1] * length)[:length]
        return sum(a == b for a, b in zip(u, v)) / length

    m, n = len(xs), len(ys)
    kxx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(ys[i], ys[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x, y) for x in xs for y in ys) / (m * n)
    return kxx + kyy - 2 * kxy


def test_mmd_statistic_matches_brute_force_and_detects_different_samplers():
    rng = np.random.default_rng(4)
    same_a = [[[int(t) for t in rng.integers(0, 3, size=6)] for _ in range(6)] for _ in range(3)]
    same_b = [[[int(t) for t in rng.integers(0, 3, size=6)] for _ in range(6)] for _ in range(3)]
    other = [[[int(t) for t in rng.integers(50, 90, size=rng.integers(3, 7))] for _ in range(6)] for _ in range(3)]
    res = stattests.mmd_test(same_a, other, length=6, permutations=500, seed=0)
    brute = np.mean([_brute_mmd2(x, y, 6) for x, y in zip(same_a, other)])
    assert res.statistic == pytest.approx(brute, rel=1e-12)
    assert res.p_value < 0.01
    assert stattests.mmd_test(same_a, same_b, length=6, permutations=500, seed=0).p_value > 0.05
    with pytest.raises(ValueError):
        stattests.mmd_test([[[1]]], [[[1]]], length=1)


def test_routing_similarity_reads_runtime_telemetry_json():
    a = {"layers": [{"layer": 0, "expert_counts": [10, 0, 5, 5], "token_entropy": 1.0},
                    {"layer": 1, "expert_counts": [5, 5, 5, 5], "token_entropy": 1.2},
                    {"layer": 2, "expert_counts": [1, 2, 3, 14], "token_entropy": 0.7}]}
    b = {"layers": [{"layer": 0, "expert_counts": [0, 10, 5, 5], "token_entropy": 1.1},
                    {"layer": 1, "expert_counts": [5, 5, 5, 5], "token_entropy": 1.3},
                    {"layer": 2, "expert_counts": [14, 3, 2, 1], "token_entropy": 0.6}]}
    assert sorted(routing_layers(a)) == [0, 1, 2]
    sim, why = routing_similarity(a, b)
    assert why is None and sim["layers_compared"] == 3
    assert sim["sorted_load_js_mean"] == pytest.approx(0.0, abs=1e-12)
    assert sim["per_layer"][0]["load_js"] == pytest.approx(
        jensenshannon([10, 0, 5, 5], [0, 10, 5, 5], base=2) ** 2, rel=1e-9)
    assert sim["entropy_correlation"] == pytest.approx(pearsonr([1.0, 1.2, 0.7], [1.1, 1.3, 0.6])[0])
    assert load_js([1, 1], [1, 1]) == 0.0
    assert routing_similarity(None, b) == (None, "routing telemetry is missing for a model")
