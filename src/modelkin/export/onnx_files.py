"""Edits on exported ONNX protos: canonical initialiser names, one shared external-data file, the
prefill graph derived from the decode graph, and the input/output table the manifest records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ALIGN = 64  # byte alignment of each tensor in the external-data file
INLINE_BELOW = 1024  # tensors smaller than this stay inside the .onnx file
PREFILL_PREFIX = "modelkin_prefill/"


def canonical_names(model: Any, prefix: str) -> dict[str, str]:
    """Strip the tracing wrapper's ``prefix`` from initialiser names (and every use of them), so
    they read as the checkpoint's HF names; returns {old: new}."""
    renames = {
        t.name: t.name.removeprefix(prefix) for t in model.graph.initializer if t.name.startswith(prefix)
    }
    for tensor in model.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    _rename_uses(model.graph, renames)
    return renames


def _rename_uses(graph: Any, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renames.get(value.name, value.name)


def _raw_bytes(tensor: Any, base_dir: Path) -> bytes:
    from onnx import numpy_helper

    if tensor.data_location == 1:  # EXTERNAL: written beside the traced file (models over 2 GB)
        fields = {e.key: e.value for e in tensor.external_data}
        with (base_dir / fields["location"]).open("rb") as f:
            f.seek(int(fields.get("offset", 0)))
            length = fields.get("length")
            return f.read(int(length)) if length else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def externalize(model: Any, data_file: Path, *, base_dir: Path) -> int:
    """Move every initialiser of at least INLINE_BELOW bytes into ``data_file`` (aligned), pointing
    the proto at it by relative location; returns the bytes written.

    ``base_dir`` is where external data of the traced proto (if any) lives.
    """
    written = 0
    with data_file.open("wb") as f:
        for tensor in model.graph.initializer:
            raw = _raw_bytes(tensor, base_dir)
            if len(raw) < INLINE_BELOW:
                if tensor.data_location == 1:
                    _inline(tensor, raw)
                continue
            f.write(b"\0" * (-f.tell() % ALIGN))
            offset = f.tell()
            f.write(raw)
            written += len(raw)
            _point_to(tensor, data_file.name, offset, len(raw))
    return written


def _clear_data(tensor: Any) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]


def _inline(tensor: Any, raw: bytes) -> None:
    _clear_data(tensor)
    tensor.data_location = 0
    tensor.raw_data = raw


def _point_to(tensor: Any, location: str, offset: int, length: int) -> None:
    _clear_data(tensor)
    tensor.data_location = 1
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def derive_prefill(decode: Any, *, past_inputs: list[str], kv_heads: int, head_dim: int) -> Any:
    """The prefill graph: ``decode`` with its past inputs replaced by empty [B, K, 0, Dh] tensors
    built from the batch size of input_ids. Initialisers (external) are shared, not copied."""
    from onnx import ModelProto, TensorProto, helper

    model = ModelProto()
    model.CopyFrom(decode)
    graph = model.graph
    dropped = set(past_inputs)
    kept = [v for v in graph.input if v.name not in dropped]
    kv_type = next(v for v in graph.input if v.name in dropped).type.tensor_type.elem_type
    del graph.input[:]
    graph.input.extend(kept)
    p = PREFILL_PREFIX

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> Any:
        return helper.make_node(op, [p + i for i in inputs], [p + name], name=p + name, **attrs)

    def const(name: str, values: list[int]) -> Any:
        value = helper.make_tensor(p + name + "_value", TensorProto.INT64, [len(values)], values)
        return node("Constant", [], name, value=value)

    fill = helper.make_tensor(p + "fill", kv_type, [1], [0])

    new_nodes = [
        helper.make_node("Shape", ["input_ids"], [p + "ids_shape"], name=p + "ids_shape"),
        const("zero", [0]),
        const("one", [1]),
        node("Slice", ["ids_shape", "zero", "one"], "batch"),
        const("kv_dims", [kv_heads, 0, head_dim]),
        node("Concat", ["batch", "kv_dims"], "empty_shape", axis=0),
        node("ConstantOfShape", ["empty_shape"], "empty_past", value=fill),
    ]
    for existing in graph.node:
        for i, name in enumerate(existing.input):
            if name in dropped:
                existing.input[i] = p + "empty_past"
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.name = "prefill"
    return model


def io_table(model: Any) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a graph: name, element type name, shape (ints or axis names)."""
    from onnx import TensorProto

    def entry(value: Any) -> dict[str, Any]:
        tt = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
        return {"name": value.name, "dtype": TensorProto.DataType.Name(tt.elem_type).lower(), "shape": dims}

    return {
        "inputs": [entry(v) for v in model.graph.input],
        "outputs": [entry(v) for v in model.graph.output],
    }
