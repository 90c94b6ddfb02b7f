"""Combine weight fingerprints and behaviour into one call: related, unrelated or inconclusive.

Rules (every reason in a report names the rule it applied):
  R1  Only weight tests whose null holds for independently trained real models decide: exact
      randomisation over a symmetry of a model's own training (pcs, permtest, csu_aligned, upcycle) or an
      empirical null over real unrelated models (std_curve, spectral with a background holding N >= 99
      unrelated pairs in every stratum; p = (1+k)/(N+1), the largest stratum p). The exact tests' p-values
      are adjusted together with Holm-Bonferroni; one counts when its adjusted p < 0.01. An empirical p
      counts toward R4 and R5 as it is, and toward related only through R8: it is only as good as the
      background's coverage, and a pair unlike every pair the background holds (a std-matched twin) reaches
      p = 1/(N+1) without any derivation. Statistics with synthetic nulls (std_curve, spectral without such
      a background, invariants) are shown as description, placed among the background's pairs, and never
      decide.
  R2  Functional identity (same tokenizer only): mean next-token JS divergence <= 1e-4 bits, top-1
      agreement >= 0.99 and greedy continuations agreeing on >= 95% of tokens. Independent training
      never yields the same function, so this alone says related (a copy, possibly re-parameterised).
  R3  One or more valid weight tests significant under R1, or an empirical-null method beyond every
      background pair with margin (R8) -> related.
  R4  A valid test with a raw p < 0.05 that Holm (exact tests) or R8 (empirical ones) does not confirm
      is weak evidence: it blocks "unrelated" and the verdict is inconclusive.
  R5  Unrelated needs both halves: at least one valid weight test applied, every one with a raw
      p >= 0.05, and behaviour measured and distinguishable (the MMD test rejects equality at 0.05, or
      top-1 agreement < 0.5, or greedy text similarity < 0.5).
  R6  A correlation of bits per byte across texts is reported as context and never decides: all
      language models find the same texts hard, so unrelated models correlate too.
  R7  Anything else is inconclusive, with the missing or conflicting evidence named.
  R8  Margin (empirical nulls only): the score exceeds, in every stratum, the largest unrelated-pair score
      by at least that stratum's spread from median to maximum (score > max + (max - median)). Being
      above every background pair (p = 1/(N+1)) is not enough: the pair may simply be unlike anything the
      background covers. A gap this wide is far from the null's own range: extrapolating its upper tail as
      Gaussian puts the score beyond 5 SD at N = 99 (p < 1e-6), as exponential beyond 9 scale units
      (p < 2e-4), both under 0.01/7, Holm's strictest level over the seven methods. A bounded score whose
      unrelated pairs already come near its bound (std-curve r near 1) can never pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from modelkin.compare.behaviour.result import BehaviourResult
from modelkin.compare.fingerprints.result import FingerprintReport
from modelkin.compare.stats import holm_bonferroni

ALPHA = 0.01
NULL_FLOOR = 0.05
JS_IDENTICAL = 1e-4
TOP1_IDENTICAL = 0.99
GREEDY_IDENTICAL = 0.95
DIFFERENT = 0.5


def _rules(doc: str) -> tuple[str, ...]:
    """The R1-R7 paragraphs of this module's docstring, one string each (shown in reports)."""
    rules: list[str] = []
    for line in doc.split("Rules", 1)[1].splitlines()[1:]:
        text = line.strip()
        if text[:1] == "R" and text[1:2].isdigit():
            rules.append(text)
        elif text and rules:
            rules[-1] += " " + text
    return tuple(rules)


RULES = _rules(__doc__ or "")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    verdict: str                     # "related" | "unrelated" | "inconclusive"
    reasons: list[str]
    evidence: list[dict[str, Any]]   # one entry per weight method: p, Holm-adjusted p, significant

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def weight_evidence(fingerprint: FingerprintReport | None) -> list[dict[str, Any]]:
    """Per fingerprint method: score, raw p, null kind, Holm-adjusted p and whether it rejects independence.

    Holm runs over the exact methods only (R1); empirical ones carry ``beyond_margin`` (R8); descriptive
    ones keep their p with a note.
    """
    rows = []
    for name, m in (fingerprint.methods if fingerprint is not None else {}).items():
        p = m.p_value
        row = {"method": name, "score": m.score, "p_value": None, "p_holm": None, "significant": False,
               "null_kind": m.null_kind, "decides": m.deciding, "beyond_margin": m.beyond_margin}
        if (m.details.get("background") or {}).get("rank") and m.skipped is None:
            row["background"] = m.details["background"]["rank"]
        if isinstance(p, (int, float)) and math.isfinite(p):
            row["p_value"] = float(p)
            if not m.deciding:
                row["note"] = "descriptive: its null is synthetic, so it never decides"
        else:
            row["note"] = m.skipped or "no p-value"
        rows.append(row)
    tested = [r for r in rows if r["p_value"] is not None and r["null_kind"] == "exact"]
    for r, adj in zip(tested, holm_bonferroni([r["p_value"] for r in tested])):
        r["p_holm"] = adj
        r["significant"] = adj < ALPHA
    return rows


def _fmt(p: float | None) -> str:
    return "n/a" if p is None else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def functionally_identical(b: BehaviourResult | None) -> bool:
    """R2 on a behaviour result."""
    if b is None or not b.same_tokenizer:
        return False
    js, top1, greedy = b.js_divergence, b.top1_agreement, b.greedy_token_agreement
    if js is None or top1 is None:
        return False
    return js <= JS_IDENTICAL and top1 >= TOP1_IDENTICAL and (greedy is None or greedy >= GREEDY_IDENTICAL)


