"""ComparisonReport: what `modelkin compare A B` found, typed; its JSON is the --json schema."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from modelkin.compare.behaviour.result import BehaviourResult
from modelkin.compare.fingerprints.result import FingerprintReport
from modelkin.errors import InputError
from modelkin.utils import atomic_write_text

SCHEMA = "modelkin-compare/1"


@dataclasses.dataclass(kw_only=True)
class ComparisonReport:
    """What `modelkin compare A B` found; the JSON, terminal and HTML views all read this object.

    Attributes:
        verdict: "related", "unrelated" or "inconclusive" (rules in modelkin.compare.verdict).
        reasons: why, with the p-values behind it, most decisive first.
        evidence: the weight methods with raw and Holm-adjusted p-values.
        fingerprint: the weight fingerprints (None when not run or failed: see fingerprint_error).
        behaviour: behavioural metrics (None when not run), including ``per_prompt`` details.
        models: {"a": {...}, "b": {...}}: name, path, model_type, is_moe, logits_size.
    """

    verdict: str
    reasons: list[str]
    evidence: list[dict[str, Any]]
    fingerprint: FingerprintReport | None
    fingerprint_error: str | None
    behaviour: BehaviourResult | None
    models: dict[str, dict[str, Any]]
    device: str
    dtype: str
    settings: dict[str, Any]
    timings: dict[str, float]
    rules: list[str]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_json() if hasattr(value, "to_json") else copy.deepcopy(value)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ComparisonReport:
        """The inverse of ``to_json``."""
        fields = {f.name: copy.deepcopy(data.get(f.name)) for f in dataclasses.fields(cls)}
        fp, beh = data.get("fingerprint"), data.get("behaviour")
        fields["fingerprint"] = FingerprintReport.from_json(fp) if fp else None
        fields["behaviour"] = BehaviourResult.from_json(beh) if beh else None
        for name in ("reasons", "evidence", "rules", "models", "settings", "timings"):
            if fields[name] is None:
                fields[name] = [] if name in ("reasons", "evidence", "rules") else {}
        return cls(**fields)

    def save_json(self, path: str | Path) -> None:
        """Write the JSON report atomically."""
        from modelkin.utils import to_json_text

        _write(path, to_json_text(self.to_json()))

    def save_html(self, path: str | Path) -> None:
        """Write the self-contained HTML report atomically."""
        import modelkin.compare.report.html as html

        _write(path, html.render_html(self))


def _write(path: str | Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}", hint="choose a writable path") from err
