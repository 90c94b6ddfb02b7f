"""The header of a GGUF file, parsed by the ``gguf`` package's reader with three changes: only the header is
memory-mapped (read-only, shared, in growing prefixes), a tensor's data is located but not mapped
(``LazyData``), and metadata arrays are parsed in bulk (gguf walks them item by item: ~2 s for a 49k-token
vocabulary and its merges, ~9 s for Gemma-3's 262k).
"""

from __future__ import annotations

import functools
import pathlib
import sys
from typing import Any

import numpy as np

from modelkin.checkpoint.byte_range import RangeReader
from modelkin.checkpoint.limits import MAX_GGUF_ARRAY_ITEMS, check_count
from modelkin.errors import CheckpointError

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


def open_reader(path: pathlib.Path) -> Any:
    """gguf's reader of ``path``'s header (see PlainViewReader); CheckpointError if it is not GGUF."""
    try:
        return _reader_class()(path)
    except Exception as err:  # noqa: BLE001 - boundary
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err})",
            hint="re-download the file; it may be truncated or written by an incompatible tool",
        ) from None


def contents(field: Any, path: pathlib.Path) -> Any:
    """A metadata field's value; CheckpointError naming the field if it cannot be decoded."""
    try:
        return field.contents()
    except (ValueError, UnicodeDecodeError, IndexError, TypeError) as err:
        raise CheckpointError(
            f"{path} has an unreadable GGUF metadata value {field.name!r} ({type(err).__name__})",
            hint="re-download the file; it may be damaged",
        ) from None
