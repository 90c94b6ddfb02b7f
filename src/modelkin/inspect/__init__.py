"""Weight inspection: per-tensor statistics streamed through the device, roles, spectra, reports.

    modelkin.inspect.inspect_checkpoint(path, device="auto", select="all", spectral=False)
"""

from __future__ import annotations

if __name__ == "inspect":
    # Python was started with src/modelkin/ itself on sys.path (e.g. `python -c` run from inside the
    # package), so `import inspect` found this directory. Become the standard library's module instead
    # of shadowing it; modelkin.inspect is unaffected (see tests/test_no_stdlib_shadow.py).
    import importlib.util as _util
    import os as _os
    import sys as _sys
    import sysconfig as _sysconfig

    _spec = _util.spec_from_file_location("inspect", _os.path.join(_sysconfig.get_paths()["stdlib"], "inspect.py"))
    _stdlib = _util.module_from_spec(_spec)
    _sys.modules["inspect"] = _stdlib
    _spec.loader.exec_module(_stdlib)
else:
    from modelkin.inspect.report import InspectionResult, TensorStats
    from modelkin.inspect.roles import NameRole, classify, selector
    from modelkin.inspect.scan import ScanOptions, inspect_checkpoint, scan
    from modelkin.inspect.stats import STAT_KEYS, tensor_stats

__all__ = [
    "STAT_KEYS", "InspectionResult", "NameRole", "ScanOptions", "TensorStats", "classify",
    "inspect_checkpoint", "scan", "selector", "tensor_stats",
]
