"""`compare` on tiny random checkpoints: MoE routing similarity, differing vocabularies, bad prompt input."""

from __future__ import annotations

import json

import pytest

from modelkin.compare.api import compare, resolve_prompts
from modelkin.compare.behaviour.prompts import CATEGORIES, builtin_prompts, load_prompts, select_prompts
from modelkin.compare.settings import BehaviourSettings
from modelkin.errors import InputError
from modelkin.synth.tiny import make_tiny

TINY = BehaviourSettings(max_prompts=3, greedy_tokens=4, mmd_prompts=2, mmd_samples=3, mmd_tokens=4,
                         permutations=200)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "moe_a": make_tiny("pangu_moe", root / "moe_a", seed=0),
        "moe_b": make_tiny("pangu_moe", root / "moe_b", seed=1),
        "llama": make_tiny("llama", root / "llama", seed=0),
        "qwen2": make_tiny("qwen2", root / "qwen2", seed=0),
    }


def test_builtin_prompt_set_covers_every_category():
    prompts = builtin_prompts()
    assert len(prompts) >= 64
    assert {p.category for p in prompts} == set(CATEGORIES)
    assert len({p.id for p in prompts}) == len(prompts)
    chosen = select_prompts(prompts, 12)
    assert [p.category for p in chosen[:6]] == list(CATEGORIES)
    assert len({p.category for p in chosen}) == 6 and len(chosen) == 12


def test_moe_pair_gets_routing_similarity(tiny):
    report = compare(tiny["moe_a"], tiny["moe_b"], device="cpu", settings=TINY, fingerprints=False)
    b = report.behaviour
    assert b["same_tokenizer"] is True
    routing = b["routing"]
    assert routing is not None and routing["layers_compared"] >= 1
    # every real prompt token is routed once per layer: the batch's right padding is not counted
    layers_a = b["routing_a"]["layers"]
    assert layers_a[0]["num_tokens"] == sum(p["n_positions"] for p in b["per_prompt"])
    assert 0.0 <= routing["load_js_mean"] <= 1.0
    assert report.models["a"]["is_moe"] and report.models["b"]["is_moe"]


def test_different_vocabularies_compare_tokens_over_the_shared_bytes(tiny):
    report = compare(tiny["llama"], tiny["qwen2"], device="cpu", settings=TINY, fingerprints=False)
    b = report.behaviour
    assert b["same_tokenizer"] is False
    # a SentencePiece and a byte-level BPE vocabulary: raw strings share 125 tokens, their bytes 355
    tv = b["token_vocabulary"]
    assert (tv["shared"], tv["raw_string_overlap"], tv["vocab_a"], tv["vocab_b"]) == (355, 125, 512, 512)
    for key in ("js_divergence", "top1_agreement", "topk_overlap"):
        assert b[key] is not None
    assert b["n_positions"] == tv["aligned_positions"] > 0
    assert b["greedy_token_agreement"] is None and "vocabularies differ" in b["skipped"]["greedy_tokens"]
    assert b["greedy_text_similarity"] is not None and b["bpb_correlation"] is not None
    assert b["mmd"]["kernel"] == "hamming over characters"
    assert report.verdict == "inconclusive"  # no fingerprints: never unrelated on behaviour alone
    assert any("R7" in r for r in report.reasons)


def test_naming_logits_with_too_few_shared_tokens_is_an_error(tiny, monkeypatch):
    from modelkin.compare.behaviour import metrics

    monkeypatch.setattr(metrics, "MIN_SHARED_TOKENS", 1000)
    settings = BehaviourSettings(max_prompts=2, greedy_tokens=2, metrics=("logits", "bpb"), explicit_metrics=True)
    with pytest.raises(InputError, match="needs identical tokenizers or at least 1000 byte-identical shared"):
        compare(tiny["llama"], tiny["qwen2"], device="cpu", settings=settings, fingerprints=False)
    report = compare(tiny["llama"], tiny["qwen2"], device="cpu", settings=TINY, fingerprints=False)
    assert "only 355 byte-identical shared tokens (need 1000)" in report.behaviour["skipped"]["logits"]


def test_cli_compare_with_bad_prompt_files(tiny, tmp_path, cli):
    missing = cli("compare", tiny["llama"], tiny["llama"], "--prompts", tmp_path / "nope.jsonl", "--no-fingerprint")
    assert missing.returncode == 2
    assert "cannot read prompt file" in missing.stderr and "nope.jsonl" in missing.stderr
    assert "Traceback" not in missing.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    r = cli("compare", tiny["llama"], tiny["llama"], "--prompts", empty, "--no-fingerprint")
    assert r.returncode == 2 and "holds no prompts" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    r = cli("compare", tiny["llama"], tiny["llama"], "--prompts", bad, "--no-fingerprint")
    assert r.returncode == 2 and "bad.jsonl:2: not valid JSON" in r.stderr
    r = cli("compare", tiny["llama"], tiny["qwen2"], "--metrics", "logits,bpb", "--no-fingerprint",
            "--max-prompts", "2")
    # different vocabularies with enough byte-identical tokens: logits metrics run over those
    assert r.returncode == 0, r.stderr
    assert "355 byte-identical shared tokens" in r.stdout.replace("\n", " ")


def test_prompt_file_parsing(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "category": "x", "prompt": "Hello"}\n"just text"\n\n', encoding="utf-8")
    got = load_prompts(f)
    assert [(p.id, p.category, p.prompt) for p in got] == [("a", "x", "Hello"), ("line-2", "user", "just text")]
    f.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(InputError, match="appears twice"):
        load_prompts(f)
    f.write_text('{"id": "a", "prompt": "   "}\n')
    with pytest.raises(InputError, match="missing or empty"):
        load_prompts(f)
    f.write_bytes(b'{"prompt": "\xff"}')
    with pytest.raises(InputError, match="not UTF-8"):
        load_prompts(f)
    with pytest.raises(InputError, match="empty"):
        resolve_prompts([], None)
    with pytest.raises(InputError, match="at least 1"):
        BehaviourSettings(max_prompts=0)


def test_cli_json_and_html_outputs(tiny, tmp_path, cli):
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    r = cli("compare", tiny["moe_a"], tiny["moe_b"], "--device", "cpu", "--max-prompts", "2", "--greedy-tokens",
            "3", "--mmd-prompts", "1", "--mmd-samples", "3", "--mmd-tokens", "3", "--methods", "std_curve,pcs",
            "--json", out, "--html", page)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["verdict"] in ("related", "unrelated", "inconclusive")
    for key in ("verdict", "reasons", "fingerprint", "behaviour"):
        assert key in data
    for key in ("js_divergence", "top1_agreement", "bpb_correlation", "bpb_p_value", "greedy_text_similarity"):
        assert key in data["behaviour"]
    assert set(data["fingerprint"]["methods"]) == {"std_curve", "pcs"}
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "data:image/png;base64," in html
    assert f"verdict: {data['verdict'].upper()}" in r.stdout
