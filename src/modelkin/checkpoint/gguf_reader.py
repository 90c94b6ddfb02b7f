"""GGUF files via the ``gguf`` package: HF names, torch shapes, dequantised data.

Only the header is memory-mapped (read-only, shared); a tensor's data is mapped (privately, its own
byte range only) when asked for, so a file larger than RAM or than an address-space limit costs only
the tensors read.
"""

from __future__ import annotations

import functools
import pathlib
import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from modelkin.checkpoint.byte_range import RangeReader, row_runs
from modelkin.checkpoint.gguf_config import build_config
from modelkin.checkpoint.gguf_names import fallback_name, gguf_to_hf
from modelkin.checkpoint.limits import MAX_GGUF_ARRAY_ITEMS, check_count
from modelkin.checkpoint.source import TORCH_DTYPES, TensorInfo, TensorSource
from modelkin.errors import CheckpointError, ConfigError

# llama.cpp's converter permutes Q/K rows (for its RoPE layout) only for the Llama family.
PERMUTED_ARCHS = frozenset({"llama"})
# llama.cpp stores Gemma's RMSNorm weights as (1 + w); HF checkpoints (and modelkin) hold w.
NORM_PLUS_ONE_ARCHS = frozenset({"gemma2", "gemma3"})
_PLAIN_NUMPY = {"F64", "F32", "F16", "I64", "I32", "I16", "I8"}


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


HEAD_BYTES = 16 << 20  # the header is mapped in growing prefixes, starting with this many bytes


class LazyData:
    """Where a tensor's data lies in the file (stands in for gguf's ndarray view of the mapping).

    ``reshape`` and integer indexing on the first axis (one expert of a stacked tensor) return
    smaller LazyData; ``read`` maps its bytes (copy-on-write, only its own pages).
    """

    def __init__(self, file: pathlib.Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.file, self.offset, self.dtype, self.shape = file, offset, np.dtype(dtype), tuple(shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def reshape(self, *shape: Any) -> LazyData:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return LazyData(self.file, self.offset, self.dtype, tuple(int(d) for d in shape))

    def __getitem__(self, index: int) -> LazyData:
        rest = self.shape[1:]
        if not isinstance(index, (int, np.integer)) or not 0 <= index < self.shape[0]:
            raise IndexError(f"lazy GGUF data supports one index on the first axis, got {index!r}")
        step = int(np.prod(rest, dtype=np.int64)) * self.dtype.itemsize
        return LazyData(self.file, self.offset + int(index) * step, self.dtype, rest)

    def read(self, ranges: RangeReader) -> np.ndarray:
        raw = ranges.map(self.file, self.offset, self.nbytes)
        return raw.numpy().view(self.dtype).reshape(self.shape)


class _Prefix:
    """What np.memmap sees: an open file whose end is at ``size`` (it maps only that prefix)."""

    def __init__(self, f: Any, size: int):
        self._f, self._size, self._pos = f, size, 0
        self.name = f.name

    def read(self, n: int = -1) -> bytes:  # np.memmap only checks that it exists
        raise OSError("not read directly")

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = self._size + offset if whence == 2 else offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        return self._f.fileno()


@functools.cache  # one class: a class per file would leave a reference cycle for the collector each time
def _reader_class() -> type:
    from gguf import GGUFReader

    class PlainViewReader(GGUFReader):
        """GGUFReader that maps only the header (a growing prefix of the file, read-only and shared)
        and leaves tensor data in the file as LazyData. Header parsing uses a plain ndarray view of
        the map, because np.memmap slicing pays a Python-level hook per field (about 10^6 fields for
        a 49k-token vocabulary)."""

        def __init__(self, path: pathlib.Path):
            self._path = pathlib.Path(path)
            self._file_size = self._path.stat().st_size
            self._in_tensors = False
            with self._path.open("rb") as f:
                super().__init__(_Prefix(f, min(self._file_size, HEAD_BYTES)) if self._file_size else path)

        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray)

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            if self._in_tensors:  # tensor data: located, not mapped
                if offset < 0 or end > self._file_size:
                    raise ValueError(f"tensor data at bytes {offset}..{end} lies past the end of the "
                                     f"file ({self._file_size} bytes): it is truncated")
                return LazyData(self._path, offset, np.dtype(dtype).newbyteorder(
                    self.byte_order if override_order is None else override_order), (count,))
            if end > len(self.data) and len(self.data) < self._file_size:
                grown = min(self._file_size, max(end, 2 * len(self.data)))
                self.data = np.memmap(self._path, mode="r", shape=(grown,))
            return super()._get(offset, dtype, count, override_order)

        def _build_tensors(self, start_offs: int, fields: Any) -> None:
            self._in_tensors = True
            try:
                super()._build_tensors(start_offs, fields)
            finally:
                self._in_tensors = False

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            # gguf walks an array item by item and, past the end of the file, reads empty items
            # forever: check the claimed length against the bytes left before it starts.
            if raw_type != 9:  # not GGUFValueType.ARRAY
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            item_type, count = int(raw_itype[0]), int(alen[0])
            check_count(count, item_bytes=_MIN_ITEM_BYTES.get(item_type, 1),
                        remaining=self._file_size - orig_offs - 12,
                        what=f"the metadata array at byte {orig_offs}", limit=MAX_GGUF_ARRAY_ITEMS)
            from gguf import GGUFValueType

            types = [GGUFValueType.ARRAY, GGUFValueType(item_type)]
            start = orig_offs + 12
            nptype = self.gguf_scalar_to_np.get(types[1])
            if nptype is not None:  # numbers: one view of them all (gguf makes one per item)
                values = self._get(start, nptype, count)
                return 12 + int(values.nbytes), [raw_itype, alen, values], [2], types
            if types[1] == GGUFValueType.STRING:  # a view per string's bytes; the lengths are not kept
                end, parts = self._string_parts(start, count)
                return end - orig_offs, [raw_itype, alen, *parts], list(range(2, 2 + count)), types
            return super()._get_field_parts(orig_offs, raw_type)  # arrays of arrays: gguf's own walk

        def _string_parts(self, offset: int, count: int) -> tuple[int, list[np.ndarray]]:
            """Views of ``count`` length-prefixed strings from ``offset`` and the offset past them: what gguf
            computes item by item (~2 s for a 49k-token vocabulary and its merges), in one Python loop."""
            swapped = "big" if sys.byteorder == "little" else "little"
            order = swapped if self.byte_order == "S" else sys.byteorder
            parts: list[np.ndarray] = []
            data = view = None
            for _ in range(count):
                if data is None or offset + 8 > len(data):
                    data = self._cover(offset + 8)
                    view = memoryview(data)
                n = int.from_bytes(view[offset:offset + 8], order)
                offset += 8
                if offset + n > len(data):
                    data = self._cover(offset + n)
                    view = memoryview(data)
                parts.append(data[offset:offset + n])
                offset += n
            return offset, parts

        def _cover(self, end: int) -> np.ndarray:
            """The header map, grown to hold bytes up to ``end``."""
            if end > self._file_size:
                raise ValueError(f"a metadata string ends at byte {end}, past the end of the file "
                                 f"({self._file_size} bytes)")
            if end > len(self.data):
                grown = min(self._file_size, max(end, 2 * len(self.data)))
                self.data = np.memmap(self._path, mode="r", shape=(grown,))
            return self.data

    # smallest on-disk size of one array item, by GGUFValueType (strings: their 8-byte length)
    _MIN_ITEM_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: 8, 9: 12, 10: 8, 11: 8, 12: 8}
    return PlainViewReader


