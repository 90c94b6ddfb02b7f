"""Safetensors checkpoints: lazy reads, header-only info, sharded == single file, bf16 kept."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from modelkin.checkpoint import TensorInfo, TensorSource, load_hf_config, open_checkpoint
from modelkin.errors import CheckpointError, ConfigError
from tests.ckpt_factory import tiny_llama_state, write_safetensors_checkpoint


@pytest.fixture(scope="module")
def llama():
    return tiny_llama_state(layers=3, seed=1)


@pytest.fixture
def single_dir(tmp_path, llama):
    state, config = llama
    return write_safetensors_checkpoint(tmp_path / "single", state, config)


def test_single_file_dir_reads_every_tensor_exactly(single_dir, llama):
    state, config = llama
    with open_checkpoint(single_dir) as ckpt:
        assert isinstance(ckpt, TensorSource) and ckpt.format == "safetensors"
        assert sorted(ckpt.keys()) == sorted(state)
        assert ckpt.config() == config
        assert ckpt.metadata() == {"format": "pt"}
        assert ckpt.files() == [single_dir / "model.safetensors"]
        for name, tensor in state.items():
            assert name in ckpt
            assert ckpt.info(name) == TensorInfo(name, tuple(tensor.shape), "F32", tensor.numel() * 4)
            assert torch.equal(ckpt.get_tensor(name), tensor)
        assert ckpt.bytes_read == sum(t.numel() * 4 for t in state.values())
        assert "model.layers.9.self_attn.q_proj.weight" not in ckpt


def test_keys_follow_the_data_order_of_the_file(single_dir):
    with open_checkpoint(single_dir) as ckpt:
        header_len = int.from_bytes((single_dir / "model.safetensors").read_bytes()[:8], "little")
        header = json.loads((single_dir / "model.safetensors").read_bytes()[8 : 8 + header_len])
        offsets = [header[name]["data_offsets"][0] for name in ckpt]
        assert offsets == sorted(offsets)


def test_info_and_keys_read_no_tensor_data(single_dir, monkeypatch):
    import modelkin.checkpoint.safetensors_reader as reader

    def refuse(*args, **kwargs):
        raise AssertionError("safe_open called: tensor data would be read")

    monkeypatch.setattr(reader, "safe_open", refuse)
    with open_checkpoint(single_dir) as ckpt:
        infos = [ckpt.info(n) for n in ckpt]
        assert len(infos) == 3 * 9 + 3
        assert ckpt.bytes_read == 0


def test_sharded_checkpoint_equals_single_file_bit_for_bit(tmp_path, llama, single_dir):
    state, config = llama
    sharded = write_safetensors_checkpoint(tmp_path / "sharded", state, config, shards=3)
    shard_files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert shard_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with open_checkpoint(sharded) as many, open_checkpoint(single_dir) as one:
        assert sorted(many.keys()) == sorted(one.keys())
        assert len(many.files()) == 3
        assert many.metadata()["total_size"] == sum(t.numel() * 4 for t in state.values())
        for name in one:
            a, b = many.get_tensor(name), one.get_tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.view(torch.int32).equal(b.view(torch.int32))  # bit-identical
            assert many.info(name) == one.info(name)
        assert many.bytes_read == one.bytes_read


def test_bf16_and_int_tensors_keep_their_dtype(tmp_path):
    tensors = {
        "a.weight": torch.randn(4, 8).to(torch.bfloat16),
        "b.weight": torch.randn(3).to(torch.float16),
        "ids": torch.arange(5, dtype=torch.int64),
    }
    write_safetensors_checkpoint(tmp_path, tensors, {"model_type": "llama"})
    with open_checkpoint(tmp_path / "model.safetensors") as ckpt:  # the file itself, config beside it
        assert ckpt.info("a.weight").dtype == "BF16"
        assert ckpt.info("a.weight").torch_dtype == torch.bfloat16
        assert ckpt.info("ids").dtype == "I64" and ckpt.info("ids").numel == 5
        for name, tensor in tensors.items():
            got = ckpt.get_tensor(name, device="cpu")
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        assert ckpt.config() == {"model_type": "llama"}


def test_generation_config_is_merged(single_dir, llama):
    (single_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    assert load_hf_config(single_dir) == {**llama[1], "_generation_config": {"temperature": 0.6}}


def test_missing_config_json_opens_but_config_raises(tmp_path, llama):
    state, _ = llama
    write_safetensors_checkpoint(tmp_path, state, None)
    with open_checkpoint(tmp_path) as ckpt:
        assert len(ckpt.keys()) == len(state)  # tensors can still be inspected
        with pytest.raises(CheckpointError, match="no config.json in") as err:
            ckpt.config()
    assert str(tmp_path) in str(err.value) and "fix:" in str(err.value)


def test_invalid_config_json_names_file_and_line(single_dir):
    (single_dir / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    with (
        open_checkpoint(single_dir) as ckpt,
        pytest.raises(ConfigError, match=r"config.json .* is not valid JSON \(line 2"),
    ):
        ckpt.config()


def test_index_naming_a_missing_shard(tmp_path, llama):
    state, config = llama
    write_safetensors_checkpoint(tmp_path, state, config, shards=3)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match="shard model-00002-of-00003.safetensors named in model.safetensors.index.json is missing",
    ):
        open_checkpoint(tmp_path)


def test_index_and_shard_disagree(tmp_path, llama):
    state, config = llama
    write_safetensors_checkpoint(tmp_path, state, config, shards=2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="are not in their shard, e.g. 'model.extra.weight'"):
        open_checkpoint(tmp_path)


def test_truncated_file_is_reported_with_the_tensor(tmp_path, llama):
    state, config = llama
    write_safetensors_checkpoint(tmp_path, state, config)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated: tensor '.*' ends"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"\x01\x00", "only 2 bytes long"),
        (b"\xff" * 8 + b"{}", "header length .* exceeds the file size"),
        ((5).to_bytes(8, "little") + b"{nope", "header is not JSON"),
        ((2).to_bytes(8, "little") + b"[]", "header is not a JSON object"),
    ],
)
def test_damaged_headers(tmp_path, payload, message):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(payload)
    with pytest.raises(
        CheckpointError, match=f"broken.safetensors is not a valid safetensors file: {message}"
    ):
        open_checkpoint(path)


def test_header_size_mismatch(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].replace(b'"shape":[4]', b'"shape":[5]')
    path.write_bytes(raw[:8] + header + raw[8 + n :])
    with pytest.raises(CheckpointError, match=r"tensor 'w' \(F32\[5\]\) needs 20 bytes, has 16"):
        open_checkpoint(path)


def test_unknown_tensor_name_and_closed_source(single_dir):
    ckpt = open_checkpoint(single_dir)
    with pytest.raises(CheckpointError, match="no tensor named 'model.nope.weight'"):
        ckpt.info("model.nope.weight")
    with pytest.raises(CheckpointError, match="no tensor named 'model.nope.weight'"):
        ckpt.get_tensor("model.nope.weight")
    ckpt.close()
    with pytest.raises(CheckpointError, match="was closed"):
        ckpt.get_tensor("model.norm.weight")
