"""CUDA backend (NVIDIA GPUs) through torch.cuda."""

from __future__ import annotations

import torch

from modelkin.backends.base import Backend, BackendStatus


class CUDABackend(Backend):
    name = "cuda"
    dist_backend = "nccl"
    ort_provider = "CUDAExecutionProvider"

    def __init__(self, index: int | None = None):
        super().__init__(0 if index is None else index)

    def default_dtype(self) -> torch.dtype:
        with torch.cuda.device(self.index):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def memory_info(self) -> dict[str, int | None]:
        free, total = torch.cuda.mem_get_info(self.device)
        return {
            "total": total,
            "free": free,
            "allocated": torch.cuda.memory_allocated(self.device),
            "peak": torch.cuda.max_memory_allocated(self.device),
        }

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def fused_ops(self) -> frozenset[str]:
        ops = {"sdpa"}
        major, _ = torch.cuda.get_device_capability(self.device)
        if major >= 8 and (hasattr(torch, "_grouped_mm") or hasattr(torch.nn.functional, "grouped_mm")):
            ops.add("grouped_mm")
        return frozenset(ops)


def probe() -> BackendStatus:
    versions = {"cuda": str(torch.version.cuda)} if torch.version.cuda else {}
    if not torch.version.cuda:
        return BackendStatus(
            name="cuda", available=False, versions=versions,
            reason=f"this torch build ({torch.__version__}) has no CUDA support"
            " (install a CUDA build of torch in a separate environment)",
        )
    try:
        count = torch.cuda.device_count()
        if count == 0 or not torch.cuda.is_available():
            return BackendStatus(
                name="cuda", available=False, versions=versions,
                reason="no CUDA device visible (check the NVIDIA driver, nvidia-smi and CUDA_VISIBLE_DEVICES)",
            )
        devices = []
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            devices.append({
                "index": i, "name": props.name, "total_memory": total, "free_memory": free,
                "capability": f"{props.major}.{props.minor}",
            })
    except RuntimeError as err:  # driver too old, broken install
        return BackendStatus(name="cuda", available=False, versions=versions,
                             reason=f"CUDA initialisation failed: {str(err).splitlines()[0]}")
    return BackendStatus(name="cuda", available=True, devices=devices, versions=versions)
