"""Sampling filters, the exponential-noise categorical draw, and KV-cache masks/positions: exact values."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from modelkin.runtime.kv_cache import KVCache, attention_mask, positions_from_mask
from modelkin.runtime.sampling import (
    categorical,
    make_sampler,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)

PROBS = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k():
    assert kept(top_k_filter(LOGITS, 2)) == [1, 3]
    assert kept(top_k_filter(LOGITS, 10)) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("p", "expected"), [(0.5, [1]), (0.8, [1, 3]), (0.81, [1, 2, 3]), (1.0, [0, 1, 2, 3])]
)
def test_top_p(p, expected):
    assert kept(top_p_filter(LOGITS, p)) == expected


def test_min_p():
    assert kept(min_p_filter(LOGITS, 0.2)) == [1, 2, 3]  # threshold 0.1
    assert kept(min_p_filter(LOGITS, 0.7)) == [1]


def test_categorical_follows_softmax_and_is_seeded():
    logits = LOGITS.expand(40000, 4)
    draws = categorical(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, PROBS[0], atol=0.01)
    again = categorical(logits, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_make_sampler():
    assert make_sampler(0.0)(LOGITS).tolist() == [1]
    sampler = make_sampler(1.0, top_k=1)
    assert all(sampler(LOGITS, torch.Generator().manual_seed(s)).item() == 1 for s in range(20))
    nucleus = make_sampler(1.0, top_p=0.81)  # token 0 (p = 0.05) is outside the nucleus
    draws = {nucleus(LOGITS, torch.Generator().manual_seed(s)).item() for s in range(100)}
    assert draws == {1, 2, 3}
    hot = make_sampler(100.0, top_p=0.81)  # temperature first: nearly uniform, all 4 survive
    assert {hot(LOGITS, torch.Generator().manual_seed(s)).item() for s in range(100)} == {0, 1, 2, 3}


def test_attention_mask_left_padding():
    valid = torch.tensor([[False, True, True], [True, True, True]])
    mask = attention_mask(valid, 0, 3)
    assert mask[0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # a padding query sees itself only
    assert mask[1].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    windowed = attention_mask(valid[1:], 0, 3, window=2)
    assert windowed[0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert positions_from_mask(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


def test_kv_cache_reserve_and_update():
    cache = KVCache(
        num_layers=1, batch_size=2, num_kv_heads=1, head_dim=2, max_len=4, dtype=torch.float32, device="cpu"
    )
    positions, mask = cache.reserve(2, torch.tensor([[0, 1], [1, 1]]))
    assert positions.tolist() == [[0, 0], [0, 1]] and mask.shape == (2, 2, 2)
    k = torch.arange(8.0).view(2, 1, 2, 2)
    keys, _ = cache.update(0, k, k)
    cache.advance(2)
    assert torch.equal(keys, k)
    positions, mask = cache.reserve(1)
    assert positions.tolist() == [[1], [2]]
    assert mask[:, 0].int().tolist() == [[0, 1, 1], [1, 1, 1]]  # padding slot stays hidden
    cache.advance(1)
    cache.reserve(1)
    cache.advance(1)
    with pytest.raises(Exception, match="exceeds the KV cache of 4 slots"):
        cache.reserve(1)
    assert math.isclose(cache.nbytes(), 2 * 2 * 1 * 4 * 2 * 4)


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_split_gemv_matches_linear(column_major, bias):
    from modelkin.runtime.cpu_kernels import Linear, prefer_gemv_layout

    gen = torch.Generator().manual_seed(0)
    layer = Linear(256, 1536, bias=bias)  # wide: stored column-major by prefer_gemv_layout
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1536, 256, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(1536, generator=gen))
    if column_major:
        prefer_gemv_layout(layer)
    assert layer.weight.stride() == ((1, 1536) if column_major else (256, 1))
    x = torch.randn(1, 1, 256, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = layer(x)
    finally:
        torch.set_num_threads(threads)
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert split.shape == plain.shape == (1, 1, 1536)
    assert (split - plain).abs().max().item() <= 1e-4


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_batched_linear_matches_float64_reference(column_major, bias):
    from modelkin.runtime import cpu_kernels
    from modelkin.runtime.cpu_kernels import Linear, prefer_gemv_layout

    gen = torch.Generator().manual_seed(1)
    layer = Linear(576, 1536, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1536, 576, generator=gen) * 0.05)
        if bias:
            layer.bias.copy_(torch.randn(1536, generator=gen))
    if column_major:
        prefer_gemv_layout(layer)
    x = torch.randn(3, 8, 576, generator=gen)  # 24 rows, as compare's greedy batch
    with torch.inference_mode():
        y = layer(x)
    ref = x.double() @ layer.weight.detach().double().T + (layer.bias.detach().double() if bias else 0.0)
    assert y.dtype == torch.float32 and y.shape == (3, 8, 1536)
    assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    if cpu_kernels._ONEDNN:  # the batch went through oneDNN, not the BLAS F.linear: its own rounding
        assert torch.equal(y, torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], ""))


def test_batched_linear_keeps_gradients_on_the_plain_path():
    from modelkin.runtime.cpu_kernels import Linear

    gen = torch.Generator().manual_seed(2)
    layer = Linear(64, 32)
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    y.square().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and layer.weight.grad.shape == (32, 64)


def test_batched_linear_blas_override_runs_f_linear():
    code = ("import torch; from modelkin.runtime import cpu_kernels as k; l = k.Linear(64, 96); "
            "x = torch.randn(5, 64)\n"
            "with torch.no_grad(): y = l(x)\n"
            "assert not k._ONEDNN and torch.equal(y, torch.nn.functional.linear(x, l.weight, l.bias))\n"
            "print('ok')")
    env = {**os.environ, "MODELKIN_CPU_LINEAR": "blas"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_batched_linear_falls_back_to_f_linear_where_onednn_refuses(monkeypatch):
    from modelkin.runtime import cpu_kernels

    def refuse(*args):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(cpu_kernels, "_ONEDNN", True)
    monkeypatch.setattr(cpu_kernels, "_onednn_op", refuse)
    layer = cpu_kernels.Linear(64, 96)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias)) and not cpu_kernels._ONEDNN


def test_prefill_batches_minimise_padded_tokens_plus_batch_cost():
    import itertools
    import random

    from modelkin.runtime.continuations import BATCH_COST_TOKENS, prefill_batches

    lengths = [5, 8, 8, 9, 10, 11, 12, 14, 15, 15, 17, 17, 18, 18, 18, 20, 21, 21, 22, 25, 33, 40, 40, 43]
    runs = prefill_batches(lengths, 341)  # SmolLM2's default prompts under compare's logits budget
    assert [[lengths[i] for i in r] for r in runs] == [
        [5, 8, 8, 9, 10, 11, 12], [14, 15, 15, 17, 17, 18, 18, 18], [20, 21, 21, 22, 25], [33, 40, 40, 43]]
    assert sum(len(r) * lengths[r[-1]] for r in runs) == 525  # greedy filling pads to 643
    assert prefill_batches([3, 500], 100, order=[7, 2]) == [[7], [2]]  # a prompt over the budget runs alone

    def cost(parts):
        return sum(len(p) * p[-1] + BATCH_COST_TOKENS for p in parts)

    rng = random.Random(0)
    for _ in range(40):  # against every split of the sorted lengths into consecutive runs
        ls = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 8)))
        budget = rng.randint(30, 200)
        feasible = []
        for cuts in itertools.product([False, True], repeat=len(ls) - 1):
            parts, start = [], 0
            for k, c in enumerate(cuts, 1):
                if c:
                    parts.append(ls[start:k])
                    start = k
            parts.append(ls[start:])
            if all(len(p) == 1 or len(p) * p[-1] <= budget for p in parts):
                feasible.append(cost(parts))
        got = prefill_batches(ls, budget)
        assert [i for r in got for i in r] == list(range(len(ls)))
        assert cost([[ls[i] for i in r] for r in got]) == min(feasible)
