"""Compare two models: weight fingerprints (fingerprints/) and behaviour (behaviour/) -> verdict -> report/.

`modelkin.compare(a, b, ...)` is the public function, yet `import modelkin.compare.<module>` makes the
import system bind the attribute `modelkin.compare` to this package (after it runs, so nothing here can
undo it). The package therefore stays callable, forwarding to `api.compare`; a module instance cannot
have `__call__`, so its class is set to a ModuleType subclass, the way the language reference documents
for customising a module (https://docs.python.org/3/reference/datamodel.html#customizing-module-attribute-access).
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
