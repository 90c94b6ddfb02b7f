"""Fuzzing the safetensors reader: valid files read back bit for bit; lying headers give one-line errors.

Quick mode in CI; MODELKIN_FUZZ_EXAMPLES=N runs N examples per test for a long local run.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelkin.errors import ModelkinError
from tests.fuzz.exercise import exercise_checkpoint
from tests.fuzz.harness import Violation, fresh, fuzz_settings, run_case, scratch_dir
from tests.fuzz.strategies import EDGE_INTS, byte_mutations, json_values, lying_safetensors, tensors


@pytest.fixture(scope="module")
def case_dir():
    with scratch_dir("safetensors") as path:
        yield path / "case"


@fuzz_settings(120)
@given(data=tensors(), as_dir=st.booleans(), scan=st.booleans())
def test_valid_files_read_back_exactly(case_dir, data, as_dir, scan):
    from safetensors.torch import save_file

    d = fresh(case_dir)
    save_file({k: v.contiguous() for k, v in data.items()}, str(d / "model.safetensors"))
    out = run_case("safetensors", lambda: exercise_checkpoint(d if as_dir else d / "model.safetensors",
                                                              expect=data, scan=scan))
    if isinstance(out, ModelkinError):
        raise Violation(f"a valid file was refused: {out}")
    assert sorted(out["read"]) == sorted(data)[:16] or len(data) > 16


@fuzz_settings(260)
@given(raw=lying_safetensors(), config=st.one_of(st.none(), json_values), scan=st.booleans())
def test_lying_headers(case_dir, raw, config, scan):
    d = fresh(case_dir)
    (d / "model.safetensors").write_bytes(raw)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    run_case("safetensors", lambda: exercise_checkpoint(d, scan=scan))


@st.composite
def mutated_files(draw):
    from safetensors.torch import save

    data = draw(tensors(max_tensors=3))
    raw = save({k: v.contiguous() for k, v in data.items()})
    return draw(byte_mutations(raw, focus=256))


@fuzz_settings(120)
@given(raw=mutated_files(), scan=st.booleans())
def test_mutated_bytes(case_dir, raw, scan):
    d = fresh(case_dir)
    (d / "weights.safetensors").write_bytes(raw)
    run_case("safetensors", lambda: exercise_checkpoint(d / "weights.safetensors", scan=scan))


@pytest.mark.parametrize("prefix", [2**63, 2**64 - 1, 2**40, 100 * 2**20 + 1])
def test_huge_header_length_allocates_nothing(case_dir, prefix):
    d = fresh(case_dir)
    (d / "model.safetensors").write_bytes(prefix.to_bytes(8, "little") + b'{"a":1}')
    out = run_case("safetensors", lambda: exercise_checkpoint(d))
    assert isinstance(out, ModelkinError)
    assert f"header length {prefix} exceeds the file size" in str(out)


def test_terabyte_tensor_claim_is_refused_without_allocating(case_dir):
    # 2**40 float32 elements claimed, 16 bytes present
    header = {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}
    body = json.dumps(header).encode()
    d = fresh(case_dir)
    (d / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + bytes(16))
    out = run_case("safetensors", lambda: exercise_checkpoint(d))
    assert isinstance(out, ModelkinError) and "truncated" in str(out)
    assert EDGE_INTS  # the strategies module exports the edge values used above


@pytest.mark.parametrize("dtype", ["F8_E8M0", "F4", "Q4_0"])
def test_dtype_outside_the_table_never_changes_under_info(case_dir, dtype):
    """Found by fuzzing: an F8_E8M0 tensor came back as float8_e8m0fnu while info() said float32."""
    header = {"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2]}}
    body = json.dumps(header).encode()
    d = fresh(case_dir)
    (d / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + bytes(2))
    out = run_case("safetensors", lambda: exercise_checkpoint(d))
    assert not isinstance(out, ModelkinError) or "does not read" in str(out) or "cannot read" in str(out)


def test_negative_dims_are_refused_whatever_the_dtype(case_dir):
    """Found by the long fuzz run: a dtype without a size check let shape [-1.0] through info()."""
    header = {"0": {"dtype": "Q4_0", "shape": [-1.0], "data_offsets": [0, 2]}}
    body = json.dumps(header).encode()
    d = fresh(case_dir)
    (d / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + bytes(2))
    out = run_case("safetensors", lambda: exercise_checkpoint(d))
    assert isinstance(out, ModelkinError) and "negative dims [-1]" in str(out), out
