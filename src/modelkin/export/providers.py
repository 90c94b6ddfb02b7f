"""onnxruntime execution providers for a device: the backend classes say which provider matches each
device family, this module checks the installed onnxruntime build has it, and errs or falls back."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProviderChoice:
    """Where an onnxruntime session runs: ``providers`` / ``options`` for InferenceSession (in
    preference order, CPU last), the device family and index, and why it fell back, if it did."""

    family: str  # cpu | cuda | npu
    index: int | None
    providers: list[str]
    options: list[dict[str, Any]]
    fallback_reason: str | None = None

    @property
    def device(self) -> str:
        return self.family if self.index is None else f"{self.family}:{self.index}"


def _provider_of(family: str) -> str:
    """The provider name a backend class declares (read from the class: building an NPU backend
    would load torch_npu, and onnxruntime needs neither torch_npu nor torch's CUDA)."""
    if family == "cpu":
        from modelkin.backends.cpu import CPUBackend as cls
    elif family == "cuda":
        from modelkin.backends.cuda import CUDABackend as cls
    else:
        from modelkin.backends.npu import NPUBackend as cls
    return cls.ort_provider


def _choice(family: str, index: int | None, reason: str | None = None) -> ProviderChoice:
    if family == "cpu":
        return ProviderChoice(family="cpu", index=None, providers=[CPU], options=[{}], fallback_reason=reason)
    device_index = 0 if index is None else index
    return ProviderChoice(
        family=family,
        index=device_index,
        providers=[_provider_of(family), CPU],  # nodes the device provider lacks run on CPU
        options=[{"device_id": device_index}, {}],
    )


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def resolve_providers(device: str | Any = "auto", *, allow_fallback: bool | None = None) -> ProviderChoice:
    """The providers for ``device``, checked against this onnxruntime build.

    Args:
        device: "auto" (CANN > CUDA > CPU, whichever this onnxruntime has), "cpu", "cuda[:i]",
            "npu[:i]" (the CANN provider), or a Backend from ``modelkin.backends.get_backend``.
        allow_fallback: use the CPU provider, with a warning, when the wanted one is missing
            (None reads MODELKIN_ALLOW_FALLBACK).

    Raises:
        InputError: a malformed device string.
        DeviceError: the provider is missing and fallback is not allowed; names the package.
    """
    from modelkin.backends import fallback_allowed

    family, index = _parse(device)
    have = available_providers()
    if family == "auto":
        for candidate in ("npu", "cuda"):
            if _provider_of(candidate) in have:
                return _choice(candidate, None)
        return _choice("cpu", None)
    wanted = _provider_of(family)
    if wanted in have:
        return _choice(family, index)
    import onnxruntime

    reason = f"onnxruntime {onnxruntime.__version__} here has no {wanted} (available: {', '.join(have)})"
    if not fallback_allowed(allow_fallback):
        raise DeviceError(
            reason,
            hint=f"pip uninstall -y onnxruntime && pip install {PACKAGES[wanted]} (the packages share "
            "the import name; keep one), or use --device cpu, or allow CPU fallback with "
            "--allow-fallback or MODELKIN_ALLOW_FALLBACK=1",
        )
    warnings.warn(f"{reason}; falling back to {CPU}", stacklevel=2)
    return _choice("cpu", None, reason)


def _parse(device: str | Any) -> tuple[str, int | None]:
    if not isinstance(device, str):  # a Backend (already resolved, possibly a CPU fallback)
        return device.name, device.index
    match = _SPEC.match(device.strip().lower())
    if not match:
        raise InputError(f"invalid device {device!r}", hint="use auto, cpu, cuda, cuda:N, npu or npu:N")
    index = match.group(2)
    return match.group(1), int(index) if index is not None else None
