"""PyTorch ``pytorch_model*.bin`` / ``*.pt`` state dicts, loaded only with the weights-only unpickler.

Zip-format files (torch.save's default) are unpickled onto the meta device, which locates each
storage record in the file; a tensor's data is then mapped (privately, its own byte range only), never
the whole file (torch.load(mmap=True) maps all of it copy-on-write, refused above RAM + swap).
"""

from __future__ import annotations

import pathlib
import pickle
import sys
import zipfile
from typing import Any

import torch

from modelkin.checkpoint.byte_range import RangeReader
from modelkin.checkpoint.hf_config import load_hf_config
from modelkin.checkpoint.source import TensorInfo, TensorSource, dtype_name
from modelkin.errors import CheckpointError


def _refusal(err: BaseException) -> str:
    """The one informative line of torch's multi-line weights-only error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = next((x for x in lines if "WeightsUnpickler error" in x or "Unsupported" in x), None)
    if line is None:
        line = lines[0] if lines else type(err).__name__
    # drop torch's advice to allowlist the global: that is exactly what must not be done here
    return line.split(" Please use", 1)[0].removeprefix("WeightsUnpickler error: ")


def _located(file: pathlib.Path) -> bool:
    """True for a zip-format file whose records can be read in place (stored in this byte order)."""
    try:
        with zipfile.ZipFile(file) as z:
            orders = [i for i in z.infolist() if i.filename.endswith("/byteorder")]
            return not orders or z.read(orders[0]).decode(errors="replace") == sys.byteorder
    except Exception:  # noqa: BLE001 - zipfile refuses some files torch's own reader copes with;
        return True  # torch.load reports what is wrong, if anything


def load_state_dict(file: pathlib.Path, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """Load a plain ``{name: tensor}`` state dict with ``weights_only=True``.

    No code from the file ever runs: the weights-only unpickler refuses every global that is not
    a tensor-rebuild function.

    Args:
        meta: for a zip-format file, return meta tensors whose storages carry ``_checkpoint_offset``
            (where their bytes lie in the file) instead of reading any data; other files load whole.

    Raises:
        CheckpointError: unreadable file, refused pickle, or anything but a name -> tensor dict.
    """
    try:
        with file.open("rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # mmap needs torch.save's zip format
        if meta and is_zip and _located(file):
            obj = torch.load(file, weights_only=True, map_location="meta")
        else:
            obj = torch.load(file, weights_only=True, mmap=is_zip and not meta, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{file} is not a plain state dict: the weights-only loader refused it ({_refusal(err)})",
            hint="re-save it as a name -> tensor dict, or convert it to safetensors",
        ) from None
    except Exception as err:  # noqa: BLE001 - boundary
        raise CheckpointError(
            f"{file} is not a readable PyTorch checkpoint ({type(err).__name__}: {_refusal(err)})",
            hint="re-download the file; it may be truncated",
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{file} is not a plain state dict: it holds a {type(obj).__name__}",
            hint="save model.state_dict(), not the model or a training checkpoint",
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{file} is not a plain state dict: entry {key!r} is a {type(value).__name__}, not a tensor",
                hint="save model.state_dict() alone (no optimizer, epoch or nested dicts)",
            )
    return obj


class TorchSource(TensorSource):
    """One or more PyTorch state-dict files (shards named by an index) viewed as one checkpoint."""

    format = "torch"

    def __init__(
        self,
        path: pathlib.Path,
        files: list[pathlib.Path],
        *,
        wanted: dict[str, pathlib.Path] | None = None,
        index_metadata: dict[str, Any] | None = None,
    ):
        super().__init__(path)
        self._files = files
        self._metadata = dict(index_metadata or {})
        self._tensors: dict[str, torch.Tensor] = {}  # meta tensors (located in a file) or loaded ones
        self._where: dict[str, pathlib.Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._ranges = RangeReader()
        for file in files:
            state = load_state_dict(file, meta=True)
            _check_records(file, state)
            for name, tensor in state.items():
                if wanted is not None and wanted.get(name) != file:
                    continue
                if name in self._tensors:
                    raise CheckpointError(f"tensor {name!r} is stored twice in {path}")
                self._tensors[name] = tensor
                self._where[name] = file
                self._infos[name] = TensorInfo(
                    name,
                    tuple(tensor.shape),
                    dtype_name(tensor.dtype),
                    tensor.numel() * tensor.element_size(),
                )
        if wanted is not None:
            missing = sorted(set(wanted) - set(self._tensors))
            if missing:
                raise CheckpointError(
                    f"{len(missing)} tensor(s) listed in the index of {path} are not in their shard, "
                    f"e.g. {missing[0]!r} (expected in {wanted[missing[0]].name})",
                    hint="re-download the shards; the index and shards are from different versions",
                )

    def keys(self) -> list[str]:
        return list(self._infos)

    def _info(self, name: str) -> TensorInfo | None:
        return self._infos.get(name)

    def _read(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        if not tensor.is_meta:  # a legacy (non-zip) file, loaded whole: a private copy of it
            return tensor.clone(memory_format=torch.contiguous_format)
        file = self._where[name]
        try:
            return _read_located(self._ranges, file, tensor)
        except OSError as err:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {err}") from None

    def config(self) -> dict[str, Any]:
        return load_hf_config(self.path)

    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def files(self) -> list[pathlib.Path]:
        return list(self._files)

    def _release(self) -> None:
        self._tensors = {}
        self._ranges.close()


def _check_records(file: pathlib.Path, state: dict[str, torch.Tensor]) -> None:
    """Every located storage must lie inside the file: a truncated file fails here, in one line."""
    size = file.stat().st_size
    for name, tensor in state.items():
        if tensor.is_meta:
            storage = tensor.untyped_storage()
            end = storage._checkpoint_offset + storage.nbytes()
            if end > size:
                raise CheckpointError(
                    f"{file} is truncated: tensor {name!r} needs bytes up to {end}, the file has {size}",
                    hint="re-download the file",
                )


def _read_located(ranges: RangeReader, file: pathlib.Path, meta: torch.Tensor) -> torch.Tensor:
    """The data of a meta tensor from load_state_dict(meta=True): only its own bytes are read."""
    itemsize = meta.element_size()
    base = meta.untyped_storage()._checkpoint_offset + meta.storage_offset() * itemsize
    if meta.is_contiguous():
        return ranges.map(file, base, meta.numel() * itemsize).view(meta.dtype).reshape(meta.shape)
    if meta.numel() == 0:
        return torch.empty(meta.shape, dtype=meta.dtype)
    span = 1 + sum((size - 1) * stride for size, stride in zip(meta.shape, meta.stride()))
    raw = ranges.map(file, base, span * itemsize).view(meta.dtype)
    return raw.as_strided(meta.shape, meta.stride()).clone(memory_format=torch.contiguous_format)
