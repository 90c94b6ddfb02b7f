"""The terminal view of a comparison (rich panels and tables) and the progress display of a run."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from modelkin.compare.fingerprints.empirical import null_label, rank_text
from modelkin.compare.report.document import ComparisonReport
from modelkin.compare.report.rows import behaviour_rows, fmt


def print_summary(report: ComparisonReport, console: Any) -> None:
    """Verdict, fingerprint table and behaviour table as rich output."""
    from rich.panel import Panel
    from rich.table import Table

    models = report.models or {}
    names = f"{models.get('a', {}).get('name', 'A')}  vs  {models.get('b', {}).get('name', 'B')}"
    verdict = report.verdict
    colour = {"related": "red", "unrelated": "green"}.get(verdict, "yellow")
    body = "\n".join(f"• {r}" for r in report.reasons)
    console.print(Panel(body, title=f"[bold]{names} — verdict: [{colour}]{verdict.upper()}[/]", expand=False), soft_wrap=False)
    fp = report.fingerprint
    if fp:
        table = Table(title="weight fingerprints", title_justify="left")
        for col in ("method", "null", "score", "p-value", "Holm p", "call", "among real unrelated pairs"):
            table.add_column(col, justify="right" if col in ("score", "p-value", "Holm p") else "left")
        holm = {e["method"]: e.get("p_holm") for e in report.evidence}
        for name, m in fp.methods.items():
            table.add_row(name, null_label(m), fmt(m.score), fmt(m.p_value), fmt(holm.get(name)),
                          m.call + (f" ({m.skipped})" if m.skipped else ""), rank_text(m))
        console.print(table, soft_wrap=False)
    elif report.fingerprint_error:
        console.print(f"weight fingerprints: not available ({report.fingerprint_error})")
    b = report.behaviour
    if b:
        table = Table(title=f"behaviour ({b.n_prompts} prompts)", title_justify="left")
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
