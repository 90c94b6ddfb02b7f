"""Compare two models: weight fingerprints (fingerprints/) and behaviour (behaviour/) -> verdict -> report/.

The package is callable as `modelkin.compare(a, b, ...)` (-> api.compare): `import modelkin.compare.<x>` binds
the attribute `modelkin.compare` to this package after it runs, so only a callable package keeps one object
under that name; a module gets `__call__` only from its class, set below as the language reference documents
(https://docs.python.org/3/reference/datamodel.html#customizing-module-attribute-access).
"""

from __future__ import annotations

import sys
import types

from modelkin.compare.api import compare, fingerprint
from modelkin.compare.fingerprints.result import FingerprintReport, MethodResult
from modelkin.compare.many import compare_many

__all__ = ["FingerprintReport", "MethodResult", "compare", "compare_many", "fingerprint"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
