"""modelkin: run, inspect and compare large language models on Ascend NPUs, NVIDIA GPUs or CPUs.

Public API (lazy: importing modelkin does not import torch):
    modelkin.load(path, device="auto", dtype="auto")
    modelkin.inspect_checkpoint(path, device=..., select=...)
    modelkin.fingerprint(a, b, methods=...)
    modelkin.compare(a, b, prompts=..., device=...)
    modelkin.get_backend(spec)
"""

from __future__ import annotations

from modelkin import _moved, _torch_env
from modelkin.errors import ModelkinError

# Must run before anything imports torch: a torch-npu without CANN would otherwise break `import torch`.
_torch_env.prepare()
_moved.install()

__version__ = "0.1.0"
__all__ = [
    "ModelkinError",
    "__version__",
    "compare",
    "fingerprint",
    "get_backend",
    "inspect_checkpoint",
    "load",
]

_LAZY = {
    "get_backend": ("modelkin.backends", "get_backend"),
    "load": ("modelkin.runtime.api", "load"),
    "inspect_checkpoint": ("modelkin.inspect.scan", "inspect_checkpoint"),
    "fingerprint": ("modelkin.compare.api", "fingerprint"),
    # the callable package itself (see its docstring), so `modelkin.compare` is one object whether a call or
    # an `import modelkin.compare.<module>` comes first
    "compare": ("modelkin.compare", None),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelkin' has no attribute {name!r}")
