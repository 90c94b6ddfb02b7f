"""Fuzzing the GGUF reader and the GGUF vocabulary: valid files round-trip, mutated ones fail cleanly.

Mutations hit the file's structure: magic, version, tensor/kv counts, string and array lengths, value
types, tensor dims and quant types, truncation, random bytes in the header.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from modelkin.errors import ModelkinError
from tests.ckpt_factory import write_gguf_file
from tests.fuzz.exercise import exercise_checkpoint, exercise_tokenizer
from tests.fuzz.gguf_cases import build_bases, metadata_values, mutated_gguf, valid_gguf
from tests.fuzz.harness import Violation, fuzz_settings, run_case, scratch_dir
from tests.fuzz.strategies import overwrite_int

HF_NORM = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@pytest.fixture(scope="module")
def workdir():
    with scratch_dir("gguf") as path:
        yield path


@pytest.fixture(scope="module")
def bases(workdir):
    return build_bases(workdir)


def _expected(tensors):
    out = {}
    for name, array in tensors.items():
        _, layer, kind, _ = name.split(".")
        out[f"model.layers.{layer}.{HF_NORM[kind]}.weight"] = torch.from_numpy(array.copy())
    return out


@fuzz_settings(60)
@given(case=valid_gguf())
def test_valid_files_round_trip(workdir, case):
    tensors, meta = case
    path = write_gguf_file(workdir / "valid.gguf", "llama", tensors, meta)
    out = run_case("gguf", lambda: exercise_checkpoint(path, expect=_expected(tensors)))
    if isinstance(out, ModelkinError):
        raise Violation(f"a valid GGUF was refused: {out}")
    for key, value in meta.items():
        got = out["metadata"][key]
        want = [int(v) for v in value] if isinstance(value, list) and value and isinstance(value[0], bool) else value
        assert got == want, (key, got, want)


def _both(path):
    out = exercise_checkpoint(path, scan=True)
    exercise_tokenizer(path)
    return out


@fuzz_settings(320)
@given(data=st.data())
def test_mutated_files(workdir, bases, data):
    raw = data.draw(mutated_gguf(bases))
    path = workdir / "case.gguf"
    path.write_bytes(raw)
    run_case("gguf", lambda: _both(path))


def _load_and_run(path):
    import modelkin

    model = modelkin.load(path, device="cpu")
    vocab = model.config.vocab_size
    logits = model.logits([[1, 2, 3]])
    if tuple(logits.shape) != (1, 3, vocab):
        raise Violation(f"logits of shape {list(logits.shape)} for vocab {vocab}")
    tokens = model.generate([1, 2], max_new_tokens=2).tokens
    if not all(0 <= t < vocab for t in tokens):
        raise Violation(f"generated {tokens} for vocab {vocab}")
    return model


@fuzz_settings(100)
@given(data=st.data())
def test_metadata_values_through_load(workdir, bases, data):
    """GGUF metadata becomes the model config: absurd head counts, sizes, rope bases, epsilons, ids."""
    path = workdir / "meta.gguf"
    path.write_bytes(data.draw(metadata_values(bases)))
    run_case("gguf", lambda: _load_and_run(path))


def test_bases_are_valid_and_readable(workdir, bases):
    for i, base in enumerate(bases):
        path = workdir / f"check{i}.gguf"
        path.write_bytes(base.data)
        out = run_case("gguf", lambda p=path: exercise_checkpoint(p, scan=True))
        assert not isinstance(out, ModelkinError), out
        assert "model.layers.0.self_attn.q_proj.weight" in out["keys"]
        tok = run_case("gguf", lambda p=path: exercise_tokenizer(p))
        assert not isinstance(tok, ModelkinError) and tok["tokenizer"] is not None, tok


@pytest.mark.parametrize("item_type", [0, 5, 8, 9])  # uint8, int32, string, array
@pytest.mark.parametrize("count", [2**62, 10**6])
def test_array_claiming_more_items_than_the_file_holds(workdir, item_type, count):
    """Found by fuzzing: gguf's reader looped forever (and grew its lists) on a uint8 array whose
    length field lied, because reads past the end of the file return empty items. Now: a clean error."""
    path = write_gguf_file(workdir / "array.gguf", "llama", {"output_norm.weight": np.ones(4, np.float32)},
                           {"fuzz.array": [1, 2, 3]})
    raw = path.read_bytes()
    at = raw.index(b"fuzz.array") + len(b"fuzz.array") + 4  # key, value type -> item type, length
    raw = overwrite_int(overwrite_int(raw, at, 4, item_type), at + 4, 8, count)
    path.write_bytes(raw)
    start = time.perf_counter()
    out = run_case("gguf", lambda: exercise_checkpoint(path))
    assert time.perf_counter() - start < 1.0
    assert isinstance(out, ModelkinError) and f"claims {count} items" in str(out), out
