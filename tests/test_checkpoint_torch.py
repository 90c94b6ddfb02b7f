"""PyTorch .bin state dicts: weights-only loading, shards, and pickles that must never run."""

from __future__ import annotations

import builtins
import pickle

import pytest
import torch

from modelkin.checkpoint import open_checkpoint
from modelkin.errors import CheckpointError
from tests.ckpt_factory import tiny_llama_state, write_torch_checkpoint


class _Payload:
    """Unpickling this object opens (creates) the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.fixture(scope="module")
def llama():
    state, config = tiny_llama_state(layers=2, seed=3)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)
    return state, config


def test_plain_state_dict_dir(tmp_path, llama):
    state, config = llama
    write_torch_checkpoint(tmp_path, state, config)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == "torch"
        assert ckpt.keys() == list(state)  # file (insertion) order
        assert ckpt.config() == config
        assert ckpt.info("model.norm.weight").dtype == "BF16"
        assert ckpt.bytes_read == 0
        for name, tensor in state.items():
            got = ckpt.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        assert ckpt.bytes_read == sum(t.numel() * t.element_size() for t in state.values())
        got = ckpt.get_tensor("model.norm.weight")
        got.zero_()  # callers may modify what they get; the source is unaffected
        assert torch.equal(ckpt.get_tensor("model.norm.weight"), state["model.norm.weight"])


def test_sharded_bin_with_index_equals_single(tmp_path, llama):
    state, config = llama
    write_torch_checkpoint(tmp_path / "one", state, config)
    write_torch_checkpoint(tmp_path / "many", state, config, shards=2)
    assert (tmp_path / "many" / "pytorch_model.bin.index.json").is_file()
    with open_checkpoint(tmp_path / "one") as one, open_checkpoint(tmp_path / "many") as many:
        assert many.keys() == one.keys()
        assert len(many.files()) == 2
        for name in one:
            assert torch.equal(many.get_tensor(name), one.get_tensor(name))


def test_legacy_non_zip_format_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.arange(6.0)}, path, _use_new_zipfile_serialization=False)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "torch" and torch.equal(ckpt.get_tensor("w"), torch.arange(6.0))


def test_the_payload_is_real(tmp_path):
    """Guards the next test: unpickling the payload with plain pickle does create the marker."""
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(str(marker)))).close()
    assert marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    obj = {"model.embed_tokens.weight": torch.zeros(2), "x": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path)
    message = str(err.value)
    assert "pytorch_model.bin is not a plain state dict: the weights-only loader refused it" in message
    assert "\n" not in message
    assert not marker.exists()


def test_non_tensor_entry_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(2), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="ckpt.pt is not a plain state dict: entry 'epoch' is a int"):
        open_checkpoint(path)


def test_non_dict_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="ckpt.pt is not a plain state dict: it holds a list"):
        open_checkpoint(path)


def test_truncated_zip_is_reported(tmp_path, llama):
    write_torch_checkpoint(tmp_path, llama[0], llama[1])
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not a readable PyTorch checkpoint"):
        open_checkpoint(tmp_path)
