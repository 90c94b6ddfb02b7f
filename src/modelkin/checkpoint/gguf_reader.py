"""GGUF files via the ``gguf`` package: HF names, torch shapes, dequantised data.

Only the header is memory-mapped (read-only, shared); a tensor's data is mapped (privately, its own
byte range only) when asked for, so a file larger than RAM or than an address-space limit costs only
the tensors read.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from modelkin.checkpoint.byte_range import RangeReader, row_runs
from modelkin.checkpoint.gguf_config import build_config
from modelkin.checkpoint.gguf_header import LazyData, contents, open_reader
from modelkin.checkpoint.gguf_names import fallback_name, gguf_to_hf
from modelkin.checkpoint.source import TORCH_DTYPES, TensorInfo, TensorSource
from modelkin.errors import CheckpointError, ConfigError

# llama.cpp's converter permutes Q/K rows (for its RoPE layout) only for the Llama family.
PERMUTED_ARCHS = frozenset({"llama"})
# llama.cpp stores Gemma's RMSNorm weights as (1 + w); HF checkpoints (and modelkin) hold w.
NORM_PLUS_ONE_ARCHS = frozenset({"gemma2", "gemma3"})
_PLAIN_NUMPY = {"F64", "F32", "F16", "I64", "I32", "I16", "I8"}
# block formats dequantised here with torch (bit-identical to gguf.quants; all of SmolLM2's tensors read in
# 0.32 s instead of 0.57); every other quantisation goes through gguf.quants.dequantize
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
_BLOCK_SIZE = 32  # values per block in all three
_DEQUANT_CHUNK = 1 << 15  # blocks per step: 1 MB of float32 values


@dataclass(frozen=True, slots=True)
class _Entry:
    tensor: Any  # gguf.ReaderTensor
    expert: int | None  # index into a stacked expert tensor
    n_heads: int | None  # undo the Q/K row permutation with this many heads
    info: TensorInfo


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's Q/K permutation ``w.reshape(H, 2, R // H // 2, …).swapaxes(1, 2)``.

    Works for weights (R, D) and biases (R,), R = H * head_dim.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K permutation (HF -> GGUF row order); the inverse of ``unpermute_rows``."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFSource(TensorSource):
    """A GGUF file with canonical HF tensor names; quantised tensors dequantise to float32."""

    format = "gguf"

    def __init__(self, path: pathlib.Path):
        super().__init__(path)
        self._reader = open_reader(path)
        fields = self._reader.fields
        self._scalars = {
            key: contents(field, path)
            for key, field in fields.items()
            if len(field.types) == 1 and not key.startswith("GGUF.")
        }
        self.arch = str(self._scalars.get("general.architecture", ""))
        tensors = list(self._reader.tensors)
        tokens = fields.get("tokenizer.ggml.tokens")
        embed = next((t for t in tensors if t.name == "token_embd.weight"), None)
        self._config = build_config(
            self._scalars,
            tensor_names={t.name for t in tensors},
            vocab_fallback=len(tokens.data)
            if tokens is not None
            else (int(embed.shape[-1]) if embed is not None else None),
        )
        self._metadata: dict[str, Any] | None = None
        self._entries: dict[str, _Entry] = {}
        self._ranges = RangeReader()
        for tensor in tensors:
            self._add(tensor)

    def _heads_for(self, gguf_name: str) -> int | None:
        if self.arch not in PERMUTED_ARCHS:
            return None
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
        key = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}.get(kind)
        if key is None:
            return None
        heads = self._config.get(key)
        if not isinstance(heads, int) or heads <= 0:
            raise ConfigError(
                f"{self.path}: GGUF metadata lacks {self.arch}.attention.head_count(_kv), "
                f"needed to undo the Q/K permutation of {gguf_name}",
            )
        return heads

    def _add(self, tensor: Any) -> None:
        gname = str(tensor.name)
        dtype = tensor.tensor_type.name
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        nbytes = int(tensor.n_bytes)
        hf_name = gguf_to_hf(gname, self.arch)
        if hf_name is None:
            hf_name = fallback_name(gname)
            self.unmapped[hf_name] = gname
        if hf_name.endswith("shared_expert_gate.weight") and len(shape) == 1:
            shape = (1, shape[0])  # HF stores this router as a (1, D) Linear weight
        heads = self._heads_for(gname)
        if heads is not None and (not shape or shape[0] % (2 * heads)):
            raise CheckpointError(
                f"{self.path}: {gname} of shape {list(shape)} does not split into {heads} RoPE heads"
            )
        if "{expert}" in hf_name:
            if len(shape) < 2:
                raise CheckpointError(f"{self.path}: expert tensor {gname} has shape {list(shape)}")
            n_experts = shape[0]
            for e in range(n_experts):
                info = TensorInfo(hf_name.format(expert=e), shape[1:], dtype, nbytes // n_experts)
                self._put(gname, _Entry(tensor, e, heads, info))
        else:
            self._put(gname, _Entry(tensor, None, heads, TensorInfo(hf_name, shape, dtype, nbytes)))

    def _put(self, gname: str, entry: _Entry) -> None:
        name = entry.info.name
        if name in self._entries:
            other = self._entries[name].tensor.name
            raise CheckpointError(
                f"{self.path}: GGUF tensors {other} and {gname} both map to {name}",
                hint="the file mixes stacked and per-expert tensors; re-convert it",
            )
        self._entries[name] = entry

    def keys(self) -> list[str]:
        return list(self._entries)

    def _info(self, name: str) -> TensorInfo | None:
        entry = self._entries.get(name)
        return None if entry is None else entry.info

    def _read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        try:
            tensor = _to_torch(entry, self._ranges)
        except (ValueError, NotImplementedError, TypeError, OSError) as err:
            raise CheckpointError(
                f"cannot read {entry.tensor.name} ({entry.info.dtype}) from {self.path}: {err}",
                hint="this quantisation type may be unsupported by the installed gguf package",
            ) from None
        if entry.n_heads is not None:
            tensor = unpermute_rows(tensor, entry.n_heads)
        if self.arch in NORM_PLUS_ONE_ARCHS and entry.info.name.endswith("norm.weight"):
            tensor = tensor - 1
        return tensor

    def is_mapped(self, name: str) -> bool:
        entry = self._entries.get(name)
        return (entry is not None and (entry.info.dtype in _PLAIN_NUMPY or entry.info.dtype == "BF16")
                and entry.n_heads is None
                and not (self.arch in NORM_PLUS_ONE_ARCHS and name.endswith("norm.weight")))

    def _read_rows(self, name: str, unique: torch.Tensor) -> torch.Tensor | None:
        entry = self._entries[name]
        data = entry.tensor.data
        if (entry.expert is not None or entry.n_heads is not None or not isinstance(data, LazyData)
                or len(data.shape) != 2 or len(entry.info.shape) != 2 or data.shape[0] != entry.info.shape[0]
                or (self.arch in NORM_PLUS_ONE_ARCHS and name.endswith("norm.weight"))):
            return None  # rows are not whole byte runs here: read the tensor whole
        row_bytes = data.shape[1] * data.dtype.itemsize
        try:
            raw = self._ranges.read_runs(data.file, row_runs(unique, data.offset, row_bytes))
            n = int(unique.numel())
            blocks = raw.numpy().view(data.dtype).reshape(n, data.shape[1])
            return _convert(blocks, entry, (n, entry.info.shape[1]))
        except (ValueError, NotImplementedError, TypeError, OSError) as err:
            raise CheckpointError(f"cannot read rows of {entry.tensor.name} ({entry.info.dtype}) from "
                                  f"{self.path}: {err}") from None

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            if self._reader is None:
                raise CheckpointError(f"cannot read metadata: {self.path} was closed")
            self._metadata = {k: contents(f, self.path) for k, f in self._reader.fields.items()}
        return dict(self._metadata)

    def files(self) -> list[pathlib.Path]:
        return [self.path]

    def _release(self) -> None:
        # the reader's fields hold views of the header's memory map; drop them so the file is unmapped
        self._entries = {k: replace(v, tensor=None) for k, v in self._entries.items()}
        self._reader = None
        self._ranges.close()


def _to_torch(entry: _Entry, ranges: RangeReader) -> torch.Tensor:
    data = entry.tensor.data
    if entry.expert is not None:
        data = data[entry.expert]
    fresh = isinstance(data, LazyData)  # a private map of its own: no copy needed
    if fresh:
        data = data.read(ranges)
    return _convert(data, entry, entry.info.shape, fresh=fresh)


def _convert(data: Any, entry: _Entry, shape: tuple[int, ...], *, fresh: bool = True) -> torch.Tensor:
    """Stored GGUF data (plain or quantised blocks) as a torch tensor of ``shape``."""
    from gguf.quants import dequantize

    dtype = entry.info.dtype
    if dtype in _PLAIN_NUMPY:
        array = data if fresh else np.array(data)
    elif dtype == "BF16":
        bits = (data if fresh else np.array(data)).view(np.uint16)
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
    elif dtype in _BLOCK_BYTES:
        return dequantize_blocks(torch.from_numpy(data if fresh else np.array(data)), dtype).reshape(shape)
    else:
        array = dequantize(data, entry.tensor.tensor_type)
    out = torch.from_numpy(np.ascontiguousarray(array)).reshape(shape)
    expected = TORCH_DTYPES.get(dtype, torch.float32)
    return out if out.dtype == expected else out.to(expected)


def dequantize_blocks(raw: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 values of GGUF Q4_0, Q4_1 or Q8_0 blocks (uint8, any shape holding whole blocks), flat.

    The same operations in the same order as gguf.quants (scale d and minimum m are float16; Q4 values
    are the low nibbles of a block's 16 bytes, then the high ones): d * q (+ m), each rounded to float32.
    Blocks go 2^15 at a time (1 MB of values) into the output, so temporaries stay small and in cache.
    The output is a numpy array's memory, malloc'd as gguf.quants' arrays are: with a torch-allocated
    output, compare_many's peak anonymous memory rose from 0.99 to 1.07-1.10 GB (three traces; the
    sampled decode after the suspect's bfloat16 cast reused less of the heap; the glibc mechanism was
    not pinned down), over issue 17's bound.
    """
    blocks = raw.reshape(-1, _BLOCK_BYTES[dtype])
    out = torch.from_numpy(np.empty((blocks.shape[0], _BLOCK_SIZE), dtype=np.float32))
    for start in range(0, blocks.shape[0], _DEQUANT_CHUNK):
        chunk, values = blocks[start:start + _DEQUANT_CHUNK], out[start:start + _DEQUANT_CHUNK]
        d = chunk[:, :2].contiguous().view(torch.float16).float()
        if dtype == "Q8_0":
            values.copy_(chunk[:, 2:].view(torch.int8)).mul_(d)
            continue
        quants = chunk[:, 2 if dtype == "Q4_0" else 4:]
        nibbles = (quants & 0x0F, quants >> 4)  # the block's first 16 values, then its last 16
        if dtype == "Q4_0":  # (q - 8) in int8, then float32, as gguf.quants does
            nibbles = tuple(n.view(torch.int8).sub_(8) for n in nibbles)
        values[:, :_BLOCK_SIZE // 2].copy_(nibbles[0])
        values[:, _BLOCK_SIZE // 2:].copy_(nibbles[1])
        values.mul_(d)
        if dtype == "Q4_1":
            values.add_(chunk[:, 2:4].contiguous().view(torch.float16).float())
    return out.reshape(-1)
