"""Ascend NPU backend through torch_npu, imported lazily because importing it patches torch."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import torch

from modelkin import _torch_env
from modelkin.backends.base import Backend, BackendStatus

# torch_npu functions used by the optional fast paths (runtime/moe/npu_ops.py).
FUSED_OPS = (
    "npu_rms_norm", "npu_add_rms_norm", "npu_moe_init_routing", "npu_grouped_matmul",
    "npu_moe_finalize_routing", "npu_swiglu", "npu_apply_rotary_pos_emb",
    "npu_fused_infer_attention_score",
)


def _torch_npu():
    return importlib.import_module("torch_npu")


class NPUBackend(Backend):
    name = "npu"
    dist_backend = "hccl"
    ort_provider = "CANNExecutionProvider"

    def __init__(self, index: int | None = None):
        super().__init__(0 if index is None else index)
        _torch_npu()

    def default_dtype(self) -> torch.dtype:
        # 910A (first generation) has no bf16: fall back to fp16 there (Ascend 910A lacks bf16 units).
        return torch.bfloat16 if torch.npu.is_bf16_supported() else torch.float16

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            return bool(torch.npu.is_bf16_supported())
        return dtype != torch.float64

    def synchronize(self) -> None:
        torch.npu.synchronize(self.device)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.npu.manual_seed_all(seed)

    def memory_info(self) -> dict[str, int | None]:
        free, total = torch.npu.mem_get_info(self.device)
        return {
            "total": total,
            "free": free,
            "allocated": torch.npu.memory_allocated(self.device),
            "peak": torch.npu.max_memory_allocated(self.device),
        }

    def reset_peak_memory(self) -> None:
        torch.npu.reset_peak_memory_stats(self.device)

    def empty_cache(self) -> None:
        torch.npu.empty_cache()

    def fused_ops(self) -> frozenset[str]:
        mod = _torch_npu()
        return frozenset(op for op in FUSED_OPS if hasattr(mod, op))


def cann_version() -> str | None:
    """The CANN toolkit version from the toolkit's own version files, if set_env.sh was sourced."""
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        home = os.environ.get(var)
        if not home:
            continue
        for name in ("version.cfg", "ascend_toolkit_install.info", "compiler/version.info"):
            path = Path(home) / name
            try:
                for line in path.read_text().splitlines():
                    key, _, value = line.partition("=")
                    if key.strip().lower() in ("version", "toolkit_installed_version", "runtime_running_version"):
                        return value.strip().strip("[]").split(":")[-1]
            except OSError:
                continue
    return None


def probe() -> BackendStatus:
    versions = {}
    installed = importlib.util.find_spec("torch_npu") is not None
    cann = cann_version()
    if cann:
        versions["cann"] = cann
    if not installed:
        return BackendStatus(
            name="npu", available=False, versions=versions,
            reason="torch-npu is not installed (on an Ascend host: pip install 'modelkin[npu]' and"
            " source /usr/local/Ascend/ascend-toolkit/set_env.sh)",
        )
    versions["torch_npu"] = _torch_env._dist_version("torch-npu") or "?"
    blocked = _torch_env.blocked_npu_reason() or _torch_env.npu_block_reason()
    if blocked:
        return BackendStatus(name="npu", available=False, versions=versions, reason=blocked)
    try:
        _torch_npu()
    except Exception as err:  # torch_npu raises ImportError/RuntimeError/OSError for a broken CANN
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return BackendStatus(
            name="npu", available=False, versions=versions,
            reason=f"import torch_npu failed: {first}; {_torch_env.SET_ENV_HINT}, and check that"
            " torch, torch-npu and CANN versions pair (torch-npu == torch at major.minor.patch)",
        )
    try:
        count = torch.npu.device_count() if torch.npu.is_available() else 0
    except RuntimeError as err:
        return BackendStatus(name="npu", available=False, versions=versions,
                             reason=f"NPU runtime error: {str(err).splitlines()[0]}")
    if count == 0:
        return BackendStatus(
            name="npu", available=False, versions=versions,
            reason="torch_npu loaded but no NPU is visible (check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES)",
        )
    devices = []
    for i in range(count):
        free, total = torch.npu.mem_get_info(i)
        devices.append({"index": i, "name": torch.npu.get_device_name(i),
                        "total_memory": total, "free_memory": free})
    return BackendStatus(name="npu", available=True, devices=devices, versions=versions)
