"""The Backend protocol: everything modelkin needs to know about a device family, in one place."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from modelkin.errors import InputError

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BackendStatus:
    """What `probe()` found for one backend family: usable or not, why not, which devices."""

    name: str
    available: bool
    reason: str | None = None
    devices: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Backend:
    """A device family (cpu / cuda / npu) with one chosen device.

    Subclasses set `name`, `dist_backend` and `ort_provider`, and override the hardware queries.
    """

    name: str = "base"
    dist_backend: str = "gloo"
    ort_provider: str = "CPUExecutionProvider"

    def __init__(self, index: int | None = None):
        self.index = index
        self.fallback_reason: str | None = None  # set when this backend stands in for an unavailable one

    @property
    def device(self) -> torch.device:
        return torch.device(self.name if self.index is None else f"{self.name}:{self.index}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} device={self.device}>"

    # -- dtype policy ----------------------------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return True

    def resolve_dtype(self, dtype: str | torch.dtype | None = "auto") -> torch.dtype:
        """'auto' -> the backend's default; names like 'bf16' or torch dtypes -> a checked torch dtype."""
        if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
            return self.default_dtype()
        if isinstance(dtype, str):
            key = dtype.lower().removeprefix("torch.")
            if key not in _DTYPE_NAMES:
                raise InputError(
                    f"unknown dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16"
                )
            dtype = _DTYPE_NAMES[key]
        if not self.supports_dtype(dtype):
            raise InputError(
                f"{self.device} does not support {dtype}",
                hint=f"use --dtype auto ({self.default_dtype()}) or float32",
            )
        return dtype

    # -- device services ---------------------------------------------------------------------------
    def synchronize(self) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def memory_info(self) -> dict[str, int | None]:
        """Bytes: total, free, allocated (by torch on this device), peak (allocated or process RSS)."""
        return {"total": None, "free": None, "allocated": None, "peak": None}

    def reset_peak_memory(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def fused_ops(self) -> frozenset[str]:
        """Names of optional fused kernels usable on this backend (e.g. 'grouped_mm', 'npu_rms_norm')."""
        return frozenset()

    def has_fused(self, op: str) -> bool:
        return op in self.fused_ops()

    def ort_providers(self) -> list[str]:
        """onnxruntime execution providers for this backend, in preference order."""
        return [self.ort_provider] + (["CPUExecutionProvider"] if self.ort_provider != "CPUExecutionProvider" else [])

    def ort_provider_options(self) -> list[dict[str, Any]]:
        opts: dict[str, Any] = {} if self.index is None else {"device_id": self.index}
        return [opts] + ([{}] if self.ort_provider != "CPUExecutionProvider" else [])

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "fallback_reason": self.fallback_reason}
