"""The fuzz harness itself: each invariant it claims to check is checked (on a private counter, so these
deliberate violations stay out of the session's fuzz summary)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modelkin.errors import CheckpointError, ModelkinError
from tests.fuzz import harness
from tests.fuzz.harness import FuzzStats, Violation, run_case


@pytest.fixture(autouse=True)
def private_stats(monkeypatch):
    stats = FuzzStats()
    monkeypatch.setattr(harness, "STATS", stats)
    return stats


def test_modelkin_error_and_result_are_valid_outcomes(private_stats):
    err = run_case("selftest", lambda: (_ for _ in ()).throw(CheckpointError("bad file", hint="fix it")))
    assert isinstance(err, CheckpointError)
    assert run_case("selftest", lambda: 42) == 42
    assert private_stats.outcomes == {"CheckpointError": 1, "ok": 1} and not private_stats.violations


def test_other_exceptions_are_violations(private_stats):
    with pytest.raises(Violation, match="ZeroDivisionError escaped"):
        run_case("selftest", lambda: 1 / 0)
    assert len(private_stats.violations) == 1


def test_multi_line_messages_are_violations():
    class Chatty(ModelkinError):
        def __str__(self) -> str:
            return "line one\nline two"

    def fail():
        raise Chatty("x")

    with pytest.raises(Violation, match="not one readable line"):
        run_case("selftest", fail)


def test_slow_cases_are_interrupted(monkeypatch):
    monkeypatch.setattr(harness, "CASE_SECONDS", 0.3)
    start = time.perf_counter()
    with pytest.raises(Violation, match="ran past 0.3 s"):
        run_case("selftest", lambda: time.sleep(30))
    assert time.perf_counter() - start < 5


def test_large_allocations_are_violations():
    """Run in a fresh interpreter: inside a long pytest process, freed-but-resident memory can absorb
    the allocation without raising the peak."""
    if not harness._reset_peak_rss():
        pytest.skip("peak RSS cannot be reset on this kernel")
    code = (
        "import torch\n"
        "from tests.fuzz.harness import Violation, run_case\n"
        "try:\n"
        "    run_case('selftest', lambda: torch.ones(80_000_000).sum())  # 320 MB, touched\n"
        "except Violation as v:\n"
        "    print('VIOLATION', v)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "VIOLATION" in out.stdout and "peak RSS grew by" in out.stdout, out.stdout


def test_address_space_is_capped_during_a_case():
    """8 GB that would be granted lazily outside a case cannot even be reserved inside one."""
    with pytest.raises(Violation, match="escaped"):
        run_case("selftest", lambda: torch.empty(8 << 30, dtype=torch.uint8))
    assert torch.empty(1 << 20).numel() == 1 << 20  # the cap is lifted afterwards
