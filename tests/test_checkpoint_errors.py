"""Format detection, and bad inputs: each gives one readable ModelkinError line, never another exception."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from modelkin.checkpoint import open_checkpoint
from modelkin.errors import CheckpointError, ModelkinError
from tests.ckpt_factory import (
    tiny_llama_state,
    write_gguf_file,
    write_safetensors_checkpoint,
    write_torch_checkpoint,
)


@pytest.fixture(scope="module")
def state():
    return tiny_llama_state(layers=1, hidden=32, inter=32)


def _one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message and message
    return message


def test_path_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path / "nowhere")
    assert (
        _one_line(err.value)
        == f"checkpoint path does not exist: {tmp_path / 'nowhere'} (fix: check the path)"
    )


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some text, no weights here")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert _one_line(err.value).startswith(f"{path} is not a checkpoint modelkin can read")


def test_empty_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no model weights"):
        open_checkpoint(tmp_path)


def test_ambiguous_directory(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        write_gguf_file(tmp_path / name, "llama", {"output_norm.weight": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match="holds 2 files matching \\*.gguf: a.gguf, b.gguf"):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path / "a.gguf") as ckpt:
        assert ckpt.keys() == ["model.norm.weight"]


def test_detection_by_content_not_name(tmp_path, state):
    sd, config = state
    write_safetensors_checkpoint(tmp_path / "st", sd, config)
    write_torch_checkpoint(tmp_path / "pt", sd, config)
    # misleading names: a safetensors file called .bin, a torch zip called .weights
    (tmp_path / "st" / "model.safetensors").rename(tmp_path / "weights.bin")
    (tmp_path / "pt" / "pytorch_model.bin").rename(tmp_path / "model.weights")
    with open_checkpoint(tmp_path / "weights.bin") as ckpt:
        assert ckpt.format == "safetensors"
    with open_checkpoint(tmp_path / "model.weights") as ckpt:
        assert ckpt.format == "torch"


def test_directory_layouts(tmp_path, state):
    sd, config = state
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    write_gguf_file(gguf_dir / "m.gguf", "llama", {"output_norm.weight": np.ones(4, np.float32)})
    with open_checkpoint(gguf_dir) as ckpt:
        assert ckpt.format == "gguf"
    loose = tmp_path / "loose"  # several safetensors files without an index
    write_safetensors_checkpoint(loose, dict(list(sd.items())[:3]), config)
    write_safetensors_checkpoint(tmp_path / "tmp2", dict(list(sd.items())[3:]), None)
    (tmp_path / "tmp2" / "model.safetensors").rename(loose / "extra.safetensors")
    (loose / "model.safetensors").rename(loose / "main.safetensors")
    with open_checkpoint(loose) as ckpt:
        assert sorted(ckpt.keys()) == sorted(sd) and len(ckpt.files()) == 2
    dup = tmp_path / "dup"
    write_safetensors_checkpoint(dup, sd, config)
    (dup / "model.safetensors").rename(dup / "a.safetensors")
    write_safetensors_checkpoint(tmp_path / "tmp3", sd, None)
    (tmp_path / "tmp3" / "model.safetensors").rename(dup / "b.safetensors")
    with pytest.raises(CheckpointError, match="is stored twice: in a.safetensors and b.safetensors"):
        open_checkpoint(dup)


def test_bad_index_json(tmp_path, state):
    sd, config = state
    write_safetensors_checkpoint(tmp_path, sd, config, shards=2)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weights": {}}))
    with pytest.raises(CheckpointError, match="has no 'weight_map' object"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../../etc/passwd"}})
    )
    with pytest.raises(CheckpointError, match="bad file name '../../etc/passwd'"):
        open_checkpoint(tmp_path)


def _valid_files(tmp_path, sd, config):
    write_safetensors_checkpoint(tmp_path / "st", sd, config)
    write_torch_checkpoint(tmp_path / "pt", sd, config)
    arrays = {n: t.numpy() for n, t in sd.items()}
    write_gguf_file(
        tmp_path / "m.gguf",
        "llama",
        {
            "token_embd.weight": arrays["model.embed_tokens.weight"],
            "blk.0.attn_q.weight": arrays["model.layers.0.self_attn.q_proj.weight"],
        },
        {"llama.attention.head_count": 4, "llama.attention.head_count_kv": 2},
        {"blk.0.attn_q.weight": "Q8_0"},
    )
    graph = helper.make_graph(
        [], "g", [], [], initializer=[numpy_helper.from_array(a, n) for n, a in arrays.items()]
    )
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    return [
        tmp_path / "st" / "model.safetensors",
        tmp_path / "pt" / "pytorch_model.bin",
        tmp_path / "m.gguf",
        tmp_path / "m.onnx",
    ]


def test_truncated_files_only_raise_modelkin_errors(tmp_path, state):
    """Every prefix cut of every format either opens and reads or raises a one-line ModelkinError."""
    sd, config = state
    rng = np.random.default_rng(0)
    for path in _valid_files(tmp_path, sd, config):
        full = path.read_bytes()
        cuts = sorted({0, 1, 7, 8, 9, 30, len(full) // 2, len(full) - 1, *rng.integers(1, len(full), 6)})
        for cut in cuts:
            damaged = path.with_name("cut" + path.suffix)
            damaged.write_bytes(full[:cut])
            try:
                with open_checkpoint(damaged) as ckpt:
                    for name in ckpt:
                        ckpt.get_tensor(name)
            except ModelkinError as err:
                assert damaged.name in _one_line(err), (path.name, cut, str(err))
            damaged.unlink()


def test_flipped_bytes_only_raise_modelkin_errors(tmp_path, state):
    sd, config = state
    rng = np.random.default_rng(1)
    for path in _valid_files(tmp_path, sd, config):
        full = np.frombuffer(path.read_bytes(), np.uint8)
        for _ in range(8):
            damaged = full.copy()
            spots = rng.integers(0, min(len(full), 600), 4)  # the header region
            damaged[spots] = rng.integers(0, 256, 4)
            bad = path.with_name("flip" + path.suffix)
            bad.write_bytes(damaged.tobytes())
            try:
                with open_checkpoint(bad) as ckpt:
                    for name in ckpt:
                        t = ckpt.get_tensor(name)
                        assert isinstance(t, torch.Tensor)
            except ModelkinError as err:
                _one_line(err)
