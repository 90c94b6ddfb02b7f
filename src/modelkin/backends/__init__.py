"""Backends: the only place that knows about cpu / cuda / npu devices and their onnxruntime providers.

    get_backend("auto" | "cpu" | "cuda[:i]" | "npu[:i]", allow_fallback=None) -> Backend
"""

from __future__ import annotations

import os
import re
import warnings

from modelkin.backends.base import Backend, BackendStatus
from modelkin.errors import DeviceError, InputError

__all__ = ["Backend", "BackendStatus", "fallback_allowed", "get_backend", "probe_all", "PREFERENCE"]

PREFERENCE = ("npu", "cuda", "cpu")  # what "auto" tries, in order
_SPEC = re.compile(r"^(auto|cpu|cuda|npu)(?::(\d+))?$")


def fallback_allowed(flag: bool | None = None) -> bool:
    """An explicit flag wins; otherwise MODELKIN_ALLOW_FALLBACK=1/true/yes allows CPU fallback."""
    if flag is not None:
        return flag
    return os.environ.get("MODELKIN_ALLOW_FALLBACK", "").strip().lower() in ("1", "true", "yes", "on")


def probe(name: str) -> BackendStatus:
    """Probe one backend family without raising."""
    if name == "cpu":
        from modelkin.backends import cpu as mod
    elif name == "cuda":
        from modelkin.backends import cuda as mod
    elif name == "npu":
        from modelkin.backends import npu as mod
    else:
        raise InputError(f"unknown backend {name!r}", hint="use cpu, cuda or npu")
    return mod.probe()


def probe_all() -> list[BackendStatus]:
    return [probe(name) for name in ("cpu", "cuda", "npu")]


def _make(name: str, index: int | None) -> Backend:
    if name == "cpu":
        from modelkin.backends.cpu import CPUBackend

        return CPUBackend()
    if name == "cuda":
        from modelkin.backends.cuda import CUDABackend

        return CUDABackend(index)
    from modelkin.backends.npu import NPUBackend

    return NPUBackend(index)


def get_backend(spec: str | Backend | None = "auto", *, allow_fallback: bool | None = None) -> Backend:
    """Resolve a device spec to a usable Backend.

    Args:
        spec: "auto" (npu > cuda > cpu), "cpu", "cuda", "cuda:1", "npu", "npu:0", or a Backend.
        allow_fallback: run on CPU with a warning when the requested device is unavailable.
            None reads MODELKIN_ALLOW_FALLBACK.

    Raises:
        InputError: the spec is malformed.
        DeviceError: the device is unavailable and fallback is not allowed; the message says why.
    """
    if isinstance(spec, Backend):
        return spec
    text = (spec or "auto").strip().lower()
    match = _SPEC.match(text)
    if not match:
        raise InputError(f"invalid device {spec!r}", hint="use auto, cpu, cuda, cuda:N, npu or npu:N")
    name, index = match.group(1), match.group(2)
    index = int(index) if index is not None else None
    if name == "auto":
        if index is not None:
            raise InputError(f"invalid device {spec!r}", hint="'auto' takes no index")
        for candidate in PREFERENCE:
            if probe(candidate).available:
                return _make(candidate, None)
        raise AssertionError("the cpu backend is always available")
    status = probe(name)
    reason = status.reason
    if status.available and index is not None and index >= len(status.devices):
        reason = f"{name}:{index} does not exist ({len(status.devices)} {name} device(s) visible)"
    if reason is None:
        return _make(name, index)
    if not fallback_allowed(allow_fallback):
        raise DeviceError(
            f"device {text} is unavailable: {reason}",
            hint="use --device cpu, or allow CPU fallback with --allow-fallback or MODELKIN_ALLOW_FALLBACK=1",
        )
    warnings.warn(f"device {text} is unavailable ({reason}); falling back to CPU", stacklevel=2)
    backend = _make("cpu", None)
    backend.fallback_reason = f"{text} unavailable: {reason}"
    return backend
