"""Must-show: the real SmolLM2-135M Q4_1 GGUF read by modelkin equals transformers' own GGUF loader."""

from __future__ import annotations

import pytest
import torch

from modelkin.checkpoint import open_checkpoint


@pytest.fixture(scope="module")
def hf_state(smollm2_hf_model):
    """(config dict, state dict) of transformers' model loaded from the GGUF (conftest, per session)."""
    model = smollm2_hf_model
    return model.config.to_dict(), {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    with open_checkpoint(smollm2_gguf) as ckpt:
        yield ckpt


def test_every_tensor_matches_transformers(smollm2_gguf, hf_state, ours):
    hf_config, hf_tensors = hf_state
    ckpt = ours
    keys = ckpt.keys()
    assert len(keys) == 272 and ckpt.unmapped == {}
    # transformers materialises the tied lm_head; the GGUF has no output.weight
    assert set(hf_tensors) - set(keys) == {"lm_head.weight"}
    assert hf_config["tie_word_embeddings"] is True and ckpt.config()["tie_word_embeddings"] is True
    assert {ckpt.info(n).dtype for n in keys} == {"Q4_1", "Q8_0", "F32"}
    before = ckpt.bytes_read
    worst = 0.0
    for name in keys:
        mine, theirs = ckpt.get_tensor(name), hf_tensors[name]
        assert mine.shape == theirs.shape, name
        assert mine.dtype == torch.float32 == ckpt.info(name).torch_dtype, name
        worst = max(worst, (mine - theirs).abs().max().item())
    assert worst <= 1e-6
    read = ckpt.bytes_read - before
    assert read == sum(ckpt.info(n).nbytes for n in keys)
    assert 0 < smollm2_gguf.stat().st_size - read < 2_000_000  # header + vocabulary


def test_config_matches_transformers(hf_state, ours):
    hf_config, _ = hf_state
    ours = ours.config()
    assert ours["model_type"] == "llama" and ours["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
    ):
        assert ours[key] == hf_config[key], key
    assert ours["rms_norm_eps"] == 1e-5
    theta = hf_config.get("rope_theta") or hf_config["rope_parameters"]["rope_theta"]
    assert ours["rope_theta"] == theta == 100000.0


def test_metadata_carries_the_vocabulary(ours):
    meta = ours.metadata()
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def test_metadata_equals_the_gguf_packages_own_walk(smollm2_gguf, ours):
    """The reader parses arrays in bulk (a view per string, one view per number array); every value must
    equal what gguf's item-by-item walk gives, on the real 49k-token vocabulary and its merges."""
    import gguf

    stock = {key: field.contents() for key, field in gguf.GGUFReader(smollm2_gguf).fields.items()}
    assert ours.metadata() == stock
    assert len(stock["tokenizer.ggml.merges"]) == 48900
