"""Weight inspection: per-tensor statistics streamed through the device, roles, spectra, reports.

    modelkin.inspect.inspect_checkpoint(path, device="auto", select="all", spectral=False)
"""

from __future__ import annotations

from modelkin.inspect.report import InspectionResult, TensorStats
from modelkin.inspect.roles import NameRole, classify, selector
from modelkin.inspect.scan import ScanOptions, inspect_checkpoint, scan
from modelkin.inspect.stats import STAT_KEYS, tensor_stats

__all__ = [
    "STAT_KEYS", "InspectionResult", "NameRole", "ScanOptions", "TensorStats", "classify",
    "inspect_checkpoint", "scan", "selector", "tensor_stats",
]
