"""Fuzz harness: run one case under the invariants and count cases per reader for the session summary.

Invariants per case: either a ModelkinError whose str() is one readable line, or a correct result;
no other exception type escapes; the case finishes within CASE_SECONDS; peak RSS grows by less than
RSS_GROWTH_LIMIT (the address space is capped too, so a header claiming terabytes cannot allocate).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import faulthandler
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, settings

from modelkin.errors import ModelkinError

CASE_SECONDS = float(os.environ.get("MODELKIN_FUZZ_CASE_SECONDS", "5"))
HARD_SECONDS = 60.0  # the watchdog kills the run if one case hangs in C code past this
RSS_GROWTH_LIMIT = 200 << 20
ADDRESS_HEADROOM = 6 << 30  # allocations beyond current VmSize + this fail with MemoryError
MAX_MESSAGE = 2000


class CaseTimeout(BaseException):
    """Raised by the alarm inside a case that ran past CASE_SECONDS (BaseException: no reader swallows it)."""


class Violation(AssertionError):
    """An invariant failed; hypothesis shrinks and reports the input."""


@dataclasses.dataclass
class FuzzStats:
    cases: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    violations: list[str] = dataclasses.field(default_factory=list)
    slowest: float = 0.0
    max_rss_growth: int = 0
    rss_measured: bool = True  # False where /proc/self/clear_refs cannot reset the peak

    def summary(self) -> str:
        total = sum(self.cases.values())
        per = ", ".join(f"{k} {v}" for k, v in sorted(self.cases.items()))
        ok = self.outcomes.get("ok", 0)
        return (
            f"modelkin fuzz: {total} cases ({per}); {len(self.violations)} violations; "
            f"{ok} correct results, {total - ok - len(self.violations)} ModelkinErrors; "
            f"slowest case {self.slowest:.2f} s (bound {CASE_SECONDS:.0f} s); "
            f"max peak-RSS growth {self.max_rss_growth / 2**20:.1f} MB (bound {RSS_GROWTH_LIMIT >> 20} MB"
            f"{'' if self.rss_measured else ', not measurable here; address space still capped'})"
        )


STATS = FuzzStats()


def examples(quick: int) -> int:
    """max_examples for one fuzz test: ``quick`` in CI, MODELKIN_FUZZ_EXAMPLES for the long local mode."""
    env = os.environ.get("MODELKIN_FUZZ_EXAMPLES")
    return int(env) if env else quick


def fuzz_settings(quick: int) -> settings:
    """Deterministic hypothesis settings: no database, derandomized, no per-example deadline."""
    return settings(
        max_examples=examples(quick),
        deadline=None,
        derandomize=not os.environ.get("MODELKIN_FUZZ_EXAMPLES"),
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


_case_started: list[float] = []  # the running case's start time; the watchdog reads it


def _watchdog() -> None:
    """A case stuck in C code never sees SIGALRM: dump every thread's stack and end the run."""
    while True:
        time.sleep(1.0)
        started = _case_started[0] if _case_started else None
        if started is not None and time.monotonic() - started > HARD_SECONDS:
            print(f"modelkin fuzz: a case hung for {HARD_SECONDS:.0f} s; aborting", file=sys.__stderr__)
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
            os._exit(70)


_watchdog_thread: list[threading.Thread] = []


@contextlib.contextmanager
def scratch_dir(name: str) -> Iterator[Path]:
    """A scratch directory for case files, on tmpfs when there is one (directory churn is 20x faster)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=f"modelkin-{name}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fresh(path: Path) -> Path:
    """Empty ``path`` (a case directory) and return it."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@contextlib.contextmanager
def _bounded() -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"case ran past {CASE_SECONDS} s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_as = resource.getrlimit(resource.RLIMIT_AS)
    cap = _proc_status("VmSize") + ADDRESS_HEADROOM
    if old_as[0] == resource.RLIM_INFINITY or old_as[0] > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, old_as[1]))
    if not _watchdog_thread:
        _watchdog_thread.append(threading.Thread(target=_watchdog, name="fuzz-watchdog", daemon=True))
        _watchdog_thread[0].start()
    _case_started[:] = [time.monotonic()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # cases are tiny: a second intra-op thread only adds spin-wait on 2 cores
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        torch.set_num_threads(threads)
        _case_started.clear()
        resource.setrlimit(resource.RLIMIT_AS, old_as)
        signal.signal(signal.SIGALRM, old_handler)


def check_error(err: ModelkinError) -> None:
    """A ModelkinError is a valid outcome when its message is one non-empty readable line."""
    text = str(err)
    if not text or "\n" in text or "\r" in text or len(text) > MAX_MESSAGE:
        raise Violation(f"{type(err).__name__} message is not one readable line: {text[:300]!r}")


def _violation(reader: str, what: str) -> Violation:
    STATS.violations.append(f"{reader}: {what}")
    return Violation(what)


_warm: list[bool] = []


def _warm_up() -> None:
    """Trigger torch's lazy imports (torch._dynamo, on the first meta-device init) outside the timer:
    an alarm inside a half-done import would leave the module broken for every later case."""
    if not _warm:
        with torch.device("meta"):
            torch.nn.Embedding(2, 2)
        _warm.append(True)


def run_case(reader: str, action: Callable[[], Any]) -> Any:
    """Run ``action`` under the invariants; return its result or the ModelkinError it raised.

    Raises:
        Violation: another exception escaped, the message is not one line, the case ran too
            long or its peak RSS grew too much.
    """
    STATS.cases[reader] += 1
    _warm_up()
    rss_before = _proc_status("VmRSS")
    measured = _reset_peak_rss()
    STATS.rss_measured = STATS.rss_measured and measured
    start = time.perf_counter()
    outcome: Any
    try:
        with _bounded():
            try:
                outcome = action()
            except ModelkinError as err:
                outcome = err
    except CaseTimeout:
        raise _violation(reader, f"case ran past {CASE_SECONDS} s") from None
    except Violation as err:
        STATS.violations.append(f"{reader}: {err}")
        raise
    except Exception as err:  # noqa: BLE001 - exactly what the invariant forbids
        tb = "".join(traceback.format_exception(err)[-6:])
        raise _violation(reader, f"{type(err).__name__} escaped: {err}\n{tb}") from None
    elapsed = time.perf_counter() - start
    growth = _proc_status("VmHWM") - rss_before if measured else 0
    STATS.slowest = max(STATS.slowest, elapsed)
    STATS.max_rss_growth = max(STATS.max_rss_growth, growth)
    if elapsed > CASE_SECONDS:
        raise _violation(reader, f"case took {elapsed:.1f} s")
    if growth > RSS_GROWTH_LIMIT:
        raise _violation(reader, f"peak RSS grew by {growth >> 20} MB")
    if isinstance(outcome, ModelkinError):
        try:
            check_error(outcome)
        except Violation as err:
            raise _violation(reader, str(err)) from None
        STATS.outcomes[type(outcome).__name__] += 1
    else:
        STATS.outcomes["ok"] += 1
    return outcome


def report(stream: Any = None) -> None:
    """Print the summary line (used by the pytest terminal summary hook)."""
    if sum(STATS.cases.values()):
        print(STATS.summary(), file=stream or sys.stderr)
        for line in STATS.violations[:20]:
            print(f"  violation: {line.splitlines()[0]}", file=stream or sys.stderr)
