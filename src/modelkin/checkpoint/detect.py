"""open_checkpoint: tell the format of a file or model directory from its structure and magic bytes."""

from __future__ import annotations

import os
import pathlib
import struct
import zipfile

from modelkin.checkpoint.hf_config import read_shard_index
from modelkin.checkpoint.source import TensorSource
from modelkin.errors import CheckpointError

_TORCH_LEGACY_FIRST_BYTE = b"\x80"  # pickle protocol opcode that starts torch's legacy format
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def sniff_file(path: pathlib.Path) -> str | None:
    """The checkpoint format of one file ('safetensors' | 'gguf' | 'torch' | 'onnx'), or None."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if len(head) >= 1 and path.suffix == ".safetensors":
        return "safetensors"  # damaged header: let the reader explain what is wrong
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                return "torch" if any(n.endswith("data.pkl") for n in z.namelist()) else None
        except (zipfile.BadZipFile, UnicodeDecodeError, OSError, ValueError, NotImplementedError):
            # a damaged zip: torch's reader explains it for files named like a checkpoint
            return "torch" if path.suffix in _TORCH_SUFFIXES else None
    if head[:1] == _TORCH_LEGACY_FIRST_BYTE and path.suffix in _TORCH_SUFFIXES:
        return "torch"
    if path.suffix == ".onnx":  # protobuf has no magic; the reader validates the content
        return "onnx"
    return None


def _open_file(path: pathlib.Path, origin: pathlib.Path) -> TensorSource:
    kind = sniff_file(path)
    if kind == "safetensors":
        from modelkin.checkpoint.safetensors_reader import SafetensorsSource

        return SafetensorsSource(origin, [path])
    if kind == "gguf":
        from modelkin.checkpoint.gguf_reader import GGUFSource

        return GGUFSource(path)
    if kind == "torch":
        from modelkin.checkpoint.torch_reader import TorchSource

        return TorchSource(origin, [path])
    if kind == "onnx":
        from modelkin.checkpoint.onnx_reader import OnnxSource

        return OnnxSource(path)
    raise CheckpointError(
        f"{path} is not a checkpoint modelkin can read (not safetensors, GGUF, a PyTorch state dict or ONNX)",
        hint="pass a model directory or a .safetensors, .gguf, .bin/.pt or .onnx file",
    )


def _open_sharded(directory: pathlib.Path, index: pathlib.Path, kind: str) -> TensorSource:
    wanted, meta = read_shard_index(index)
    files = sorted(set(wanted.values()))
    if kind == "safetensors":
        from modelkin.checkpoint.safetensors_reader import SafetensorsSource

        return SafetensorsSource(directory, files, wanted=wanted, index_metadata=meta)
    from modelkin.checkpoint.torch_reader import TorchSource

    return TorchSource(directory, files, wanted=wanted, index_metadata=meta)


def _one(directory: pathlib.Path, pattern: str) -> pathlib.Path | None:
    found = sorted(p for p in directory.glob(pattern) if p.is_file())
    if len(found) > 1:
        raise CheckpointError(
            f"{directory} holds {len(found)} files matching {pattern}: "
            f"{', '.join(p.name for p in found[:4])}",
            hint="pass the file you mean instead of the directory",
        )
    return found[0] if found else None


def _open_directory(directory: pathlib.Path) -> TensorSource:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return _open_file(directory / name, directory)
    for pattern, kind in (("*.safetensors.index.json", "safetensors"), ("*.bin.index.json", "torch")):
        index = _one(directory, pattern)
        if index is not None:
            return _open_sharded(directory, index, kind)
    shards = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if shards:
        from modelkin.checkpoint.safetensors_reader import SafetensorsSource

        return SafetensorsSource(directory, shards)
    for pattern in ("model.onnx", "*.onnx", "*.gguf"):
        found = _one(directory, pattern)
        if found is not None:
            return _open_file(found, directory)
    raise CheckpointError(
        f"{directory} holds no model weights (looked for *.safetensors [+ index], "
        "pytorch_model*.bin [+ index], *.onnx, *.gguf)",
        hint="pass the directory that holds the weight files",
    )


def open_checkpoint(path: str | os.PathLike[str]) -> TensorSource:
    """Open a checkpoint lazily; only headers are read.

    Args:
        path: a HF model directory (config.json + model.safetensors, a safetensors index with
            shards, or pytorch_model*.bin [+ index]), a directory with model.onnx or one .gguf,
            or a single .safetensors, .gguf, .bin/.pt or .onnx file.

    Returns:
        A TensorSource with canonical HF tensor names. A directory without config.json opens
        (its tensors can be inspected) but ``config()`` raises CheckpointError.

    Raises:
        CheckpointError: the path does not exist, or holds no readable checkpoint.

    Example:
        >>> with open_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf") as ckpt:
        ...     ckpt.info("model.embed_tokens.weight").shape
        (49152, 576)
    """
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path does not exist: {p}", hint="check the path")
    if p.is_dir():
        return _open_directory(p)
    return _open_file(p, p)
