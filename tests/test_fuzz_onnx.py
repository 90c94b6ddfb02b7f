"""Fuzzing the ONNX reader: truncated protobuf, lying dims and types, external data pointing outside
the model directory or past the end of its file."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from modelkin.errors import CheckpointError, ModelkinError
from tests.fuzz.exercise import exercise_checkpoint
from tests.fuzz.harness import fresh, fuzz_settings, run_case, scratch_dir
from tests.fuzz.onnx_cases import EXTERNAL, base_model, mutated_model


@pytest.fixture(scope="module")
def workdir():
    with scratch_dir("onnx") as path:
        (path / "outside.bin").write_bytes(b"SECRET" * 100)  # what an escaping location would reach
        yield path


@pytest.fixture(scope="module")
def base():
    return base_model()


def _write(case, raw, external):
    fresh(case)
    (case / "sub").mkdir()
    (case / "model.onnx").write_bytes(raw)
    (case / EXTERNAL).write_bytes(external)


def test_base_model_reads_back_exactly(workdir, base):
    model, external, expected = base
    case = workdir / "case"
    _write(case, model.SerializeToString(), external)
    out = run_case("onnx", lambda: exercise_checkpoint(
        case, expect={k: torch.from_numpy(v) for k, v in expected.items()}, scan=True))
    assert not isinstance(out, ModelkinError), out
    assert sorted(out["read"]) == sorted(expected)


@fuzz_settings(200)
@given(data=st.data(), as_dir=st.booleans(), scan=st.booleans())
def test_mutated_models(workdir, base, data, as_dir, scan):
    model, external, _ = base
    raw, ext = data.draw(mutated_model(model, external))
    case = workdir / "case"
    _write(case, raw, ext)
    out = run_case("onnx", lambda: exercise_checkpoint(case if as_dir else case / "model.onnx", scan=scan))
    if not isinstance(out, ModelkinError):
        for tensor in out["read"].values():  # nothing from outside the directory ever comes back
            assert b"SECRET" not in tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "sub/../../outside.bin"])
def test_external_data_outside_the_directory_is_refused(workdir, base, location):
    model, external, _ = base
    m = type(model)()
    m.CopyFrom(model)
    for item in m.graph.initializer[-1].external_data:
        if item.key == "location":
            item.value = location
    case = workdir / "case"
    _write(case, m.SerializeToString(), external)
    out = run_case("onnx", lambda: exercise_checkpoint(case))
    assert isinstance(out, CheckpointError) and "outside the model directory" in str(out), out


@pytest.mark.parametrize("offset,length", [("0", str(2**40)), (str(2**62), "4"), ("-8", "32")])
def test_external_data_past_the_end_is_refused(workdir, base, offset, length):
    model, external, _ = base
    m = type(model)()
    m.CopyFrom(model)
    for item in m.graph.initializer[-1].external_data:
        item.value = {"offset": offset, "length": length}.get(item.key, item.value)
    case = workdir / "case"
    _write(case, m.SerializeToString(), external)
    out = run_case("onnx", lambda: exercise_checkpoint(case))
    assert isinstance(out, CheckpointError), out
