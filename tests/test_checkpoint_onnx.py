"""ONNX models: initialisers (inline, typed, external data) as tensors, named as in the graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from modelkin.checkpoint import open_checkpoint
from modelkin.errors import CheckpointError

Q = "model.layers.0.self_attn.q_proj.weight"


def _model(initializers: list[TensorProto]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", Q], ["y"])], "g", [x], [y], initializer=initializers
    )
    model = helper.make_model(
        graph, producer_name="modelkin-test", opset_imports=[helper.make_opsetid("", 17)]
    )
    helper.set_model_props(model, {"source": "unit test"})
    return model


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return {
        Q: rng.standard_normal((4, 4)).astype(np.float32),
        "onnx::MatMul_12": rng.standard_normal((3, 5)).astype(np.float32),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "half": rng.standard_normal(8).astype(np.float16),
    }


def _inits(arrays):
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    # one initialiser in typed fields (float_data) instead of raw_data
    inits.append(helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.5, -2.0, 3.25]))
    bf16 = torch.tensor([1.0, -0.5, 3.0], dtype=torch.bfloat16)
    inits.append(
        helper.make_tensor(
            "bf16", TensorProto.BFLOAT16, [3], bf16.view(torch.int16).numpy().tobytes(), raw=True
        )
    )
    return inits


def test_inline_initialisers(tmp_path, arrays):
    path = tmp_path / "model.onnx"
    onnx.save(_model(_inits(arrays)), path)
    with open_checkpoint(tmp_path) as ckpt:  # a directory holding model.onnx
        assert ckpt.format == "onnx" and ckpt.files() == [path]
        assert ckpt.keys() == [*arrays, "typed", "bf16"]
        assert ckpt.config() == {}
        meta = ckpt.metadata()
        assert meta["producer_name"] == "modelkin-test" and meta["opset"] == {"ai.onnx": 17}
        assert meta["metadata_props"] == {"source": "unit test"}
        for name, array in arrays.items():
            got = ckpt.get_tensor(name)
            assert ckpt.info(name).shape == array.shape and ckpt.info(name).nbytes == array.nbytes
            assert torch.equal(got, torch.from_numpy(array)), name
        assert ckpt.info("ids").dtype == "I64" and ckpt.info("half").dtype == "F16"
        assert torch.equal(ckpt.get_tensor("typed"), torch.tensor([1.5, -2.0, 3.25]))
        bf16 = ckpt.get_tensor("bf16")
        assert bf16.dtype == torch.bfloat16 and bf16.tolist() == [1.0, -0.5, 3.0]


def test_external_data_is_read_lazily(tmp_path, arrays):
    model = _model(_inits(arrays))
    path = tmp_path / "exported.onnx"
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="exported.onnx.data",
        size_threshold=0,
    )
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with open_checkpoint(path) as ckpt:
        assert ckpt.files() == [path, tmp_path / "exported.onnx.data"]
        assert ckpt.config() == {"model_type": "llama"}
        assert ckpt.bytes_read == 0
        got = ckpt.get_tensor(Q)
        assert ckpt.bytes_read == arrays[Q].nbytes
        assert torch.equal(got, torch.from_numpy(arrays[Q]))
        for name, array in arrays.items():
            assert torch.equal(ckpt.get_tensor(name), torch.from_numpy(array)), name
        assert ckpt.get_tensor("bf16").tolist() == [1.0, -0.5, 3.0]


def test_missing_and_truncated_external_data(tmp_path, arrays):
    path = tmp_path / "m.onnx"
    onnx.save_model(
        _model(_inits(arrays)), path, save_as_external_data=True, location="m.data", size_threshold=0
    )
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="external data file .*m.data is truncated: initialiser"):
        open_checkpoint(path)
    data.unlink()
    with pytest.raises(CheckpointError, match="external data file m.data of initialiser .* is missing"):
        open_checkpoint(path)


def test_external_data_outside_the_model_dir_is_refused(tmp_path):
    init = numpy_helper.from_array(np.zeros((4, 4), np.float32), Q)
    init.data_location = TensorProto.EXTERNAL
    init.ClearField("raw_data")
    entry = init.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    path = tmp_path / "m.onnx"
    onnx.save(_model([init]), path)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        open_checkpoint(path)


def test_garbage_onnx_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00\xffnot protobuf" * 10)
    with pytest.raises(CheckpointError, match="model.onnx is not a readable ONNX model"):
        open_checkpoint(path)