def _distinguishable(b: BehaviourResult) -> str | None:
    """Why behaviour shows the models differ, or None (R5)."""
    mmd = b.mmd or {}
    if mmd.get("p_value") is not None and mmd["p_value"] < NULL_FLOOR:
        return f"the MMD test rejects equal sampling distributions (p={_fmt(mmd['p_value'])})"
    top1, sim = b.top1_agreement, b.greedy_text_similarity
    if top1 is not None and top1 < DIFFERENT:
        return f"top-1 agreement is only {top1:.2f}"
    if sim is not None and sim < DIFFERENT:
        return f"greedy text similarity is only {sim:.2f}"
    return None


def decide(fingerprint: FingerprintReport | None, behaviour: BehaviourResult | None,
           *, fingerprint_error: str | None = None) -> Verdict:
    """Apply R1-R7 to a fingerprint report and a behaviour result (either may be None)."""
    evidence = weight_evidence(fingerprint)
    tested = [e for e in evidence if e["p_value"] is not None and e["decides"]]
    significant = [e for e in tested if e["significant"] or e["beyond_margin"]]
    reasons = [_weights_summary(tested, significant, fingerprint_error)]
    if behaviour:
        reasons.append(_behaviour_summary(behaviour))
        if behaviour.bpb_correlation is not None:
            reasons.append(f"R6: bits-per-byte correlation r={behaviour.bpb_correlation:.3f} "
                           f"(p={_fmt(behaviour.bpb_p_value)}) is context only, not evidence")
    else:
        reasons.append("behaviour was not compared")

    if functionally_identical(behaviour):
        reasons.insert(0, "R2: the models compute the same function (JS ≤ 1e-4 bits, top-1 ≥ 0.99, "
                          "same greedy continuations)")
        return Verdict(verdict="related", reasons=reasons, evidence=evidence)
    if significant:
        holm = [e["method"] for e in significant if e["significant"]]
        margin = [e["method"] for e in significant if e["beyond_margin"]]
        parts = ([f"after Holm-Bonferroni ({', '.join(holm)})"] if holm else []) + (
            [f"beyond every background pair with margin, R8 ({', '.join(margin)})"] if margin else [])
        reasons.insert(0, f"R3: {len(significant)} valid weight test(s) reject independence " + "; ".join(parts))
        return Verdict(verdict="related", reasons=reasons, evidence=evidence)
    return _unrelated_or_not(tested, behaviour, reasons, evidence)


def _unrelated_or_not(tested: list[dict[str, Any]], behaviour: BehaviourResult | None, reasons: list[str],
                      evidence: list[dict[str, Any]]) -> Verdict:
    low = [e for e in tested if e["p_value"] < NULL_FLOOR]
    if low:
        reasons.insert(0, "R4: weak weight evidence (raw p < 0.05 but not significant after Holm), too low to "
                          "call the models unrelated: "
                          + ", ".join(f"{e['method']} p={_fmt(e['p_value'])}" for e in low))
        return Verdict(verdict="inconclusive", reasons=reasons, evidence=evidence)
    missing = []
    if not tested:
        missing.append("no weight test with a valid null applied to this pair" + _skipped_reasons(evidence))
    why_diff = _distinguishable(behaviour) if behaviour else None
    if not behaviour:
        missing.append("behaviour was not compared")
    elif why_diff is None:
        missing.append("behaviour does not distinguish the models")
    if not missing:
        reasons.insert(0, f"R5: no valid weight test rejects independence ({len(tested)} tested, all p ≥ 0.05) "
                          f"and {why_diff}")
        return Verdict(verdict="unrelated", reasons=reasons, evidence=evidence)
    reasons.insert(0, "R7: " + "; ".join(missing))
    return Verdict(verdict="inconclusive", reasons=reasons, evidence=evidence)


def _skipped_reasons(evidence: list[dict[str, Any]]) -> str:
    skipped = [f"{e['method']}: {e['note']}" for e in evidence if e["decides"] and e["p_value"] is None]
    return f" ({'; '.join(skipped)})" if skipped else ""


def _weights_summary(tested: list[dict[str, Any]], significant: list[dict[str, Any]], error: str | None) -> str:
    if error:
        return f"weight fingerprints unavailable: {error}"
    if not tested:
        return "no weight test with a valid null gave a p-value"
    parts = [f"{e['method']} p={_fmt(e['p_value'])} (Holm {_fmt(e['p_holm'])})" for e in tested]
    return f"weights: {len(significant)}/{len(tested)} valid tests significant at {ALPHA}: " + ", ".join(parts)


def _behaviour_summary(b: BehaviourResult) -> str:
    parts = []
    if b.js_divergence is not None:
        parts.append(f"JS={b.js_divergence:.3g} bits")
    if b.top1_agreement is not None:
        parts.append(f"top-1 agreement={b.top1_agreement:.3f}")
    if b.greedy_text_similarity is not None:
        parts.append(f"greedy text similarity={b.greedy_text_similarity:.3f}")
    mmd = b.mmd or {}
    if mmd.get("p_value") is not None:
        parts.append(f"MMD p={_fmt(mmd['p_value'])}")
    if not b.same_tokenizer and b.token_vocabulary:
        parts.append(f"token-level metrics over {b.token_vocabulary['shared']} byte-identical shared tokens "
                     "(the vocabularies differ)")
    elif not b.same_tokenizer:
        parts.append(f"token-level metrics skipped: {b.tokenizer_note}")
    return "behaviour: " + (", ".join(parts) if parts else "no metric available")
