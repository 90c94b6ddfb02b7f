"""The comparison report: JSON, HTML and a rich terminal summary, plus the progress display of a run."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modelkin.errors import InputError
from modelkin.utils import atomic_write_text

SCHEMA = "modelkin-compare/1"


@dataclasses.dataclass(kw_only=True)
class ComparisonReport:
    """What `modelkin compare A B` found.

    Attributes:
        verdict: "related", "unrelated" or "inconclusive" (rules in modelkin.compare.verdict).
        reasons: why, with the p-values behind it, most decisive first.
        evidence: the weight methods with raw and Holm-adjusted p-values.
        fingerprint: the fingerprint report's JSON (None when not run or failed: see fingerprint_error).
        behaviour: behavioural metrics (None when not run), including ``per_prompt`` details.
        models: {"a": {...}, "b": {...}}: name, path, model_type, is_moe, logits_size.
    """

    verdict: str
    reasons: list[str]
    evidence: list[dict[str, Any]]
    fingerprint: dict[str, Any] | None
    fingerprint_error: str | None
    behaviour: dict[str, Any] | None
    models: dict[str, dict[str, Any]]
    device: str
    dtype: str
    settings: dict[str, Any]
    timings: dict[str, float]
    rules: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **dataclasses.asdict(self)}

    def save_json(self, path: str | Path) -> None:
        """Write the JSON report atomically."""
        from modelkin.utils import to_json_text

        _write(path, to_json_text(self.to_json()))

    def save_html(self, path: str | Path) -> None:
        """Write the self-contained HTML report atomically."""
        from modelkin.compare.html import render_html

        _write(path, render_html(self.to_json()))


def _write(path: str | Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}", hint="choose a writable path") from err


def print_summary(report: dict[str, Any], console: Any) -> None:
    """Verdict, fingerprint table and behaviour table as rich output."""
    from rich.panel import Panel
    from rich.table import Table

    from modelkin.compare.html import behaviour_rows, fmt

    models = report.get("models") or {}
    names = f"{models.get('a', {}).get('name', 'A')}  vs  {models.get('b', {}).get('name', 'B')}"
    verdict = report["verdict"]
    colour = {"related": "red", "unrelated": "green"}.get(verdict, "yellow")
    body = "\n".join(f"• {r}" for r in report.get("reasons", []))
    console.print(Panel(body, title=f"[bold]{names} — verdict: [{colour}]{verdict.upper()}[/]", expand=False), soft_wrap=False)
    fp = report.get("fingerprint")
    if fp:
        table = Table(title="weight fingerprints", title_justify="left")
        for col in ("method", "score", "p-value", "Holm p", "call"):
            table.add_column(col, justify="right" if col not in ("method", "call") else "left")
        holm = {e["method"]: e.get("p_holm") for e in report.get("evidence", [])}
        for name, m in (fp.get("methods") or {}).items():
            table.add_row(name, fmt(m.get("score")), fmt(m.get("p_value")), fmt(holm.get(name)),
                          m.get("call", "") + (f" ({m['skipped']})" if m.get("skipped") else ""))
        console.print(table, soft_wrap=False)
    elif report.get("fingerprint_error"):
        console.print(f"weight fingerprints: not available ({report['fingerprint_error']})")
    b = report.get("behaviour")
    if b:
        table = Table(title=f"behaviour ({b.get('n_prompts')} prompts)", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("note", style="dim")
        for label, value, note in behaviour_rows(b):
            table.add_row(label, fmt(value), note or "")
        console.print(table, soft_wrap=False)


@contextlib.contextmanager
def progress(enabled: bool | None = None) -> Iterator[Callable[[str], None]]:
    """A spinner with the current step and elapsed time on stderr; yields ``tick(description)``.

    ``enabled=None`` shows it only when stderr is a terminal; the steps are logged either way at the end.
    """
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        yield lambda _msg: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def tick(message: str) -> None:
            bar.update(task, description=message)

        yield tick
