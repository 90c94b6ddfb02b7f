"""CPU backend: always available; memory figures come from the OS."""

from __future__ import annotations

import os
import platform
import resource

import torch

from modelkin.backends.base import Backend, BackendStatus


def _meminfo() -> dict[str, int]:
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return info


class CPUBackend(Backend):
    name = "cpu"
    dist_backend = "gloo"
    ort_provider = "CPUExecutionProvider"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def memory_info(self) -> dict[str, int | None]:
        info = _meminfo()
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "total": info.get("MemTotal"),
            "free": info.get("MemAvailable"),
            "allocated": None,
            "peak": peak_kb * 1024,
        }

    def fused_ops(self) -> frozenset[str]:
        ops = set()
        if hasattr(torch, "_grouped_mm") or hasattr(torch.nn.functional, "grouped_mm"):
            ops.add("grouped_mm")
        return frozenset(ops)


def probe() -> BackendStatus:
    info = _meminfo()
    device = {
        "index": None,
        "name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "total_memory": info.get("MemTotal"),
        "free_memory": info.get("MemAvailable"),
    }
    return BackendStatus(name="cpu", available=True, devices=[device])
