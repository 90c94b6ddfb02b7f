"""The verdict rules R1-R7 on synthetic evidence."""

from __future__ import annotations

from dataclasses import replace

import pytest

from modelkin.compare.behaviour.result import BehaviourResult
from modelkin.compare.fingerprints.result import FingerprintReport, MethodResult
from modelkin.compare.verdict import RULES, decide, functionally_identical, weight_evidence


def fp(descriptive=(), **p_values):
    """Methods with exact nulls by default; names in ``descriptive`` have synthetic nulls."""
    methods = {}
    for name, p in p_values.items():
        kind = "descriptive" if name in descriptive else "exact"
        methods[name] = (MethodResult(name=name, score=0.5, p_value=p, null_kind=kind) if p is not None
                         else MethodResult.skip(name, "n/a"))
        methods[name].null_kind = kind
    return FingerprintReport(a="A", b="B", device="cpu", seed=0, methods=methods)


IDENTICAL = BehaviourResult(same_tokenizer=True, js_divergence=1e-9, top1_agreement=1.0, greedy_token_agreement=1.0,
                            greedy_text_similarity=1.0, mmd={"p_value": 0.6}, bpb_correlation=1.0, bpb_p_value=0.001)
DIFFERENT = BehaviourResult(same_tokenizer=True, js_divergence=0.9, top1_agreement=0.01, greedy_token_agreement=0.0,
                            greedy_text_similarity=0.1, mmd={"p_value": 0.001}, bpb_correlation=0.95, bpb_p_value=0.001)
CLOSE = replace(DIFFERENT, js_divergence=0.05, top1_agreement=0.8, greedy_text_similarity=0.7, mmd={"p_value": 0.01})


def test_rules_are_documented_once_each():
    assert [r[:2] for r in RULES] == ["R1", "R2", "R3", "R4", "R5", "R6", "R7", "R8"]


def test_holm_adjustment_and_skipped_methods():
    ev = weight_evidence(fp(a=0.001, b=0.004, c=0.5, d=None))
    by = {e["method"]: e for e in ev}
    assert by["a"]["p_holm"] == pytest.approx(0.003) and by["a"]["significant"]
    assert by["b"]["p_holm"] == pytest.approx(0.008) and by["b"]["significant"]
    assert by["c"]["p_holm"] == pytest.approx(0.5) and not by["c"]["significant"]
    assert by["d"]["p_value"] is None and by["d"]["note"] == "n/a"


def test_functional_identity_alone_is_related():
    v = decide(None, IDENTICAL, fingerprint_error="not requested")
    assert v.verdict == "related" and v.reasons[0].startswith("R2")
    assert not functionally_identical(replace(IDENTICAL, same_tokenizer=False))
    assert not functionally_identical(replace(IDENTICAL, js_divergence=1e-3))


def test_two_significant_weight_methods_are_related_even_if_behaviour_differs():
    v = decide(fp(a=0.0005, b=0.001, c=0.9), DIFFERENT)
    assert v.verdict == "related" and v.reasons[0].startswith("R3")


def test_one_valid_significant_test_is_related_whatever_behaviour():
    assert decide(fp(a=0.0005, b=0.9), CLOSE).verdict == "related"
    v = decide(fp(a=0.0005, b=0.9), DIFFERENT)
    assert v.verdict == "related" and v.reasons[0].startswith("R3")


def test_descriptive_statistics_never_decide():
    # the HonestAGI std curve of a std-matched twin: p = 5e-4 under its surrogate null, but no valid test agrees
    v = decide(fp(std_curve=0.0005, spectral=0.001, pcs=0.6, permtest=0.3, descriptive=("std_curve", "spectral")),
               DIFFERENT)
    assert v.verdict == "unrelated" and v.reasons[0].startswith("R5")
    by = {e["method"]: e for e in v.evidence}
    assert by["std_curve"]["p_holm"] is None and not by["std_curve"]["significant"]
    assert "never decides" in by["std_curve"]["note"]
    assert by["pcs"]["p_holm"] == pytest.approx(0.6)  # Holm over the two valid tests only
    v = decide(fp(std_curve=0.0005, pcs=None, descriptive=("std_curve",)), DIFFERENT)
    assert v.verdict == "inconclusive" and "no weight test with a valid null" in v.reasons[0]
    assert "pcs: n/a" in v.reasons[0]


def test_unrelated_needs_both_halves():
    v = decide(fp(a=0.4, b=0.7, c=0.2), DIFFERENT)
    assert v.verdict == "unrelated" and v.reasons[0].startswith("R5")
    assert decide(fp(a=0.4, b=0.7), None).verdict == "inconclusive"           # no behaviour
    assert decide(fp(a=0.4), DIFFERENT).verdict == "unrelated"                # one valid test suffices
    v = decide(fp(a=0.4, b=0.03, c=0.9), DIFFERENT)                            # weak weight evidence
    assert v.verdict == "inconclusive" and v.reasons[0].startswith("R4") and "weak weight evidence" in v.reasons[0]
    same_looking = replace(CLOSE, mmd={"p_value": 0.5})
    assert decide(fp(a=0.4, b=0.7), same_looking).verdict == "inconclusive"  # behaviour does not separate


def test_a_high_bpb_correlation_never_decides():
    only_bpb = BehaviourResult(same_tokenizer=False, bpb_correlation=0.99, bpb_p_value=0.0005,
                               greedy_text_similarity=0.55, mmd={"p_value": 0.3})
    v = decide(None, only_bpb, fingerprint_error="no weights")
    assert v.verdict == "inconclusive"
    assert any(r.startswith("R6") for r in v.reasons)
