"""Safetensors checkpoints (one file, or shards with an index): headers parsed here; each tensor's data
from its own byte range (mapped, or by positioned reads), never a mapping of the whole file.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from modelkin.checkpoint.byte_range import RangeReader, row_runs
from modelkin.checkpoint.hf_config import load_hf_config
from modelkin.checkpoint.source import TORCH_DTYPES, TensorInfo, TensorSource
from modelkin.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own limit
# How tensor data is read (bench.inspect --read compares them through this variable):
#   "mmap"      a private map of each tensor's own byte range (the default: zero-copy like safe_open,
#               bounded by the tensor, not the file);
#   "pread"     positioned reads into a new buffer (no mapping at all; a copy);
#   "safe_open" the safetensors library's copy-on-write map of the whole file, which the kernel refuses
#               for a file larger than RAM + swap (or an address-space limit): then "mmap" for that file.
READ_MODE_ENV = "MODELKIN_SAFETENSORS_READ"
READ_MODES = ("mmap", "pread", "safe_open")


@dataclass(frozen=True, slots=True)
class _Entry:
    path: pathlib.Path
    begin: int  # offset in the data section (as in the header)
    offset: int  # absolute offset in the file
    info: TensorInfo


def _header_error(path: pathlib.Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file: {what}",
        hint="re-download or re-save the file (it may be truncated or of another format)",
    )


def read_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
    """Parse the 8-byte length and JSON header of a safetensors file, without touching tensor data.

    Returns:
        (header dict, size in bytes of the data section).

    Raises:
        CheckpointError: the file is too short, the header is not JSON, or it is truncated.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _header_error(path, f"only {size} bytes long")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise _header_error(path, f"header length {n} exceeds the file size {size}")
            raw = f.read(n)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _header_error(path, f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise _header_error(path, "header is not a JSON object")
    return header, size - 8 - n


def _parse_entry(path: pathlib.Path, name: str, raw: Any, data_size: int, data_start: int) -> _Entry:
    try:
        dtype = str(raw["dtype"])
        shape = tuple(int(d) for d in raw["shape"])
        begin, end = (int(x) for x in raw["data_offsets"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise _header_error(path, f"bad header entry for tensor {name!r}") from None
    if any(d < 0 for d in shape):
        raise _header_error(path, f"tensor {name!r} has negative dims {list(shape)}")
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} ends at data byte {end} "
            f"but the file holds {data_size} data bytes",
            hint="re-download the file",
        )
    if not 0 <= begin <= end:
        raise _header_error(path, f"tensor {name!r} has offsets {begin}..{end}")
    if dtype in TORCH_DTYPES:
        expected = math.prod(shape) * torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        if expected != end - begin:
            raise _header_error(
                path, f"tensor {name!r} ({dtype}{list(shape)}) needs {expected} bytes, has {end - begin}"
            )
    return _Entry(path, begin, data_start + begin, TensorInfo(name, shape, dtype, end - begin))


def scan_file(path: pathlib.Path) -> tuple[list[_Entry], dict[str, str]]:
    """All tensor entries of one safetensors file in data order, plus its __metadata__."""
    header, data_size = read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _header_error(path, "__metadata__ is not an object")
    data_start = path.stat().st_size - data_size
    entries = [_parse_entry(path, name, raw, data_size, data_start) for name, raw in header.items()]
    entries.sort(key=lambda e: e.begin)
    return entries, {str(k): str(v) for k, v in metadata.items()}


class SafetensorsSource(TensorSource):
    """One or more safetensors files viewed as one checkpoint.

    Args:
        path: the user-given path (directory or file), used for messages and config lookup.
        files: the data files, in order.
        wanted: for sharded checkpoints, tensor name -> shard file from the index; None = all tensors.
        index_metadata: the index file's ``metadata`` object.
        read_mode: "mmap", "pread" or "safe_open" (see READ_MODE_ENV); None: that variable, else "mmap".
    """

    format = "safetensors"

    def __init__(
        self,
        path: pathlib.Path,
        files: list[pathlib.Path],
        *,
        wanted: dict[str, pathlib.Path] | None = None,
        index_metadata: dict[str, Any] | None = None,
        read_mode: str | None = None,
    ):
        super().__init__(path)
        self._read_mode = read_mode or os.environ.get(READ_MODE_ENV) or "mmap"
        if self._read_mode not in READ_MODES:
            raise CheckpointError(f"unknown safetensors read mode {self._read_mode!r}",
                                  hint=f"use one of {', '.join(READ_MODES)} (in ${READ_MODE_ENV})")
        self._ranges = RangeReader()
        self._files = files
        self._entries: dict[str, _Entry] = {}
        self._metadata: dict[str, Any] = dict(index_metadata or {})
        self._handles: dict[pathlib.Path, Any] = {}
        for file in files:
            entries, meta = scan_file(file)
            self._metadata.update(meta)
            for entry in entries:
                name = entry.info.name
                if wanted is not None and wanted.get(name) != file:
                    continue
                if name in self._entries:
                    raise CheckpointError(
                        f"tensor {name!r} is stored twice: in {self._entries[name].path.name} "
                        f"and {file.name}",
                        hint="pass the intended file, or remove the duplicate",
                    )
                self._entries[name] = entry
        if wanted is not None:
            missing = sorted(set(wanted) - set(self._entries))
            if missing:
                raise CheckpointError(
                    f"{len(missing)} tensor(s) listed in the index of {path} are not in their shard, "
                    f"e.g. {missing[0]!r} (expected in {wanted[missing[0]].name})",
                    hint="re-download the shards; the index and shards are from different versions",
                )
        self._keys = list(self._entries)

    def keys(self) -> list[str]:
        return list(self._keys)

    def _info(self, name: str) -> TensorInfo | None:
        entry = self._entries.get(name)
        return None if entry is None else entry.info

    def _read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        file, info = entry.path, entry.info
        if info.dtype not in TORCH_DTYPES:  # safetensors may read it, but info() could not describe it
            raise CheckpointError(
                f"tensor {name!r} in {file} has dtype {info.dtype!r}, which modelkin does not read",
                hint=f"convert it to one of {', '.join(TORCH_DTYPES)}",
            )
        try:
            handle = self._mapped(file)
            if handle is not None:
                return handle.get_tensor(name)
            read = self._ranges.read if self._read_mode == "pread" else self._ranges.map
            raw = read(file, entry.offset, info.nbytes)
            return raw.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
        except Exception as err:  # noqa: BLE001 - boundary
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {err}") from None

    def _read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor | None:
        entry = self._entries[name]
        file, info = entry.path, entry.info
        if info.dtype not in TORCH_DTYPES:
            return None
        try:
            handle = self._mapped(file)
            if handle is not None:
                index = (slice(None),) * dim + (slice(start, stop),)
                return handle.get_slice(name)[index]
            dtype = TORCH_DTYPES[info.dtype]
            inner = math.prod(info.shape[dim + 1:]) * torch.empty((), dtype=dtype).element_size()
            outer = math.prod(info.shape[:dim])
            shape = (*info.shape[:dim], stop - start, *info.shape[dim + 1:])
            offset, block = entry.offset + start * inner, (stop - start) * inner
            if outer == 1 and self._read_mode == "mmap":  # one byte range: map only its pages
                raw = self._ranges.map(file, offset, block)
            else:
                raw = self._ranges.read_blocks(file, offset, outer, block, info.shape[dim] * inner)
            return raw.view(dtype).reshape(shape)
        except Exception as err:  # noqa: BLE001 - boundary
            raise CheckpointError(f"cannot read a slice of tensor {name!r} from {file}: {err}") from None

    def is_mapped(self, name: str) -> bool:
        entry = self._entries.get(name)
        mapped = self._read_mode in ("mmap", "safe_open")
        return entry is not None and entry.info.dtype in TORCH_DTYPES and mapped

    def _read_rows(self, name: str, unique: torch.Tensor) -> torch.Tensor | None:
        entry = self._entries[name]
        file, info = entry.path, entry.info
        if info.dtype not in TORCH_DTYPES or not info.shape:
            return None
        row_bytes = info.nbytes // info.shape[0]
        try:
            raw = self._ranges.read_runs(file, row_runs(unique, entry.offset, row_bytes))
            return raw.view(TORCH_DTYPES[info.dtype]).reshape(int(unique.numel()), *info.shape[1:])
        except Exception as err:  # noqa: BLE001 - boundary
            raise CheckpointError(f"cannot read rows of tensor {name!r} from {file}: {err}") from None

    def _mapped(self, file: pathlib.Path) -> Any:
        """safe_open's handle in "safe_open" mode (None for a file it cannot map, or in other modes)."""
        if self._read_mode != "safe_open":
            return None
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception:  # noqa: BLE001 - e.g. a private map larger than RAM + swap: map by ranges
                self._handles[file] = None
        return self._handles[file]

    def config(self) -> dict[str, Any]:
        return load_hf_config(self.path)

    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def files(self) -> list[pathlib.Path]:
        return list(self._files)

    def _release(self) -> None:
        self._handles.clear()
        self._ranges.close()
