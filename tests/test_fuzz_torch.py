"""Fuzzing the PyTorch .bin reader (weights-only unpickler): damaged zip and legacy files, random pickle
opcodes, and objects that are not plain state dicts."""

from __future__ import annotations

import io
import pickletools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from modelkin.errors import ModelkinError
from tests.fuzz.exercise import exercise_checkpoint
from tests.fuzz.harness import Violation, fuzz_settings, run_case, scratch_dir
from tests.fuzz.strategies import byte_mutations, tensor_names, tensors

# random pickles make torch warn about their protocol number; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

# opcodes (with plausible arguments) that random pickles are assembled from
OPCODES = [op for op in pickletools.opcodes if op.proto <= 5]


@pytest.fixture(scope="module")
def workdir():
    with scratch_dir("torch") as path:
        yield path


def _saved(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


@fuzz_settings(60)
@given(data=tensors(max_tensors=3), legacy=st.booleans())
def test_valid_state_dicts_read_back_exactly(workdir, data, legacy):
    if legacy:  # torch itself cannot load fp8 from its legacy format, even without weights_only
        data = {k: v for k, v in data.items() if v.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)}
    (workdir / "pytorch_model.bin").write_bytes(_saved(data, legacy))
    out = run_case("torch", lambda: exercise_checkpoint(workdir / "pytorch_model.bin", expect=data))
    if isinstance(out, ModelkinError):
        raise Violation(f"a valid state dict was refused: {out}")


leaves = st.one_of(st.integers(), st.text(max_size=4), st.none(), st.floats(), st.just(torch.ones(2)),
                   st.just(torch.nn.Parameter(torch.zeros(1))), st.just(torch.float16), st.just(torch.Size([2])))
objects = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.one_of(tensor_names, st.integers()), inner, max_size=3)
                       | st.tuples(inner, inner), max_leaves=6)


@fuzz_settings(60)
@given(obj=objects, legacy=st.booleans())
def test_objects_that_are_not_state_dicts(workdir, obj, legacy):
    (workdir / "pytorch_model.bin").write_bytes(_saved(obj, legacy))
    out = run_case("torch", lambda: exercise_checkpoint(workdir / "pytorch_model.bin"))
    plain = isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    assert isinstance(out, ModelkinError) != plain, (obj, out)


@st.composite
def damaged(draw):
    data = draw(tensors(max_tensors=3))
    return draw(byte_mutations(_saved(data, draw(st.booleans()))))


@fuzz_settings(120)
@given(raw=damaged())
def test_damaged_files(workdir, raw):
    (workdir / "pytorch_model.bin").write_bytes(raw)
    run_case("torch", lambda: exercise_checkpoint(workdir / "pytorch_model.bin"))


@st.composite
def random_pickles(draw):
    """Protocol-2 header, random opcodes with random argument bytes, STOP."""
    body = b"\x80\x02"
    for _ in range(draw(st.integers(1, 12))):
        op = draw(st.sampled_from(OPCODES))
        body += op.code.encode("latin-1") + draw(st.binary(max_size=10))
    return body + b"."


@fuzz_settings(100)
@given(raw=random_pickles())
def test_random_pickle_opcodes(workdir, raw):
    (workdir / "model.pt").write_bytes(raw)
    run_case("torch", lambda: exercise_checkpoint(workdir / "model.pt"))


def test_zip_declaring_an_unsupported_version(workdir):
    """Found by a 44k-case fuzz run: zipfile raises NotImplementedError for 'zip file version 6.4'."""
    raw = bytearray(_saved({"w": torch.zeros(2)}))
    central = raw.index(b"PK\x01\x02")
    raw[central + 6] = 64  # 'version needed to extract' of the first central-directory entry: 6.4
    (workdir / "pytorch_model.bin").write_bytes(bytes(raw))
    out = run_case("torch", lambda: exercise_checkpoint(workdir / "pytorch_model.bin"))
    assert not isinstance(out, ModelkinError) and out["keys"] == ["w"]  # torch's own zip reader copes
