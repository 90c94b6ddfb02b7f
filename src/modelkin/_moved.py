"""Old module paths that moved in the 0.2 layout keep importing, with a DeprecationWarning, for one release.

`import modelkin` installs one finder at the end of `sys.meta_path`: a real module always wins, and only
a name listed here that no longer exists resolves to the module object at its new path (the same object,
so monkeypatching either name patches both).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old dotted path -> new dotted path; one block per package, each kept by whoever moves that package.

# tokenizer/ (from runtime/)
_TOKENIZER: dict[str, str] = {
    "modelkin.runtime.tokenizer": "modelkin.tokenizer",
    "modelkin.runtime.tokenizer_base": "modelkin.tokenizer.base",
    "modelkin.runtime.tokenizer_fast": "modelkin.tokenizer.fast",
    "modelkin.runtime.tokenizer_files": "modelkin.tokenizer.files",
    "modelkin.runtime.tokenizer_sp": "modelkin.tokenizer.sp",
    "modelkin.runtime.tokenizer_tiny": "modelkin.tokenizer.tiny",
    "modelkin.runtime.gguf_vocab": "modelkin.tokenizer.gguf_vocab",
    "modelkin.runtime.chat": "modelkin.tokenizer.chat",
    "modelkin.runtime.chat_limits": "modelkin.tokenizer.chat_limits",
}


# synth/ (checkpoint writers, from runtime/ and compare/)
_SYNTH: dict[str, str] = {
    "modelkin.compare.upcycle_build": "modelkin.synth.upcycle",
    "modelkin.compare.variants": "modelkin.synth.variants",
    "modelkin.runtime.tiny": "modelkin.synth.tiny",
    "modelkin.runtime.tiny_moe": "modelkin.synth.tiny",
}


# runtime/ (moe/, parallel/, cpu_kernels)
_RUNTIME: dict[str, str] = {
    "modelkin.runtime.moe_cpu": "modelkin.runtime.moe.cpu",
    "modelkin.runtime.moe_weights": "modelkin.runtime.moe.weights",
    "modelkin.runtime.moe_telemetry": "modelkin.runtime.moe.telemetry",
    "modelkin.runtime.npu_ops": "modelkin.runtime.moe.npu_ops",
    "modelkin.runtime.parallel_layers": "modelkin.runtime.parallel.layers",
    "modelkin.runtime.parallel_load": "modelkin.runtime.parallel.shard",
    "modelkin.runtime.memory_plan": "modelkin.runtime.parallel.memory_plan",
}


# compare/ (stats, behaviour/, report/)
_COMPARE: dict[str, str] = {
    "modelkin.compare.pipeline": "modelkin.compare.api",
    "modelkin.compare.significance": "modelkin.compare.stats",
    "modelkin.compare.stattests": "modelkin.compare.stats",
    "modelkin.compare.prompts": "modelkin.compare.behaviour.prompts",
    "modelkin.compare.outputs": "modelkin.compare.behaviour.outputs",
    "modelkin.compare.routing": "modelkin.compare.behaviour.routing",
    "modelkin.compare.html": "modelkin.compare.report.html",
    "modelkin.compare.plots": "modelkin.compare.report.plots",
    "modelkin.compare.fingerprints.plot": "modelkin.compare.report.plots",
    # modelkin.compare.behaviour and modelkin.compare.report are packages now, re-exporting the old names
}


# checkpoint/
_CHECKPOINT: dict[str, str] = {}


MOVED: dict[str, str] = {**_TOKENIZER, **_SYNTH, **_RUNTIME, **_COMPARE, **_CHECKPOINT}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self._spec = module.__spec__  # the import system stamps the alias spec on it; put the real one back
        return module

    def exec_module(self, module) -> None:  # the module at the new path is already executed
        module.__spec__ = self._spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(
            f"{fullname} moved to {new}; the old path is removed in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
