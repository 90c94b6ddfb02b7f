"""Results of the weight fingerprints: one MethodResult per method, gathered in a FingerprintReport.

Only a p-value whose null holds for independently trained *real* models may decide (NULL_KINDS): an exact
randomisation over a symmetry of a model's own training, or an empirical null over real unrelated models.
Call rule for an exact method, on its own p-value: p < 0.01 -> "related"; p >= 0.05 -> "unrelated";
otherwise "inconclusive". An empirical method is "related" only beyond every background pair with margin
(``beyond_margin``, fingerprints.empirical: its p is only as good as the background's coverage, and a pair
unlike any the background holds, such as a std-matched twin, reaches p = 1/(N+1) without derivation);
otherwise its p calls it as above. A method with a synthetic null (surrogate curves, relabelled tokens or
layers) is "descriptive": its score and p are shown, its call is "descriptive", and it never decides. The
report's verdict: "related" when an exact method's Holm-adjusted p (Holm over the exact methods that ran)
is < 0.01 or an empirical method is beyond its margin; "unrelated" when at least one deciding method ran
and every raw p >= 0.05; else "inconclusive".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelkin.compare.stats import holm_bonferroni

RELATED_P = 0.01
UNRELATED_P = 0.05
NULL_KINDS = {
    "exact": "exact randomisation over a symmetry of a model's own training: valid for any real pair",
    "empirical": "empirical null over real, independently trained models (p = (1+k)/(N+1))",
    "descriptive": "synthetic null (surrogates or relabellings that destroy structure all trained models "
                   "share): shown as description, never decides",
}
DECIDING = ("exact", "empirical")
CALL_RULE = (f"only methods with an exact or empirical null decide; for those, related if p < {RELATED_P} "
             f"(exact) or beyond every background pair with margin (empirical: score > max + (max - median) in "
             f"every stratum, N >= 99 each), unrelated if p >= {UNRELATED_P}, inconclusive otherwise; descriptive "
             f"methods never decide; verdict: related if an exact method's Holm-adjusted p < {RELATED_P} or an "
             f"empirical method is beyond its margin, unrelated if at least one deciding method ran and every "
             f"such p >= {UNRELATED_P}")


def call_for(p_value: float | None) -> str:
    """The per-method call for a p-value (see the module docstring)."""
    if p_value is None:
        return "inconclusive"
    if p_value < RELATED_P:
        return "related"
    if p_value >= UNRELATED_P:
        return "unrelated"
    return "inconclusive"


@dataclass(kw_only=True)
class MethodResult:
    """One fingerprint method's outcome.

    Attributes:
        name: method name (std_curve, pcs, invariants, spectral, permtest, upcycle).
        score: the method's similarity score (higher = more similar), None when skipped.
        p_value: p-value under the method's null (``null``), None when skipped.
        z: z-score of the observed statistic against the null, where one is defined.
        call: related | unrelated | inconclusive | skipped.
        null: one sentence saying what the null hypothesis and its distribution are.
        details: method-specific numbers (JSON-safe).
        skipped: why the method did not apply to this pair (then call == "skipped").
        seconds: wall time.
    """

    name: str
    score: float | None = None
    p_value: float | None = None
    z: float | None = None
    call: str = "inconclusive"
    null: str = ""
    null_kind: str = "descriptive"
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0

    @classmethod
    def skip(cls, name: str, reason: str, null: str = "") -> MethodResult:
        return cls(name=name, call="skipped", skipped=reason, null=null)

    def decide(self) -> MethodResult:
        """Set ``call`` from ``p_value`` (skipped results keep theirs; descriptive ones never decide)."""
        if self.skipped is None:
            self.call = call_for(self.p_value) if self.deciding else "descriptive"
            if self.call == "related" and self.null_kind == "empirical" and not self.beyond_margin:
                self.call = "inconclusive"
        return self

    @property
    def deciding(self) -> bool:
        """Whether this result's p-value may count toward a verdict (its null holds for real models)."""
        return self.null_kind in DECIDING

    @property
    def beyond_margin(self) -> bool:
        """An empirical-null result beyond every background pair with margin (fingerprints.empirical)."""
        return (self.skipped is None and self.null_kind == "empirical"
                and bool((self.details.get("background") or {}).get("beyond_margin")))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"score": self.score, "p_value": self.p_value, "z": self.z, "call": self.call,
                               "null": self.null, "null_kind": self.null_kind, "seconds": round(self.seconds, 3)}
        if self.skipped is not None:
            out["skipped"] = self.skipped
        out.update(self.details)
        return out

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> MethodResult:
        """The inverse of ``to_json`` (a ``p_holm`` entry belongs to the report and is left out)."""
        own = ("score", "p_value", "z", "call", "null", "null_kind", "seconds", "skipped")
        details = {k: v for k, v in data.items() if k not in own and k != "p_holm"}
        return cls(name=name, details=details, **{k: data[k] for k in own if k in data})


@dataclass(kw_only=True)
class FingerprintReport:
    """All methods run on one pair (A, B), with Holm-adjusted p-values and an overall verdict."""

    a: str
    b: str
    device: str
    seed: int
    methods: dict[str, MethodResult]
    p_holm: dict[str, float] = field(default_factory=dict)
    verdict: str = "inconclusive"

    def __getitem__(self, name: str) -> MethodResult:
        return self.methods[name]

    def finish(self) -> FingerprintReport:
        """Holm-adjusted p-values over the exact methods that ran, and the verdict (module docstring)."""
        ran = {n: r.p_value for n, r in self.methods.items()
               if r.skipped is None and r.p_value is not None and r.deciding}
        exact = {n: p for n, p in ran.items() if self.methods[n].null_kind == "exact"}
        self.p_holm = dict(zip(exact, holm_bonferroni(list(exact.values())))) if exact else {}
        if any(p < RELATED_P for p in self.p_holm.values()) or any(r.beyond_margin for r in self.methods.values()):
            self.verdict = "related"
        elif ran and all(p >= UNRELATED_P for p in ran.values()):
            self.verdict = "unrelated"
        else:
            self.verdict = "inconclusive"
        return self

    def to_json(self) -> dict[str, Any]:
        methods = {}
        for name, result in self.methods.items():
            methods[name] = result.to_json()
            if name in self.p_holm:
                methods[name]["p_holm"] = self.p_holm[name]
        return {"a": self.a, "b": self.b, "device": self.device, "seed": self.seed, "verdict": self.verdict,
                "call_rule": CALL_RULE, "methods": methods}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FingerprintReport:
        """The inverse of ``to_json``."""
        methods = data.get("methods") or {}
        return cls(a=data.get("a", ""), b=data.get("b", ""), device=data.get("device", ""),
                   seed=data.get("seed", 0),
                   methods={n: MethodResult.from_json(n, m) for n, m in methods.items()},
                   p_holm={n: m["p_holm"] for n, m in methods.items() if m.get("p_holm") is not None},
                   verdict=data.get("verdict", "inconclusive"))


class NotApplicable(Exception):
    """Raised by a method when the pair does not fit it (different widths, no MoE, …); reported as skipped."""
