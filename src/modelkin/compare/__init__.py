"""Compare two models: weight fingerprints with significance (and behaviour, see compare.api)."""

from __future__ import annotations

from modelkin.compare.api import fingerprint
from modelkin.compare.fingerprints.result import FingerprintReport, MethodResult

__all__ = ["FingerprintReport", "MethodResult", "fingerprint"]
