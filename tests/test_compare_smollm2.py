"""`compare` on the real SmolLM2-135M: vs itself, vs a function-preserving permuted copy, vs an
independently initialised twin (the issue's must-show cases, with a small prompt budget)."""

from __future__ import annotations

import json
import math

import pytest

from modelkin.compare.api import compare
from modelkin.compare.behaviour.outputs import OutputCache
from modelkin.compare.settings import BehaviourSettings
from modelkin.synth import variants

SETTINGS = BehaviourSettings(max_prompts=6, greedy_tokens=8, mmd_prompts=2, mmd_samples=4, mmd_tokens=6,
                             permutations=500)
# the fastest weight methods keep the module well under a minute; pcs is the one whose null may decide
METHODS = ["std_curve", "spectral", "pcs"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small batches: on a shared 2-core machine intra-op threads mostly spin against other processes
    (measured 5-15x slower than one thread here); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def relatives(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("relatives")
    config, tensors = variants.read_dense(smollm2_gguf)
    perm = variants.write_hf_checkpoint(root / "perm", config, variants.permute_dense(config, tensors, seed=5),
                                        tokenizer_from=smollm2_gguf)
    twin = variants.write_hf_checkpoint(root / "twin", config, variants.random_like(config, tensors, seed=6),
                                        tokenizer_from=smollm2_gguf)
    return {"perm": perm, "twin": twin}


@pytest.fixture(scope="module")
def cache():
    return OutputCache(max_entries=2)  # SmolLM2's own outputs are computed once for the module


@pytest.fixture(scope="module")
def vs_perm(smollm2_gguf, relatives, cache):
    return compare(smollm2_gguf, relatives["perm"], device="cpu", settings=SETTINGS, methods=METHODS,
                   cache=cache).to_json()


@pytest.fixture(scope="module")
def vs_twin(smollm2_gguf, relatives, cache):
    return compare(smollm2_gguf, relatives["twin"], device="cpu", settings=SETTINGS, methods=METHODS,
                   cache=cache).to_json()


def test_permuted_copy_has_the_same_tokenizer_and_nearly_equal_logits(smollm2_gguf, relatives, vs_perm):
    import modelkin

    a = modelkin.load(smollm2_gguf, device="cpu")
    b = modelkin.load(relatives["perm"], device="cpu")
    text = "今天早上 the capital of France is\n def f(x): return 2*x"
    assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    ids = a.tokenizer.encode(text)
    la, lb = a.logits([ids]), b.logits([ids])
    assert (la - lb).abs().max().item() < 1e-3 * la.abs().max().item()
    assert a.score(text).bits_per_byte == pytest.approx(b.score(text).bits_per_byte, rel=1e-5)
    # compare's bits per byte come from its own batched pass: they must equal Model.score's
    for row in vs_perm["behaviour"]["per_prompt"][:3]:
        assert row["bpb_a"] == pytest.approx(a.score(row["prompt"]).bits_per_byte, rel=1e-4)


def test_permuted_copy_behaves_identically_and_is_called_related(vs_perm):
    b = vs_perm["behaviour"]
    assert b["same_tokenizer"] is True
    assert b["js_divergence"] < 1e-6 and b["js_divergence_max"] < 1e-5
    assert b["top1_agreement"] >= 0.99 and b["topk_overlap"] >= 0.99
    assert b["greedy_exact_match"] == 1.0 and b["greedy_text_similarity"] == 1.0
    for row in b["per_prompt"]:
        assert row["bpb_b"] == pytest.approx(row["bpb_a"], rel=1e-4)
        assert row["greedy_a"] == row["greedy_b"]
    assert b["mmd"]["p_value"] > 0.05  # samples from the same distribution
    assert vs_perm["verdict"] == "related"
    assert vs_perm["reasons"][0].startswith("R2")


def test_twin_behaves_differently_and_is_called_unrelated(vs_twin):
    b = vs_twin["behaviour"]
    assert b["js_divergence"] > 0.5
    assert b["top1_agreement"] < 0.1
    assert b["greedy_text_similarity"] < 0.5 and b["greedy_exact_match"] == 0.0
    assert b["bpb_b"] > 2 * b["bpb_a"]  # an untrained model spreads its mass over the whole vocabulary
    for e in vs_twin["evidence"]:
        assert e["p_value"] >= 0.05, e
    assert vs_twin["verdict"] == "unrelated"
    assert vs_twin["reasons"][0].startswith("R5")


def test_smollm2_against_itself(smollm2_gguf, cache):
    # side A comes from the cache, side B is a second load and run (with its own sampling seed)
    data = compare(smollm2_gguf, smollm2_gguf, device="cpu", settings=SETTINGS, fingerprints=False,
                   cache=cache).to_json()
    b = data["behaviour"]
    assert b["js_divergence"] == 0.0 and b["kl_ab"] == 0.0
    assert b["top1_agreement"] == 1.0 and b["topk_overlap"] == 1.0
    assert b["greedy_exact_match"] == 1.0 and b["greedy_token_agreement"] == 1.0
    assert b["bpb_correlation"] == pytest.approx(1.0)
    assert all(row["greedy_a"] == row["greedy_b"] for row in b["per_prompt"])
    assert b["mmd"]["p_value"] > 0.05
    assert data["verdict"] == "related" and data["fingerprint"] is None
    assert data["reasons"][0].startswith("R2")


def test_report_json_is_complete_and_finite(vs_perm):
    text = json.dumps(vs_perm, allow_nan=False)
    assert "NaN" not in text
    fp = vs_perm["fingerprint"]["methods"]
    assert set(fp) == set(METHODS)
    assert len(fp["std_curve"]["curves"]["a"]["curves"]["q"]) == 30
    assert vs_perm["models"]["a"]["timings"]["load_s"] > 0
    assert all(math.isfinite(r["js"]) for r in vs_perm["behaviour"]["per_prompt"])
