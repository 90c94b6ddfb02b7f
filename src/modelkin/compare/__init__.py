"""Compare two models: weight fingerprints with significance, behaviour, one verdict and report.

`modelkin.compare(a, b, ...)` is the public function; importing this subpackage makes Python bind the
name `modelkin.compare` to the package instead, so the package itself is callable and forwards to
`modelkin.compare.api.compare`.
"""

from __future__ import annotations

import sys
import types

from modelkin.compare.api import compare, fingerprint
from modelkin.compare.fingerprints.result import FingerprintReport, MethodResult

__all__ = ["FingerprintReport", "MethodResult", "compare", "fingerprint"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
