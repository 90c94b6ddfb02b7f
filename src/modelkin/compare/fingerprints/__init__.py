"""Weight fingerprints, one module per method, each returning a score with a p-value under a stated null.

Methods that decide (exact nulls over symmetries of training): pcs (HuRef PCS, residual sign flips),
permtest (Zhu et al.), csu_aligned (Zhu et al.'s csu after shared-token residual alignment), upcycle
(MoE-from-dense detector). Descriptive (synthetic nulls, never decide): std_curve (HonestAGI),
invariants (HuRef ICS-style), spectral (GhostSpec-style).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from modelkin.compare.fingerprints.result import FingerprintReport, MethodResult, NotApplicable
from modelkin.errors import InputError

METHODS = ("std_curve", "pcs", "invariants", "spectral", "permtest", "csu_aligned", "upcycle")

__all__ = ["METHODS", "FingerprintReport", "MethodResult", "NotApplicable", "method_module", "resolve_methods"]


def resolve_methods(methods: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Method names from a list or a comma-separated string (None or "all": every method).

    Raises:
        InputError: an unknown method name.
    """
    if methods is None or methods == "all":
        return list(METHODS)
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise InputError(f"unknown fingerprint method(s): {', '.join(unknown) or '(none given)'}",
                         hint=f"choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def method_module(name: str) -> ModuleType:
    """The module implementing one method (exposes NAME, NULL and run(a, b, *, seed, **options))."""
    return importlib.import_module(f"modelkin.compare.fingerprints.{name}")
