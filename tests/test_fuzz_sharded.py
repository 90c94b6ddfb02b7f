"""Fuzzing sharded checkpoints: index files with missing shards, self references and cycles, names mapped
twice, paths leaving the directory, weight_map of the wrong type; safetensors and .bin shards."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from modelkin.errors import CheckpointError, ModelkinError
from tests.ckpt_factory import write_safetensors_checkpoint, write_torch_checkpoint
from tests.fuzz.exercise import exercise_checkpoint
from tests.fuzz.harness import fresh, fuzz_settings, run_case, scratch_dir
from tests.fuzz.strategies import json_values

TENSORS = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((2, 3), float(i)) for i in range(4)}
BAD_TARGETS = ["missing.safetensors", "../model-00001-of-00002.safetensors", "/etc/hostname", "", ".", "sub",
               "loop.safetensors", "model.safetensors.index.json", "pytorch_model.bin.index.json",
               "config.json", "model-00001-of-00002.safetensors/", "sub/model-00001-of-00002.safetensors"]


@pytest.fixture(scope="module")
def workdir():
    with scratch_dir("sharded") as path:
        yield path


@pytest.fixture(scope="module")
def prepared(workdir):
    """Two-shard checkpoints of each kind, written once; cases only rewrite the index file."""
    return {kind: (workdir / kind, *_shards(workdir / kind, kind)) for kind in ("safetensors", "torch")}


def _shards(case, kind):
    fresh(case)
    write = write_safetensors_checkpoint if kind == "safetensors" else write_torch_checkpoint
    write(case, TENSORS, {"model_type": "llama"}, shards=2)
    (case / "sub").mkdir()
    os.symlink("loop.safetensors", case / "loop.safetensors")  # a symlink cycle
    stem = "model.safetensors" if kind == "safetensors" else "pytorch_model.bin"
    index_path = case / f"{stem}.index.json"
    return index_path, json.loads(index_path.read_text())


@st.composite
def index_edits(draw, index):
    """The index text after 1-3 edits of its weight_map (or the whole object)."""
    files = sorted(set(index["weight_map"].values()))
    weight_map = dict(index["weight_map"])
    extra_text = ""
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["retarget", "retarget", "drop", "add", "twice", "map_type", "index_type",
                                     "metadata", "swap"]))
        name = draw(st.sampled_from(sorted(TENSORS)))
        if kind == "retarget":
            weight_map[name] = draw(st.sampled_from(BAD_TARGETS + files) | json_values)
        elif kind == "drop":
            weight_map.pop(name, None)
        elif kind == "add":
            weight_map[draw(st.text(max_size=8))] = draw(st.sampled_from(files))
        elif kind == "twice":  # the same name twice in the JSON text, pointing at different shards
            extra_text = f', {json.dumps(name)}: {json.dumps(draw(st.sampled_from(files)))}'
        elif kind == "swap":
            weight_map = {k: files[(files.index(v) + 1) % len(files)] if v in files else v
                          for k, v in weight_map.items()}
        elif kind == "map_type":
            return json.dumps({"weight_map": draw(json_values)})
        elif kind == "index_type":
            return json.dumps(draw(json_values))
        else:
            index = {**index, "metadata": draw(json_values)}
    text = json.dumps({**index, "weight_map": weight_map})
    if extra_text and weight_map:
        text = text[:text.rindex("}", 0, len(text) - 1)] + extra_text + "}}"
    return text


@fuzz_settings(160)
@given(data=st.data(), kind=st.sampled_from(["safetensors", "torch"]))
def test_lying_indexes(prepared, data, kind):
    case, index_path, index = prepared[kind]
    index_path.write_text(data.draw(index_edits(index)))
    out = run_case("sharded", lambda: exercise_checkpoint(case))
    if not isinstance(out, ModelkinError):  # every tensor read comes from a shard the index names
        for name, tensor in out["read"].items():
            assert torch.equal(tensor, TENSORS[name])


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_valid_shards_read_back_exactly(workdir, kind):
    case = workdir / "case"
    _shards(case, kind)
    out = run_case("sharded", lambda: exercise_checkpoint(case, expect=TENSORS, scan=True))
    assert not isinstance(out, ModelkinError), out


def test_index_naming_itself_as_a_shard(workdir):
    case = workdir / "case"
    index_path, index = _shards(case, "safetensors")
    index["weight_map"] = {name: index_path.name for name in TENSORS}
    index_path.write_text(json.dumps(index))
    out = run_case("sharded", lambda: exercise_checkpoint(case))
    assert isinstance(out, CheckpointError), out


def test_shard_path_leaving_the_directory(workdir):
    case = workdir / "case"
    index_path, index = _shards(case, "safetensors")
    index["weight_map"][next(iter(TENSORS))] = "../model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    out = run_case("sharded", lambda: exercise_checkpoint(case))
    assert isinstance(out, CheckpointError) and "bad file name" in str(out), out
