"""Reading HF JSON side files: config.json (+ generation_config.json) and shard index files."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from modelkin.errors import CheckpointError, ConfigError


def read_json(path: pathlib.Path, *, what: str) -> Any:
    """Parse one JSON file; a missing, unreadable or invalid file raises a one-line error.

    Raises:
        CheckpointError: the file is missing or unreadable.
        ConfigError: the file is not valid JSON.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {what} {path}: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})",
            hint="repair or re-download the file",
        ) from None


def load_hf_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``config.json`` of a HF model directory.

    ``generation_config.json``, when present, is merged in under the key ``_generation_config``.

    Args:
        directory: the model directory (a file path is taken to mean its parent directory).

    Returns:
        The config dict.

    Raises:
        CheckpointError: config.json is missing.
        ConfigError: config.json or generation_config.json is not a JSON object.
    """
    root = pathlib.Path(directory)
    if root.is_file():
        root = root.parent
    path = root / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"no config.json in {root}",
            hint="copy the model's config.json next to its weights (tensors alone can be inspected)",
        )
    config = read_json(path, what="config.json")
    if not isinstance(config, dict):
        raise ConfigError(f"config.json {path} holds a {type(config).__name__}, not a JSON object")
    gen_path = root / "generation_config.json"
    if gen_path.is_file():
        gen = read_json(gen_path, what="generation_config.json")
        if not isinstance(gen, dict):
            raise ConfigError(f"generation_config.json {gen_path} is not a JSON object")
        config["_generation_config"] = gen
    return config


def read_shard_index(index_path: pathlib.Path) -> tuple[dict[str, pathlib.Path], dict[str, Any]]:
    """Parse a ``*.index.json`` shard index into (tensor name -> shard path, index metadata).

    Raises:
        CheckpointError: malformed index, or a shard it names does not exist.
    """
    index = read_json(index_path, what="shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"shard index {index_path} has no 'weight_map' object",
            hint="the index must map every tensor name to a shard file name",
        )
    shards: dict[str, pathlib.Path] = {}
    result: dict[str, pathlib.Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or pathlib.PurePath(shard).name != shard:
            raise CheckpointError(f"shard index {index_path} maps {name!r} to a bad file name {shard!r}")
        if shard not in shards:
            shard_path = index_path.parent / shard
            if not shard_path.is_file():
                raise CheckpointError(
                    f"shard {shard} named in {index_path.name} is missing from {index_path.parent}",
                    hint="download all shard files listed in the index",
                )
            shards[shard] = shard_path
        result[name] = shards[shard]
    metadata = index.get("metadata") or {}
    return result, metadata if isinstance(metadata, dict) else {}
