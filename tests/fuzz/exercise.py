"""Drive a checkpoint through the whole TensorSource surface and check every result is well-formed.

``exercise_checkpoint`` is the action fuzz cases run inside ``harness.run_case``: open, keys, info,
get_tensor of every tensor, config, metadata, close; optionally an inspect scan. Each call may raise a
ModelkinError (checked to be one line); anything it returns must be self-consistent, and when the
expected tensors are known they must match bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from modelkin.checkpoint import TensorInfo, open_checkpoint
from modelkin.errors import CheckpointError, ModelkinError
from tests.fuzz.harness import Violation, check_error


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ModelkinError as err:
        check_error(err)
        return err


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _check_info(name: str, info: Any) -> None:
    if not isinstance(info, TensorInfo) or info.name != name:
        raise Violation(f"info({name!r}) returned {info!r}")
    if not isinstance(info.shape, tuple) or not all(type(d) is int and d >= 0 for d in info.shape):
        raise Violation(f"info({name!r}).shape is malformed: {info.shape!r}")
    if type(info.nbytes) is not int or info.nbytes < 0 or not isinstance(info.dtype, str):
        raise Violation(f"info({name!r}) has nbytes {info.nbytes!r}, dtype {info.dtype!r}")


def _check_tensor(name: str, info: TensorInfo, tensor: Any, expect: dict | None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise Violation(f"get_tensor({name!r}) returned a {type(tensor).__name__}")
    if tuple(tensor.shape) != info.shape or tensor.dtype != info.torch_dtype:
        raise Violation(
            f"get_tensor({name!r}) is {tensor.dtype}{list(tensor.shape)}, info says "
            f"{info.torch_dtype}{list(info.shape)}"
        )
    if expect is not None and name in expect and not same_bits(tensor, expect[name]):
        raise Violation(f"get_tensor({name!r}) differs from the tensor written")


def exercise_checkpoint(
    path: str | os.PathLike,
    *,
    expect: dict[str, torch.Tensor] | None = None,
    scan: bool = False,
    read_limit: int = 16,
) -> dict[str, Any]:
    """Use every TensorSource call on ``path``; return what happened (for assertions on valid input).

    Args:
        expect: the exact tensors (canonical names) a valid file holds; then opening must succeed
            and keys/values must match.
        scan: also run modelkin.inspect's scan (cache off) over the source.
        read_limit: read at most this many tensors (all infos are still checked).
    """
    src = open_checkpoint(path)
    with src:
        keys = src.keys()
        if not isinstance(keys, list) or len(set(keys)) != len(keys) or not all(isinstance(k, str) for k in keys):
            raise Violation(f"keys() is not a list of unique names: {keys!r}"[:300])
        if expect is not None and sorted(keys) != sorted(expect):
            raise Violation(f"keys {sorted(keys)} != written {sorted(expect)}")
        read = {}
        for name in keys:
            info = src.info(name)
            _check_info(name, info)
            if name not in src:
                raise Violation(f"{name!r} in keys() but not in the source")
        for name in keys[:read_limit]:
            tensor = _call(src.get_tensor, name)
            if isinstance(tensor, ModelkinError):
                if expect is not None:
                    raise Violation(f"valid tensor {name!r} unreadable: {tensor}")
                continue
            _check_tensor(name, src.info(name), tensor, expect)
            read[name] = tensor
        unknown = _call(src.info, "no.such.tensor")
        if not isinstance(unknown, CheckpointError):
            raise Violation(f"info of an unknown name gave {unknown!r}")
        config = _call(src.config)
        if not isinstance(config, (dict, ModelkinError)):
            raise Violation(f"config() returned a {type(config).__name__}")
        metadata = _call(src.metadata)
        if not isinstance(metadata, (dict, ModelkinError)):
            raise Violation(f"metadata() returned a {type(metadata).__name__}")
        files = src.files()
        repr(src)
        result = None
        if scan:
            result = _call(_scan, src)
            if not isinstance(result, ModelkinError) and len(result.tensors) != len(keys):
                raise Violation(f"scan reported {len(result.tensors)} tensors of {len(keys)}")
    if keys:
        closed = _call(src.get_tensor, keys[0])
        if not isinstance(closed, CheckpointError):
            raise Violation("get_tensor after close did not raise CheckpointError")
    return {"keys": keys, "read": read, "config": config, "metadata": metadata, "files": files,
            "scan": result}


def _scan(src: Any) -> Any:
    from modelkin.inspect.scan import ScanOptions, scan

    return scan(src, torch.device("cpu"), ScanOptions(cache=False, progress=False))


SAMPLE_TEXT = "Hello world! <s> </s> <|im_end|> 123 \u00e9\u4e2d\u6587 \U0001f600\n\t  end"


def exercise_tokenizer(path: str | os.PathLike, source: Any = None) -> dict[str, Any]:
    """Load the tokenizer of a checkpoint path and use encode/decode/chat; check results are well-formed."""
    from modelkin.tokenizer import load_tokenizer

    tok = load_tokenizer(source, path)
    if tok is None:
        return {"tokenizer": None}
    ids = tok.encode(SAMPLE_TEXT)
    if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < tok.vocab_size for i in ids):
        raise Violation(f"encode returned ids outside [0, {tok.vocab_size}): {ids[:20]!r}")
    text = _call(tok.decode, ids)
    if not isinstance(text, (str, ModelkinError)):
        raise Violation(f"decode returned a {type(text).__name__}")
    for i in sorted(tok.eos_token_ids | {tok.bos_token_id or 0}):
        if not 0 <= i < tok.vocab_size:
            raise Violation(f"special id {i} outside the vocabulary of {tok.vocab_size}")
    chat = None
    if tok.has_chat_template:
        chat = _call(tok.apply_chat_template, [{"role": "user", "content": "hi"}])
        if not isinstance(chat, (str, ModelkinError)):
            raise Violation(f"apply_chat_template returned a {type(chat).__name__}")
    return {"tokenizer": tok, "ids": ids, "text": text, "chat": chat}