def _open_reader(path: pathlib.Path) -> Any:
    try:
        return _reader_class()(path)
    except Exception as err:  # noqa: BLE001 - boundary
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err})",
            hint="re-download the file; it may be truncated or written by an incompatible tool",
        ) from None


class GGUFSource(TensorSource):
    """A GGUF file with canonical HF tensor names; quantised tensors dequantise to float32."""

    format = "gguf"

    def __init__(self, path: pathlib.Path):
        super().__init__(path)
        self._reader = _open_reader(path)
        fields = self._reader.fields
        self._scalars = {
            key: _contents(field, path)
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
            self._metadata = {k: _contents(f, self.path) for k, f in self._reader.fields.items()}
        return dict(self._metadata)

    def files(self) -> list[pathlib.Path]:
        return [self.path]

    def _release(self) -> None:
        # the reader's fields hold views of the header's memory map; drop them so the file is unmapped
        self._entries = {k: replace(v, tensor=None) for k, v in self._entries.items()}
        self._reader = None
        self._ranges.close()


def _contents(field: Any, path: pathlib.Path) -> Any:
    try:
        return field.contents()
    except (ValueError, UnicodeDecodeError, IndexError, TypeError) as err:
        raise CheckpointError(
            f"{path} has an unreadable GGUF metadata value {field.name!r} ({type(err).__name__})",
            hint="re-download the file; it may be damaged",
        ) from None


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
    else:
        array = dequantize(data, entry.tensor.tensor_type)
    out = torch.from_numpy(np.ascontiguousarray(array)).reshape(shape)
    expected = TORCH_DTYPES.get(dtype, torch.float32)
    return out if out.dtype == expected else out.to(expected)
