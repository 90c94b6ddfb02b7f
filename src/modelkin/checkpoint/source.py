"""The format-neutral checkpoint surface: TensorInfo (shape/dtype without data) and TensorSource."""

from __future__ import annotations

import math
import pathlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from modelkin.errors import CheckpointError

if TYPE_CHECKING:
    from typing_extensions import Self

# Stored dtype string -> the torch dtype get_tensor returns. Quantised GGUF types are not listed:
# they dequantise to float32 (see TensorInfo.torch_dtype).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
if hasattr(torch, "float8_e8m0fnu"):  # MX scale type (torch >= 2.7)
    TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The stored-dtype string ('F32', 'BF16', …) for a torch dtype."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        return str(dtype).removeprefix("torch.").upper()


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What is known about one stored tensor without reading its data.

    Attributes:
        name: canonical HF name.
        shape: torch-order shape of the tensor get_tensor returns.
        dtype: stored dtype ('F32', 'F16', 'BF16', 'I64', … or a GGUF quant type such as 'Q4_1').
        nbytes: bytes the tensor occupies on disk.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype get_tensor returns: the stored one, or float32 for quantised GGUF types."""
        return TORCH_DTYPES.get(self.dtype, torch.float32)


class TensorSource(ABC):
    """One checkpoint, read lazily, with canonical HF tensor names.

    Subclasses parse headers on construction and read tensor data only in ``get_tensor``;
    every read adds its on-disk size to ``bytes_read`` and one to ``tensors_read``.

    Example:
        >>> with open_checkpoint("model_dir") as ckpt:
        ...     w = ckpt.get_tensor("model.layers.0.self_attn.q_proj.weight")
    """

    format: str = ""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.bytes_read = 0
        self.tensors_read = 0
        self.closed = False
        # exposed name -> original format name, for tensors no canonical mapping was known for
        self.unmapped: dict[str, str] = {}

    @abstractmethod
    def keys(self) -> list[str]:
        """Canonical tensor names in file order."""

    @abstractmethod
    def _info(self, name: str) -> TensorInfo | None:
        """TensorInfo for a known name, None for an unknown one."""

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (name is known to exist)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The HF config.json dict of this checkpoint."""

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """Format metadata (safetensors __metadata__, GGUF key/values, ONNX opset/producer)."""

    @abstractmethod
    def files(self) -> list[pathlib.Path]:
        """The data files this checkpoint consists of."""

    def info(self, name: str) -> TensorInfo:
        """Shape, stored dtype and on-disk size of one tensor; reads no tensor data.

        Raises:
            CheckpointError: the checkpoint has no tensor of that name.
        """
        found = self._info(name)
        if found is None:
            raise CheckpointError(
                f"no tensor named {name!r} in {self.path}",
                hint="list the names with keys() or `modelkin inspect`",
            )
        return found

    def get_tensor(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Read one tensor (GGUF quant types dequantised to float32) and move it to ``device``.

        Raises:
            CheckpointError: unknown name, or the stored data cannot be read.
        """
        meta = self.info(name)
        if self.closed:
            raise CheckpointError(f"cannot read {name!r}: {self.path} was closed")
        tensor = self._read(name)
        self.bytes_read += meta.nbytes
        self.tensors_read += 1
        return tensor if device is None else tensor.to(device)

    def get_slice(
        self, name: str, dim: int, start: int, stop: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor along ``dim`` (what a tensor-parallel rank needs).

        Formats that can read a byte range (safetensors) read only the slice and add only its bytes
        to ``bytes_read``; the others read the whole tensor, then narrow it (and count it whole).

        Raises:
            CheckpointError: unknown name, a bad range, or the stored data cannot be read.
        """
        meta = self.info(name)
        ndim = len(meta.shape)
        if not -ndim <= dim < ndim or not 0 <= start <= stop <= meta.shape[dim]:
            raise CheckpointError(
                f"cannot slice {name!r} {list(meta.shape)} at dim {dim} [{start}:{stop}]",
                hint="the slice must lie inside the tensor",
            )
        if self.closed:
            raise CheckpointError(f"cannot read {name!r}: {self.path} was closed")
        dim %= ndim
        self.tensors_read += 1
        part = self._read_slice(name, dim, start, stop)
        if part is None:
            part = self._read(name).narrow(dim, start, stop - start).clone()  # free the rest
            self.bytes_read += meta.nbytes
        else:
            self.bytes_read += part.numel() * part.element_size()
        return part if device is None else part.to(device)

    def _read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor | None:
        """Read only a slice (subclass hook); None: the format cannot, read whole and narrow."""
        return None

    def is_mapped(self, name: str) -> bool:
        """Whether ``get_tensor(name)`` returns a view of the file's mapped pages (page cache, reclaimable)
        rather than memory of its own (dequantised, converted or copied data)."""
        return False

    def get_rows(self, name: str, ids: Any, device: torch.device | str | None = None) -> torch.Tensor:
        """Rows ``ids`` (dim 0, in the order given, repeats allowed) of one tensor, e.g. token embeddings.

        Formats that can read byte ranges (safetensors, GGUF) read only the distinct rows asked for and add
        only their bytes to ``bytes_read``; the others read the whole tensor, then index it.

        Raises:
            CheckpointError: unknown name, a row out of range, or the stored data cannot be read.
        """
        meta = self.info(name)
        index = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        rows = meta.shape[0] if meta.shape else 0
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows):
            raise CheckpointError(
                f"cannot read rows of {name!r} {list(meta.shape)}: ids outside 0..{rows - 1}",
                hint="the rows must lie inside the tensor",
            )
        if self.closed:
            raise CheckpointError(f"cannot read {name!r}: {self.path} was closed")
        unique = torch.unique(index)  # sorted
        part = self._read_rows(name, unique) if unique.numel() else None
        if part is None:
            out = self._read(name)[index]
            self.bytes_read += meta.nbytes
        else:
            out = part[torch.searchsorted(unique, index)]
            self.bytes_read += meta.nbytes // rows * int(unique.numel())
        return out if device is None else out.to(device)

    def _read_rows(self, name: str, unique: torch.Tensor) -> torch.Tensor | None:
        """Read only rows ``unique`` (sorted, distinct), in that order (subclass hook); None: read whole."""
        return None

    def close(self) -> None:
        """Release open files and memory maps; names and infos stay available, data does not."""
        self.closed = True
        self._release()

    def _release(self) -> None:
        """Drop file handles and memory maps (subclass hook)."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._info(name) is not None

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self.keys())} tensors)"
