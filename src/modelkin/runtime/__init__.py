"""Inference: load a checkpoint into an architecture's module and run, generate or score with it.

Public names (imported lazily so that submodules such as ``runtime.sampling`` stay light):
``load``, ``Model``, ``GenerationResult``, ``ScoreResult`` (api). ``make_tiny`` moved to
``modelkin.synth.tiny``; the old name warns for one release.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["GenerationResult", "Model", "ScoreResult", "load", "make_tiny"]

_LAZY = {
    "load": "modelkin.runtime.api",
    "Model": "modelkin.runtime.api",
    "GenerationResult": "modelkin.runtime.api",
    "ScoreResult": "modelkin.runtime.api",
}


def __getattr__(name: str) -> Any:
    if name == "make_tiny":  # a checkpoint writer: lives above runtime, in synth/
        warnings.warn(
            "modelkin.runtime.make_tiny moved to modelkin.synth.tiny.make_tiny; the old name is removed "
            "in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("modelkin.synth.tiny"), name)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelkin.runtime' has no attribute {name!r}")
