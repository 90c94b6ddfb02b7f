"""inspect.spectral: singular values vs numpy, ranks, weightwatcher-style alpha, expert sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelkin.inspect import inspect_checkpoint
from modelkin.inspect.spectral import (
    SpectralOptions,
    fit_powerlaw,
    sampled_experts,
    spectral_stats,
)
from modelkin.inspect.stats import AccumulationPolicy, ParallelAccumulator, tensor_stats
from tests.ckpt_factory import write_safetensors_checkpoint
from tests.inspect_layouts import pangu_moe_tensors


@pytest.mark.parametrize("shape", [(120, 70), (70, 120)])
def test_spectral_stats_match_numpy_svd(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = spectral_stats(w)
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    assert got["exact"] and got["n_evals"] == 70
    assert got["spectral_norm"] == pytest.approx(s[0], rel=1e-9)
    assert got["frobenius_norm"] == pytest.approx(math.sqrt((s ** 2).sum()), rel=1e-12)
    assert got["stable_rank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-9)
    p = s / s.sum()
    assert got["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert got["log_spectral_norm"] == pytest.approx(math.log10(s[0] ** 2), rel=1e-9)
    fit = fit_powerlaw(s ** 2)
    assert got["alpha"] == pytest.approx(fit["alpha"], rel=1e-9)
    assert got["alpha_weighted"] == pytest.approx(fit["alpha"] * math.log10(s[0] ** 2), rel=1e-9)


def test_lowrank_path_for_large_matrices():
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.standard_normal((200, 150)) * np.linspace(1, 10, 150)
                         @ rng.standard_normal((150, 150)))
    got = spectral_stats(w, SpectralOptions(max_exact=50, lowrank=40))
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    assert not got["exact"] and got["n_evals"] <= 40 and math.isnan(got["effective_rank"])
    assert got["spectral_norm"] == pytest.approx(s[0], rel=1e-3)
    assert got["stable_rank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=2e-3)


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_powerlaw_mle_recovers_the_exponent(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    x = (rng.pareto(alpha - 1.0, 3000) + 1.0) * 0.3  # density ∝ x^-alpha above 0.3
    fit = fit_powerlaw(np.concatenate([rng.uniform(0.01, 0.3, 300), x]))
    assert fit["alpha"] == pytest.approx(alpha, abs=0.15)
    assert 0.2 < fit["xmin"] < 0.6 and fit["ks_distance"] < 0.05


def test_powerlaw_candidate_subset_matches_full_search():
    rng = np.random.default_rng(3)
    x = (rng.pareto(2.0, 1500) + 1.0)
    full, subset = fit_powerlaw(x, max_candidates=10_000), fit_powerlaw(x, max_candidates=300)
    assert subset["alpha"] == pytest.approx(full["alpha"], abs=0.05)
    assert subset["ks_distance"] >= full["ks_distance"]


def test_powerlaw_degenerate_inputs():
    assert math.isnan(fit_powerlaw(np.array([1.0]))["alpha"])
    assert math.isnan(fit_powerlaw(np.zeros(10))["alpha"])
    assert math.isnan(fit_powerlaw(np.ones(10))["alpha"])  # one distinct value: no tail to fit


def test_sampled_experts():
    assert sampled_experts(64, None) == set(range(64))
    assert sampled_experts(64, 4) == {0, 21, 42, 63}
    assert sampled_experts(8, 100) == set(range(8))


def test_spectral_scan_samples_experts(tmp_path):
    sd, config = pangu_moe_tensors(layers=1, experts=8, dtype=torch.float32)
    path = write_safetensors_checkpoint(tmp_path, sd, config)
    res = inspect_checkpoint(path, device="cpu", select="experts,attention", spectral=True,
                             sample_experts=2, cache=False)
    with_spectral = {t.name for t in res.tensors if t.spectral is not None}
    experts = {t.expert for t in res.tensors if t.name in with_spectral and t.expert is not None}
    assert experts == {0, 7}
    assert "model.layers.0.self_attn.q_proj.weight" in with_spectral
    assert "model.layers.0.self_attn.q_proj.bias" not in with_spectral  # vectors have no spectrum
    q = res.by_name()["model.layers.0.self_attn.q_proj.weight"].spectral
    s = np.linalg.svd(sd["model.layers.0.self_attn.q_proj.weight"].double().numpy(), compute_uv=False)
    assert q["spectral_norm"] == pytest.approx(s[0], rel=1e-9)
    assert "spectral_alpha" in res.to_csv().splitlines()[0]


@pytest.mark.parametrize("histogram", [False, True])
def test_parallel_workers_agree_with_one(histogram):
    x = torch.randn(3_000_017, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    policy = AccumulationPolicy(torch.float64, 1 << 16, histogram=histogram)
    acc = ParallelAccumulator(policy, workers=3)
    try:
        acc.update(x)
        many = acc.result()
    finally:
        acc.close()
    one = tensor_stats(x, policy)
    for key, value in one.items():
        assert many[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
