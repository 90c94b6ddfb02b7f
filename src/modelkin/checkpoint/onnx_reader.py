"""ONNX models: graph initialisers as tensors, external-data files read lazily by offset and length
(a private map of each initialiser's own bytes, never of the whole data file)."""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelkin.checkpoint.byte_range import RangeReader
from modelkin.checkpoint.hf_config import load_hf_config
from modelkin.checkpoint.source import TORCH_DTYPES, TensorInfo, TensorSource
from modelkin.errors import CheckpointError

# onnx.TensorProto.DataType value -> stored dtype string
ONNX_DTYPES: dict[int, str] = {
    1: "F32",
    2: "U8",
    3: "I8",
    4: "U16",
    5: "I16",
    6: "I32",
    7: "I64",
    9: "BOOL",
    10: "F16",
    11: "F64",
    12: "U32",
    13: "U64",
    14: "C64",
    16: "BF16",
    17: "F8_E4M3",
    19: "F8_E5M2",
}


@dataclass(frozen=True, slots=True)
class _Entry:
    proto: Any  # onnx.TensorProto
    external: tuple[pathlib.Path, int] | None  # (data file, byte offset)
    info: TensorInfo


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()


def _external_location(model_path: pathlib.Path, proto: Any) -> tuple[pathlib.Path, int, int | None]:
    fields = {item.key: item.value for item in proto.external_data}
    location = fields.get("location", "")
    rel = pathlib.PurePath(location)
    if not location or rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(
            f"{model_path}: initialiser {proto.name!r} points to external data {location!r} "
            "outside the model directory",
            hint="keep external data files next to the .onnx file",
        )
    length = fields.get("length")
    offset = _byte_count(model_path, proto, "offset", fields.get("offset") or "0")
    return model_path.parent / rel, offset, _byte_count(model_path, proto, "length", length) if length else None


def _byte_count(model_path: pathlib.Path, proto: Any, key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise CheckpointError(
            f"{model_path}: initialiser {proto.name!r} has external data {key} {text!r}, not a byte count",
            hint="re-export the model",
        )
    return value


def _entry(model_path: pathlib.Path, proto: Any) -> _Entry:
    dtype = ONNX_DTYPES.get(proto.data_type, f"ONNX_TYPE_{proto.data_type}")
    shape = tuple(int(d) for d in proto.dims)
    if any(d < 0 for d in shape):
        raise CheckpointError(f"{model_path}: initialiser {proto.name!r} has negative dims {list(shape)}",
                              hint="re-export the model")
    full = math.prod(shape) * _itemsize(dtype) if dtype in TORCH_DTYPES else 0
    if proto.data_location != 1:  # 1 = EXTERNAL
        nbytes = len(proto.raw_data) if proto.HasField("raw_data") else full
        if proto.HasField("raw_data") and dtype in TORCH_DTYPES and nbytes != full:
            raise CheckpointError(
                f"{model_path}: initialiser {proto.name!r} ({dtype}{list(shape)}) holds {nbytes} "
                f"bytes, needs {full}",
                hint="re-export the model",
            )
        return _Entry(proto, None, TensorInfo(proto.name, shape, dtype, nbytes))
    file, offset, length = _external_location(model_path, proto)
    nbytes = full if length is None else length
    if dtype in TORCH_DTYPES and nbytes != full:
        raise CheckpointError(
            f"{model_path}: initialiser {proto.name!r} ({dtype}{list(shape)}) has external data of "
            f"{nbytes} bytes, needs {full}",
            hint="re-export the model",
        )
    if not file.is_file():
        raise CheckpointError(
            f"external data file {file.name} of initialiser {proto.name!r} is missing from {file.parent}",
            hint="copy the .onnx file together with its external data files",
        )
    if offset + nbytes > file.stat().st_size:
        raise CheckpointError(
            f"external data file {file} is truncated: initialiser {proto.name!r} needs bytes "
            f"{offset}..{offset + nbytes}, the file has {file.stat().st_size}",
            hint="re-export or re-copy the model",
        )
    return _Entry(proto, (file, offset), TensorInfo(proto.name, shape, dtype, nbytes))


class OnnxSource(TensorSource):
    """The initialisers of an ONNX model, named as in the graph."""

    format = "onnx"

    def __init__(self, path: pathlib.Path):
        super().__init__(path)
        import onnx

        try:
            self._model = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # noqa: BLE001 - boundary
            raise CheckpointError(
                f"{path} is not a readable ONNX model ({type(err).__name__}: {err})",
                hint="re-export or re-download the model",
            ) from None
        if not self._model.HasField("graph"):
            raise CheckpointError(
                f"{path} is not a readable ONNX model (it has no graph)",
                hint="re-export or re-download the model",
            )
        self._entries: dict[str, _Entry] = {}
        self._ranges = RangeReader()
        for proto in self._model.graph.initializer:
            if proto.name in self._entries:
                raise CheckpointError(f"{path}: initialiser {proto.name!r} appears twice")
            self._entries[proto.name] = _entry(path, proto)
        self._files = [path] + sorted({e.external[0] for e in self._entries.values() if e.external})

    def keys(self) -> list[str]:
        return list(self._entries)

    def _info(self, name: str) -> TensorInfo | None:
        entry = self._entries.get(name)
        return None if entry is None else entry.info

    def _read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        info = entry.info
        if info.dtype not in TORCH_DTYPES:
            raise CheckpointError(
                f"{self.path}: initialiser {name!r} has ONNX type {info.dtype}, not readable as a tensor"
            )
        dtype = TORCH_DTYPES[info.dtype]
        if entry.external is not None:
            file, offset = entry.external
            try:
                raw = self._ranges.map(file, offset, info.nbytes)
            except OSError as err:
                raise CheckpointError(f"cannot read external data {file}: {err}") from None
            return raw.view(dtype).reshape(info.shape)
        if entry.proto.HasField("raw_data"):
            return _from_bytes(bytearray(entry.proto.raw_data), dtype, info.shape)
        return _from_typed_fields(entry.proto, dtype, info.shape)

    def config(self) -> dict[str, Any]:
        if not (self.path.parent / "config.json").is_file():
            return {}
        return load_hf_config(self.path.parent)

    def metadata(self) -> dict[str, Any]:
        m = self._model
        return {
            "ir_version": int(m.ir_version),
            "producer_name": m.producer_name,
            "producer_version": m.producer_version,
            "model_version": int(m.model_version),
            "opset": {op.domain or "ai.onnx": int(op.version) for op in m.opset_import},
            "doc_string": m.doc_string,
            "metadata_props": {p.key: p.value for p in m.metadata_props},
        }

    def files(self) -> list[pathlib.Path]:
        return list(self._files)

    def _release(self) -> None:
        self._ranges.close()


def _from_bytes(raw: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(shape)


def _from_typed_fields(proto: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    from onnx import numpy_helper

    try:
        array = np.array(numpy_helper.to_array(proto))
        if dtype == torch.bfloat16 or dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            bits = np.uint16 if dtype == torch.bfloat16 else np.uint8
            return torch.from_numpy(array.view(bits).copy()).view(dtype).reshape(shape)
        return torch.from_numpy(array).to(dtype).reshape(shape)
    except Exception as err:  # noqa: BLE001 - boundary (a typed field that disagrees with dims too)
        raise CheckpointError(f"cannot decode initialiser {proto.name!r}: {err}") from None
