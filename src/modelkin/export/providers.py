"""onnxruntime execution providers for a device: the backend says which provider matches it, this
module checks that the installed onnxruntime build has it, and errs or falls back to CPU if not."""

from __future__ import annotations

import re
import warnings
from typing import Any

from modelkin.errors import DeviceError, InputError

CPU = "CPUExecutionProvider"
# the package that brings each provider (they share the import name `onnxruntime`; install one)
PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu",
    "CANNExecutionProvider": "onnxruntime-cann",
    CPU: "onnxruntime",
}
_SPEC = re.compile(r"^(auto|cpu|cuda|npu)(?::(\d+))?$")


def _backend_for(name: str, index: int | None) -> Any:
    """The backend object for a device family, built without probing torch: onnxruntime runs a
    graph on CUDA or CANN whether or not torch itself can reach that device."""
    if name == "cpu":
        from modelkin.backends.cpu import CPUBackend

        return CPUBackend()
    if name == "cuda":
        from modelkin.backends.cuda import CUDABackend

        return CUDABackend(index)
    from modelkin.backends.npu import NPUBackend

    return NPUBackend(index)


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def resolve_providers(
    device: str | Any = "auto", *, allow_fallback: bool | None = None
) -> tuple[Any, list[str], list[dict[str, Any]]]:
    """(backend, providers, provider_options) for ``onnxruntime.InferenceSession``: the providers
    in preference order, and the Backend whose provider leads them (CPU after a fallback).

    Args:
        device: "auto" (CANN > CUDA > CPU, whichever this onnxruntime has), "cpu", "cuda[:i]",
            "npu[:i]", or a Backend from ``modelkin.backends.get_backend``.
        allow_fallback: run on CPU with a warning when the provider is missing (None reads
            MODELKIN_ALLOW_FALLBACK).

    Raises:
        InputError: a malformed device string.
        DeviceError: the provider is missing and fallback is not allowed; names the package.
    """
    from modelkin.backends import fallback_allowed

    have = available_providers()
    if isinstance(device, str):
        match = _SPEC.match(device.strip().lower())
        if not match:
            raise InputError(f"invalid device {device!r}", hint="use auto, cpu, cuda, cuda:N, npu or npu:N")
        name, index = match.group(1), match.group(2)
        if name == "auto":
            for family in ("npu", "cuda"):
                backend = _backend_for(family, None)
                if backend.ort_provider in have:
                    return _options(backend)
            return _options(_backend_for("cpu", None))
        backend = _backend_for(name, int(index) if index is not None else None)
    else:
        backend = device
    wanted = backend.ort_provider
    if wanted in have:
        return _options(backend)
    import onnxruntime

    reason = (
        f"onnxruntime {onnxruntime.__version__} here has no {wanted} (available: {', '.join(have)})"
    )
    if not fallback_allowed(allow_fallback):
        package = PACKAGES.get(wanted, "an onnxruntime build with that provider")
        raise DeviceError(
            reason,
            hint=f"pip uninstall -y onnxruntime && pip install {package} (the packages share the "
            "import name; keep one), or use --device cpu, or allow CPU fallback with "
            "--allow-fallback or MODELKIN_ALLOW_FALLBACK=1",
        )
    warnings.warn(f"{reason}; falling back to {CPU}", stacklevel=2)
    cpu = _backend_for("cpu", None)
    cpu.fallback_reason = reason
    return _options(cpu)


def _options(backend: Any) -> tuple[Any, list[str], list[dict[str, Any]]]:
    return backend, backend.ort_providers(), backend.ort_provider_options()
