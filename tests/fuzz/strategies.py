"""Hypothesis strategies shared by the fuzz tests: JSON values, absurd integers, byte mutations.

Format-specific builders live beside them (safetensors headers here; GGUF, ONNX, configs and
tokenizer files in their own modules) so each test file stays small.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch
from hypothesis import strategies as st

# integers that break naive readers: signs, 32/64-bit edges, beyond 64 bits
EDGE_INTS = [0, 1, 2, 3, 7, 8, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**62,
             2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -2, -(2**31), -(2**63)]
absurd_ints = st.one_of(st.integers(-3, 40), st.sampled_from(EDGE_INTS))
u32_values = st.one_of(st.integers(0, 64), st.sampled_from([2**16, 2**31, 2**32 - 1, 0xDEADBEEF]))
u64_values = st.one_of(st.integers(0, 64), st.sampled_from([2**20, 2**31, 2**32, 2**40, 2**62, 2**63,
                                                            2**64 - 1]))

json_scalars = st.one_of(
    st.none(), st.booleans(), absurd_ints, st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
tensor_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=24
).filter(lambda s: s != "__metadata__")


@st.composite
def tensors(draw: Any, max_tensors: int = 4) -> dict[str, torch.Tensor]:
    """A small dict of tensors of any safetensors dtype, with random bits (NaNs and all)."""
    names = draw(st.lists(tensor_names, max_size=max_tensors, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        numel = math.prod(shape)
        size = numel * SAFETENSORS_DTYPES[dtype].itemsize
        raw = draw(st.binary(min_size=size, max_size=size))
        tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        if dtype == "BOOL":
            tensor = tensor % 2
        out[name] = tensor.view(SAFETENSORS_DTYPES[dtype]).reshape(shape).clone()
    return out


@st.composite
def byte_mutations(draw: Any, data: bytes, *, focus: int | None = None) -> bytes:
    """``data`` truncated, with bytes overwritten, inserted or removed (mostly within ``focus`` bytes)."""
    out = bytearray(data)
    limit = min(len(out), focus) if focus else len(out)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
        at = draw(st.integers(0, max(limit - 1, 0)))
        if kind == "flip" and out:
            at = min(at, len(out) - 1)
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and out:
            chunk = draw(st.binary(min_size=1, max_size=8))
            out[at:at + len(chunk)] = chunk
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[at:at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del out[draw(st.integers(0, len(out))):]
        else:
            out += draw(st.binary(max_size=64))
    return bytes(out)


def overwrite_int(data: bytes, offset: int, size: int, value: int) -> bytes:
    """``data`` with the little-endian unsigned int of ``size`` bytes at ``offset`` set to ``value``."""
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[size]
    return data[:offset] + struct.pack(fmt, value % (1 << (8 * size))) + data[offset + size:]


# ---- safetensors headers ---------------------------------------------------------------------

def safetensors_bytes(header: Any, data: bytes, *, prefix: int | None = None, text: str | None = None) -> bytes:
    """A safetensors file: 8-byte length prefix, JSON header (or raw ``text``), data section."""
    body = (text if text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    n = len(body) if prefix is None else prefix
    return struct.pack("<Q", n % 2**64) + body + data


@st.composite
def lying_safetensors(draw: Any) -> bytes:
    """A safetensors file whose header lies: bad offsets, shapes, dtypes, lengths or JSON."""
    tensors_ = draw(tensors(max_tensors=3))
    header: dict[str, Any] = {}
    data = b""
    for name, t in tensors_.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = next(k for k, v in SAFETENSORS_DTYPES.items() if v == t.dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    names = list(header)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["shape", "offsets", "overlap", "dtype", "drop_key", "entry",
                                     "metadata", "data_len", "prefix", "text", "extra_key"]))
        name = draw(st.sampled_from(names)) if names else None
        if name is not None and not isinstance(header[name], dict):
            continue
        if kind == "shape" and name:
            header[name]["shape"] = draw(st.one_of(st.lists(absurd_ints, max_size=5), json_values))
        elif kind == "offsets" and name:
            header[name]["data_offsets"] = draw(st.one_of(st.lists(absurd_ints, min_size=2, max_size=2),
                                                          st.lists(absurd_ints, max_size=3), json_values))
        elif kind == "overlap" and len(names) > 1:
            other = header[draw(st.sampled_from(names))]
            if isinstance(other, dict) and "data_offsets" in other:
                header[name]["data_offsets"] = other["data_offsets"]
        elif kind == "dtype" and name:
            header[name]["dtype"] = draw(st.one_of(
                st.sampled_from(["Q4_0", "I128", "f32", "", "C64", "U16", "U32", "U64", "F8_E8M0"]), json_values))
        elif kind == "drop_key" and name:
            header[name].pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "entry" and name:
            header[name] = draw(json_values)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
        elif kind == "data_len":
            cut = draw(st.integers(-len(data), 32))
            data = data[:cut] if cut < 0 else data + bytes(cut)
        elif kind == "extra_key" and name and isinstance(header[name], dict):
            header[name][draw(st.text(max_size=6))] = draw(json_values)
    kind = draw(st.sampled_from(["ok", "ok", "prefix", "text", "not_object", "bad_utf8"]))
    if kind == "prefix":
        return safetensors_bytes(header, data, prefix=draw(st.sampled_from(EDGE_INTS) | st.integers(0, 512)))
    if kind == "text":
        text = json.dumps(header)
        cut = draw(st.integers(0, len(text)))
        return safetensors_bytes(None, data, text=text[:cut] + draw(st.text(max_size=4)) + text[cut + 1:])
    if kind == "not_object":
        return safetensors_bytes(draw(json_values.filter(lambda v: not isinstance(v, dict))), data)
    if kind == "bad_utf8":
        body = json.dumps(header).encode()
        body = body[:1] + b"\xff\xfe" + body[1:]
        return struct.pack("<Q", len(body)) + body + data
    padding = draw(st.integers(0, 8))  # the spec allows trailing spaces in the header
    return safetensors_bytes(None, data, text=json.dumps(header) + " " * padding)
