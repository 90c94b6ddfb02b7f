"""Make `import torch` survive a torch-npu install without a working CANN toolkit.

Since torch-npu 2.5.1 the wheel registers a `torch.backends` entry point, and torch imports it inside
`import torch`; without CANN's shared libraries that raises and takes torch down with it. A failed torch import cannot be retried in the same process, so before torch
is first imported we check, without importing anything, whether torch_npu could load; if not we set
TORCH_DEVICE_BACKEND_AUTOLOAD=0 and remember why, so `doctor` and the npu backend can say so.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# The CANN libraries torch_npu links against (its _C extension and libtorch_npu.so).
CANN_LIBRARIES = ("libascendcl.so", "libhccl.so", "libacl_op_compiler.so", "libge_runner.so", "libgraph.so")
SET_ENV_HINT = "source /usr/local/Ascend/ascend-toolkit/set_env.sh (or install the CANN toolkit)"

_npu_block_reason: str | None = None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _base_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0'; '2.12.0.post3' -> '2.12.0'."""
    version = version.split("+")[0]
    return ".".join(version.split(".")[:3])


def missing_cann_libraries() -> list[str]:
    """CANN shared libraries that the dynamic loader cannot find right now."""
    missing = []
    for lib in CANN_LIBRARIES:
        try:
            ctypes.CDLL(lib)
        except OSError:
            missing.append(lib)
    return missing


def npu_block_reason() -> str | None:
    """Why torch_npu must not (or could not) be loaded, or None if nothing stands in its way."""
    torch_npu_version = _dist_version("torch-npu") or _dist_version("torch_npu")
    if torch_npu_version is None and importlib.util.find_spec("torch_npu") is None:
        return None
    torch_version = _dist_version("torch")
    if torch_version and torch_npu_version:
        if _base_version(torch_version) != _base_version(torch_npu_version):
            return (
                f"torch-npu {torch_npu_version} does not pair with torch {torch_version}: versions must"
                f" match at major.minor.patch (install torch-npu=={_base_version(torch_version)}"
                f" or torch=={_base_version(torch_npu_version)})"
            )
    missing = missing_cann_libraries()
    if missing:
        return (
            f"torch-npu {torch_npu_version or '?'} is installed but the CANN runtime is not loadable"
            f" ({', '.join(missing)} not found); {SET_ENV_HINT}"
        )
    return None


def prepare() -> None:
    """Run once before torch is imported; disables torch's plugin autoload if torch_npu would break it."""
    global _npu_block_reason
    if "torch" in sys.modules or "TORCH_DEVICE_BACKEND_AUTOLOAD" in os.environ:
        if os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD") == "0" and _npu_block_reason is None:
            _npu_block_reason = npu_block_reason()
        return
    _npu_block_reason = npu_block_reason()
    if _npu_block_reason is not None:
        os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"


def blocked_npu_reason() -> str | None:
    """The reason recorded by `prepare()`, if torch_npu was kept from loading."""
    return _npu_block_reason
