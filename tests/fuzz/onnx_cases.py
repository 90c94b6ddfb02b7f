"""ONNX fuzz inputs: a small valid model with raw, typed and external initialisers, mutated at the
protobuf level (dims, data types, external-data locations/offsets/lengths) or at the byte level."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from tests.fuzz.strategies import absurd_ints, byte_mutations

EXTERNAL = "weights.bin"
LOCATIONS = ["../outside.bin", "/etc/hostname", "sub/../../outside.bin", "missing.bin", "", ".", "sub",
             "weights.bin\x00.txt", "C:\\weights.bin", "~/weights.bin", "//weights.bin", EXTERNAL,
             "sub/weights.bin", "weights.bin/", "\u00e9.bin"]
NUMBERS = ["0", "4", "-1", "-64", "abc", "1e3", "0x10", " 8", "", "99999999999999", str(2**64), "3.5"]


def base_model() -> tuple[Any, bytes, dict[str, np.ndarray]]:
    """(ModelProto with one external initialiser, external data bytes, expected tensors by name)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    h = rng.standard_normal(6).astype(np.float16)
    i = np.arange(3, dtype=np.int64)
    e = rng.standard_normal((2, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), helper.make_tensor("b", TensorProto.FLOAT, [4], b.tolist()),
             numpy_helper.from_array(h, "h"), numpy_helper.from_array(i, "i")]
    ext = numpy_helper.from_array(e, "e")
    ext.ClearField("raw_data")
    ext.data_location = TensorProto.EXTERNAL
    for key, value in (("location", EXTERNAL), ("offset", "16"), ("length", str(e.nbytes))):
        ext.external_data.add(key=key, value=value)
    inits.append(ext)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "fuzz", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, bytes(16) + e.tobytes() + bytes(8), {"w": w, "b": b, "h": h, "i": i, "e": e}


@st.composite
def mutated_model(draw: Any, model: Any, external: bytes) -> tuple[bytes, bytes]:
    """(serialized model, external data file) after 1-3 protobuf or byte mutations."""
    m = type(model)()
    m.CopyFrom(model)
    for _ in range(draw(st.integers(1, 3))):
        if not m.graph.initializer:
            break
        init = m.graph.initializer[draw(st.integers(0, len(m.graph.initializer) - 1))]
        kind = draw(st.sampled_from(["dims", "type", "raw", "location", "offset", "length", "external",
                                     "duplicate", "extfile", "nograph"]))
        if kind == "dims":
            del init.dims[:]
            init.dims.extend(max(-(2**63), min(v, 2**63 - 1)) for v in draw(st.lists(absurd_ints, max_size=4)))
        elif kind == "type":
            init.data_type = draw(st.integers(0, 30))
        elif kind == "raw":
            init.raw_data = draw(st.binary(max_size=80))
        elif kind in ("location", "offset", "length"):
            _set_external(init, kind, draw(st.sampled_from(LOCATIONS if kind == "location" else NUMBERS)))
        elif kind == "external":
            init.data_location = draw(st.sampled_from([0, 1]))
        elif kind == "duplicate":
            m.graph.initializer.add().CopyFrom(init)
        elif kind == "extfile":
            external = draw(byte_mutations(external))
        else:
            m.ClearField("graph")
    raw = m.SerializeToString()
    if draw(st.integers(0, 3)) == 0:
        raw = draw(byte_mutations(raw))
    return raw, external


def _set_external(init: Any, key: str, value: str) -> None:
    for item in init.external_data:
        if item.key == key:
            item.value = value
            return
    init.external_data.add(key=key, value=value)
