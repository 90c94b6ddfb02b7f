"""PyTorch ``pytorch_model*.bin`` / ``*.pt`` state dicts, loaded only with the weights-only unpickler."""

from __future__ import annotations

import pathlib
import pickle
from typing import Any

import torch

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


def load_state_dict(file: pathlib.Path) -> dict[str, torch.Tensor]:
    """Load a plain ``{name: tensor}`` state dict with ``weights_only=True``, memory-mapped when possible.

    No code from the file ever runs: the weights-only unpickler refuses every global that is not
    a tensor-rebuild function.

    Raises:
        CheckpointError: unreadable file, refused pickle, or anything but a name -> tensor dict.
    """
    try:
        with file.open("rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # mmap needs torch.save's zip format
        obj = torch.load(file, weights_only=True, mmap=is_zip, map_location="cpu")
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
        self._tensors: dict[str, torch.Tensor] = {}
        self._infos: dict[str, TensorInfo] = {}
        for file in files:
            for name, tensor in load_state_dict(file).items():
                if wanted is not None and wanted.get(name) != file:
                    continue
                if name in self._tensors:
                    raise CheckpointError(f"tensor {name!r} is stored twice in {path}")
                self._tensors[name] = tensor
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
        # a private copy, as from the other formats: the cached tensor maps the file
        return self._tensors[name].clone(memory_format=torch.contiguous_format)

    def config(self) -> dict[str, Any]:
        return load_hf_config(self.path)

    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def files(self) -> list[pathlib.Path]:
        return list(self._files)

    def _release(self) -> None:
        self._tensors = {}
