"""Fuzzing config.json through ``modelkin.load``: missing or contradictory fields, wrong types, absurd
sizes. A config that loads must also run (logits of the right shape, a short generation)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import modelkin
from modelkin.errors import ConfigError, ModelkinError
from tests.fuzz.harness import Violation, fuzz_settings, run_case, scratch_dir
from tests.fuzz.strategies import absurd_ints, json_values

SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1, "max_position_embeddings": 64}
ABSURD = {
    "hidden_size": [8, 24, 0, 2**40], "num_attention_heads": [0, 1, 3, 4, -1, 2**31],
    "num_key_value_heads": [0, 2, 3, -2], "head_dim": [1, 7, 16, 2**31], "num_hidden_layers": [0, 2, 2**40, -1],
    "vocab_size": [1, 100, 511, 513, 2**40], "intermediate_size": [1, 31, 2**40],
    "max_position_embeddings": [0, 1, 4, 2**62], "rope_theta": [0, -1.0, 1e308, "1e4", math.inf],
    "rms_norm_eps": [-1.0, 0, "x", 1e308], "tie_word_embeddings": ["yes", 1, None, False, True],
    "model_type": ["bert", "qwen2_moe", "", None, 7], "architectures": [["GPT2LMHeadModel"], "LlamaForCausalLM",
                                                                         [7], [], None],
    "eos_token_id": [-1, 2**40, "2", [2, 2**40], [], None], "bos_token_id": [-1, 2**40, "x"],
    "pad_token_id": [-5, 2**40], "hidden_act": ["gelu", 5, "swish"],
    "rope_scaling": [{"rope_type": "llama3"}, {"type": "linear", "factor": 0}, {"rope_type": "yarn", "factor": -1},
                     {"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "unknown"}, "linear", [1]],
    "rope_parameters": [{"rope_theta": "x"}, {"rope_theta": 1e4, "rope_type": "linear"}, 5],
    "attention_bias": ["no", 1, True], "sliding_window": [0, -1, 2**40], "use_sliding_window": [True, "x"],
}


@pytest.fixture(scope="module")
def bases():
    from modelkin.synth.tiny import make_tiny

    with scratch_dir("config") as path:
        yield {
            "qwen2": make_tiny("qwen2", path / "qwen2", overrides=SMALL),
            "llama": make_tiny("llama", path / "llama", overrides=SMALL, tokenizer=False),
        }


@st.composite
def config_edits(draw, config):
    cfg = dict(config)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["absurd", "absurd", "absurd", "delete", "json", "int"]))
        key = draw(st.sampled_from(sorted(ABSURD)))
        if kind == "absurd":
            cfg[key] = draw(st.sampled_from(ABSURD[key]))
        elif kind == "delete":
            cfg.pop(draw(st.sampled_from(sorted(cfg))), None)
        elif kind == "int":
            cfg[key] = draw(absurd_ints)
        else:
            cfg[key] = draw(json_values)
    return cfg


def _load_and_run(path):
    model = modelkin.load(path, device="cpu")
    vocab = model.config.vocab_size
    logits = model.logits([[1, 2, 3]])
    if tuple(logits.shape) != (1, 3, vocab) or logits.dtype != torch.float32:
        raise Violation(f"logits {logits.dtype}{list(logits.shape)} for vocab {vocab}")
    result = model.generate([1, 2], max_new_tokens=2)
    if not 1 <= len(result.tokens) <= 2 or not all(0 <= t < vocab for t in result.tokens):
        raise Violation(f"generated {result.tokens} for vocab {vocab}")
    return model


@fuzz_settings(130)
@given(data=st.data(), arch=st.sampled_from(["qwen2", "llama"]))
def test_config_json(bases, data, arch):
    path = bases[arch]
    original = (path / "config.json").read_text()
    config = data.draw(config_edits(json.loads(original)))
    try:
        (path / "config.json").write_text(json.dumps(config))
        run_case("config", lambda: _load_and_run(path))
    finally:
        (path / "config.json").write_text(original)


@fuzz_settings(30)
@given(text=st.one_of(json_values.map(json.dumps), st.text(max_size=30), st.just('{"a": 1')),
       which=st.sampled_from(["config.json", "generation_config.json"]))
def test_config_files_that_are_not_objects(bases, text, which):
    path = bases["qwen2"]
    original = (path / which).read_text()
    try:
        (path / which).write_text(text)
        run_case("config", lambda: _load_and_run(path))
    finally:
        (path / which).write_text(original)


def test_base_configs_load_and_run(bases):
    for path in bases.values():
        assert not isinstance(run_case("config", lambda p=path: _load_and_run(p)), ModelkinError)


def test_billion_layers_fail_fast_without_memory(bases):
    path = bases["llama"]
    original = (path / "config.json").read_text()
    try:
        (path / "config.json").write_text(json.dumps({**json.loads(original), "num_hidden_layers": 10**9}))
        out = run_case("config", lambda: _load_and_run(path))
    finally:
        (path / "config.json").write_text(original)
    assert isinstance(out, ConfigError), out


@pytest.mark.parametrize("pad", [10**30, 2**63, -1])
def test_special_ids_outside_the_vocabulary_do_not_break_running(bases, pad):
    """Found by the long fuzz run: pad_token_id=10**30 made logits() raise OverflowError."""
    path = bases["llama"]
    original = (path / "config.json").read_text()
    try:
        (path / "config.json").write_text(json.dumps({**json.loads(original), "pad_token_id": pad}))
        out = run_case("config", lambda: _load_and_run(path))
    finally:
        (path / "config.json").write_text(original)
    assert not isinstance(out, ModelkinError), out
    assert out.pad_token_id == 2  # the config's EOS


def test_odd_head_dim_is_a_config_error(bases):
    """Found by the long fuzz run: 3 heads of a 16-wide model (head_dim 5) crashed the YaRN table."""
    path = bases["qwen2"]
    original = (path / "config.json").read_text()
    config = {**json.loads(original), "num_attention_heads": 3, "rope_scaling": {"rope_type": "yarn", "factor": 2}}
    try:
        (path / "config.json").write_text(json.dumps(config))
        out = run_case("config", lambda: _load_and_run(path))
    finally:
        (path / "config.json").write_text(original)
    assert isinstance(out, ConfigError) and "head_dim=5 is odd" in str(out), out


@pytest.mark.parametrize("theta", [2**64, 10**400])
def test_huge_integer_rope_theta(bases, theta):
    """Found by a 42k-case fuzz run: rope_theta=2**64 as a JSON integer raised OverflowError in torch."""
    path = bases["qwen2"]
    original = (path / "config.json").read_text()
    try:
        (path / "config.json").write_text(json.dumps({**json.loads(original), "rope_theta": theta}))
        out = run_case("config", lambda: _load_and_run(path))
    finally:
        (path / "config.json").write_text(original)
    assert not isinstance(out, Exception) or isinstance(out, ConfigError), out
