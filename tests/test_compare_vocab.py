"""Token-level behaviour across vocabularies that differ in part: SmolLM2 vs its vocabulary-extended fine-tune."""

from __future__ import annotations

import pytest

from modelkin.compare.api import compare
from modelkin.compare.behaviour.metrics import _byte_boundaries
from modelkin.compare.settings import BehaviourSettings
from modelkin.synth import derive, train, variants

SETTINGS = BehaviourSettings(max_prompts=8, greedy_tokens=6, mmd_prompts=2, mmd_samples=3, mmd_tokens=6,
                             permutations=200)
NEW_WORDS = [" the capital of", " lighthouse keeper", "fibonacci", " multiplied by"]


def test_byte_boundaries_follow_each_tokenisation():
    token_bytes = [None, b"The", b" cap", b"ital", b" The", b" capital"]
    assert _byte_boundaries([0, 1, 2, 3], token_bytes, b"The capital") == {0: 0, 3: 1, 7: 2, 11: 3}
    # a SentencePiece dummy-prefix space is allowed; offsets count the prompt's own bytes
    assert _byte_boundaries([4, 5], token_bytes, b"The capital") == {3: 0, 11: 1}
    assert _byte_boundaries([1, 2], token_bytes, b"The capital") is None  # does not spell the prompt


@pytest.fixture(scope="module")
def extended_finetune(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    config, tensors = variants.read_dense(smollm2_gguf)
    base = variants.write_hf_checkpoint(root / "base", config, tensors, tokenizer_from=smollm2_gguf)
    del tensors
    extended = derive.extend_vocabulary(base, root / "extended", NEW_WORDS)
    tokens = train.stdlib_tokens(extended, max_tokens=30_000)
    result = train.finetune(extended, root / "finetuned", steps=4, lr=5e-5, seed=0, tokens=tokens, batch=4, seq=64)
    return result.path


def test_vocabulary_extended_finetune_is_related_with_token_metrics_over_the_shared_vocabulary(
        smollm2_gguf, extended_finetune):
    report = compare(smollm2_gguf, extended_finetune, device="cpu", settings=SETTINGS,
                     methods=["pcs", "csu_aligned"]).to_json()
    assert report["verdict"] == "related"
    assert report["fingerprint"]["methods"]["csu_aligned"]["p_value"] < 1e-10
    b = report["behaviour"]
    assert b["same_tokenizer"] is False
    tv = b["token_vocabulary"]
    assert tv["vocab_a"] == 49152 and tv["vocab_b"] == 49152 + len(NEW_WORDS)
    assert tv["shared"] == 49135  # every ordinary token; the 17 special ones never match
    assert b["n_positions"] == tv["aligned_positions"] > 0
    # a light fine-tune: next-token distributions over the shared tokens stay close
    assert b["js_divergence"] < 0.1 and b["top1_agreement"] > 0.8
    # prompts containing a new word are tokenised differently, yet still compared where bytes align
    fib = next(row for row in b["per_prompt"] if "fibonacci" in row["prompt"])
    assert fib["n_positions"] > 0
