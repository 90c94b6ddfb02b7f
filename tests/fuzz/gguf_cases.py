"""GGUF fuzz inputs: small valid files written with gguf.GGUFWriter, and byte-level mutations aimed at
their structure (magic, version, counts, string/array lengths, value types, tensor dims, quant types)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from tests.ckpt_factory import gguf_kv_from_config, hf_state_to_gguf, tiny_llama_state, write_gguf_file
from tests.fuzz.strategies import byte_mutations, overwrite_int, u32_values, u64_values

QTYPES = {"blk.0.attn_q.weight": "Q8_0", "blk.0.attn_k.weight": "Q4_0", "blk.0.ffn_up.weight": "Q4_1",
          "token_embd.weight": "F16", "blk.0.ffn_gate.weight": "BF16", "blk.0.ffn_down.weight": "Q5_1"}


@dataclass(frozen=True)
class BaseGGUF:
    data: bytes
    ints: tuple[tuple[int, int], ...]  # (offset, size) of every structural integer
    arrays: tuple[int, ...]  # offset of each metadata array's item type (its length follows)
    values: tuple[tuple[int, int], ...]  # (offset, value type) of each scalar metadata value
    header_end: int  # start of the tensor data section


def _structure(path: Path) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...], tuple, int]:
    """Offsets of the integers that describe the file (counts, lengths, types, dims, offsets)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    found: list[tuple[int, int]] = [(0, 4), (4, 4), (8, 8), (16, 8)]
    arrays, values = [], []
    for field in fields:
        offset = field.offset
        if len(field.types) == 1 and field.types[0] in (4, 5, 6) and not field.name.startswith("GGUF."):
            values.append((offset + sum(p.nbytes for p in field.parts[:-1]), int(field.types[0])))
        if field.types and field.types[0] == 9:  # ARRAY: key length, key, value type, item type, count
            arrays.append(offset + sum(p.nbytes for p in field.parts[:3]))
        for part in field.parts:
            if part.dtype.kind in "ui" and part.dtype.itemsize in (4, 8):
                found += [(offset + i * part.dtype.itemsize, part.dtype.itemsize) for i in range(min(part.size, 4))]
            offset += part.nbytes
    return tuple(sorted(set(found))), tuple(arrays), tuple(values), reader.data_offset


def build_bases(directory: Path) -> list[BaseGGUF]:
    """Two valid GGUFs: a quantised tiny Llama with an SPM vocabulary, and a GPT-2 style BPE one."""
    state, config = tiny_llama_state(layers=1, hidden=32, heads=4, kv_heads=2, inter=256, vocab=8)
    tensors = hf_state_to_gguf(state, config, "llama")
    kv = gguf_kv_from_config(config, "llama")
    spm = {**kv, "tokenizer.ggml.model": "llama",
           "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "\u2581a", "b", "<0x0A>", "\u2581", "\u4e2d"],
           "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, 0.0, -3.0, -4.0],
           "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 6, 1, 1],
           "tokenizer.chat_template": "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"}
    bpe = {**kv, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
           "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "ab", "\u0120", "\u0120a", "c", "<|im_end|>"],
           "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1, 1, 3],
           "tokenizer.ggml.merges": ["a b", "\u0120 a"], "general.name": "fuzz"}
    bases = []
    for i, meta in enumerate((spm, bpe)):
        path = directory / f"base{i}.gguf"
        write_gguf_file(path, "llama", tensors, meta, qtypes=QTYPES if i == 0 else None)
        ints, arrays, values, header_end = _structure(path)
        bases.append(BaseGGUF(path.read_bytes(), ints, arrays, values, header_end))
    return bases


@st.composite
def mutated_gguf(draw: Any, bases: list[BaseGGUF]) -> bytes:
    """One base file with 1-3 structural or byte-level mutations."""
    base = draw(st.sampled_from(bases))
    data = base.data
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["int", "int", "int", "version", "magic", "truncate", "bytes", "counts",
                                     "array"]))
        if kind == "int":
            offset, size = draw(st.sampled_from(base.ints))
            value = draw(u32_values if size == 4 else u64_values)
            data = overwrite_int(data, offset, size, value)
        elif kind == "array":  # another item type and a lying length
            at = draw(st.sampled_from(base.arrays))
            data = overwrite_int(data, at, 4, draw(st.integers(0, 13) | st.sampled_from([99, 2**31])))
            data = overwrite_int(data, at + 4, 8, draw(u64_values))
        elif kind == "version":
            data = overwrite_int(data, 4, 4, draw(st.sampled_from([0, 1, 2, 4, 5, 2**16, 2**24 + 3])))
        elif kind == "magic":
            data = draw(st.sampled_from([b"GGUG", b"GGML", b"FUGG", b"\0\0\0\0"])) + data[4:]
        elif kind == "counts":
            data = overwrite_int(data, draw(st.sampled_from([8, 16])), 8,
                                 draw(st.sampled_from([0, 1, 10**6, 2**32, 2**62, 2**63, 2**64 - 1])))
        elif kind == "truncate":
            cut = draw(st.sampled_from([o for o, _ in base.ints] + [base.header_end, len(data) - 1]))
            data = data[:cut + draw(st.integers(0, 3))]
        else:
            data = draw(byte_mutations(data, focus=base.header_end))
    return data


FLOATS = [0.0, -1.0, 1e-30, 1e38, float("inf"), float("-inf"), float("nan"), 3.0]


@st.composite
def metadata_values(draw: Any, bases: list[BaseGGUF]) -> bytes:
    """One base file with 1-3 scalar metadata values (head counts, sizes, rope base, eps, ids) replaced."""
    base = draw(st.sampled_from(bases))
    data = base.data
    for _ in range(draw(st.integers(1, 3))):
        offset, kind = draw(st.sampled_from(base.values))
        if kind == 6:
            data = data[:offset] + struct.pack("<f", draw(st.sampled_from(FLOATS))) + data[offset + 4:]
        else:
            data = overwrite_int(data, offset, 4, draw(u32_values | st.sampled_from([3, 5, 7, 16, 31, 33])))
    return data


@st.composite
def valid_gguf(draw: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Norm tensors (F32/F16, random values) and random metadata for a round trip through GGUFWriter."""
    tensors: dict[str, np.ndarray] = {}
    for i in range(draw(st.integers(0, 2))):
        for kind in draw(st.sets(st.sampled_from(["attn_norm", "ffn_norm"]))):
            n = draw(st.integers(1, 8))
            dtype = draw(st.sampled_from([np.float32, np.float16]))
            raw = draw(st.binary(min_size=n * np.dtype(dtype).itemsize, max_size=n * np.dtype(dtype).itemsize))
            tensors[f"blk.{i}.{kind}.weight"] = np.frombuffer(raw, dtype=dtype).copy()
    keys = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
    values = st.one_of(st.integers(0, 2**32 - 1), st.booleans(),
                       st.text(st.characters(codec="utf-8"), min_size=1, max_size=12),  # the writer drops ""
                       st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4),  # written as INT32
                       st.lists(st.text(st.characters(codec="utf-8"), max_size=4), min_size=1, max_size=4))
    meta = draw(st.dictionaries(keys.map(lambda k: f"fuzz.{k}"), values, max_size=4))
    return tensors, meta
