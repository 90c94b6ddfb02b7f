"""Tokenizers: HF tokenizer files, SentencePiece models and GGUF vocabularies behind one ``Tokenizer``, chat
templates in a sandbox, and writing a checkpoint's tokenizer as HF files (one file list, one GGUF writer).

Public names (imported lazily so that submodules stay light): ``Tokenizer``, ``load_tokenizer`` (api),
``write_tiny_tokenizer`` (tiny), ``TOKENIZER_FILES``, ``copy_tokenizer_files``, ``write_gguf_tokenizer``
(write).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "TOKENIZER_FILES",
    "Tokenizer",
    "copy_tokenizer_files",
    "load_tokenizer",
    "write_gguf_tokenizer",
    "write_tiny_tokenizer",
]

_LAZY = {
    "Tokenizer": "modelkin.tokenizer.api",
    "load_tokenizer": "modelkin.tokenizer.api",
    "write_tiny_tokenizer": "modelkin.tokenizer.tiny",
    "TOKENIZER_FILES": "modelkin.tokenizer.write",
    "copy_tokenizer_files": "modelkin.tokenizer.write",
    "write_gguf_tokenizer": "modelkin.tokenizer.write",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelkin.tokenizer' has no attribute {name!r}")
