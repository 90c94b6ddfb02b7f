"""Several comparisons of one suspect: the ComparisonSet, its index rows, and the directory of reports
(one JSON + HTML per pair, index.json + index.html) written atomically as each pair finishes."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modelkin.compare.behaviour.result import BehaviourResult
from modelkin.compare.report.document import ComparisonReport
from modelkin.errors import InputError
from modelkin.utils import atomic_write_text, to_json_text

SCHEMA = "modelkin-compare-index/1"
COUNTERS = ("loads", "checkpoint_opens", "tensors_read", "bytes_read", "outputs_computed", "outputs_reused")


@dataclasses.dataclass(kw_only=True)
class ComparisonSet:
    """What ``compare_many`` found: one report per candidate, failures, and what each model cost.

    Attributes:
        reports: candidate name -> ComparisonReport (the suspect is side A of each).
        failures: candidate name -> one-line error of a pair that could not be compared.
        counters: {"suspect": {...}, "candidates": {name: {...}}}: loads, checkpoint_opens,
            tensors_read and bytes_read (weight fingerprints), outputs_computed and outputs_reused.
    """

    suspect: str
    settings: dict[str, Any]
    reports: dict[str, ComparisonReport] = dataclasses.field(default_factory=dict)
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    counters: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "suspect": self.suspect, "settings": self.settings,
                "comparisons": [index_row(n, r, seconds=self.seconds.get(n)) for n, r in self.reports.items()],
                "failures": dict(self.failures), "counters": self.counters, "timings": self.timings}


def new_counters(path: str | os.PathLike[str]) -> dict[str, Any]:
    return {"path": str(path), **dict.fromkeys(COUNTERS, 0)}


def slug(name: str) -> str:
    """A file-name-safe form of a model name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.") or "model"


def candidate_names(candidates: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]]
                    ) -> dict[str, str | os.PathLike[str]]:
    """{name: path}: given names, or file names (without the extension) made unique with -2, -3, ..."""
    if isinstance(candidates, Mapping):
        named = {slug(str(k)): v for k, v in candidates.items()}
        if len(named) != len(candidates):
            raise InputError("two candidates have the same name once made file-name safe",
                             hint="give every candidate a distinct name")
    else:
        named = {}
        for path in candidates:
            p = Path(path)
            base = slug(p.stem if p.suffix in (".gguf", ".safetensors", ".bin", ".pt", ".onnx") else p.name)
            name, n = base, 1
            while name in named:
                n += 1
                name = f"{base}-{n}"
            named[name] = path
    if not named:
        raise InputError("no candidate models to compare with", hint="name at least one candidate model")
    return named


def index_row(name: str, report: ComparisonReport, *, href: str | None = None, seconds: float | None = None,
              **extra: Any) -> dict[str, Any]:
    """One index row: the verdict and headline numbers of a report, plus ``extra`` columns."""
    b = report.behaviour or BehaviourResult()
    tested = [e for e in report.evidence if e.get("p_value") is not None and e.get("decides")]
    return {"name": name, **{k: v for k, v in extra.items() if k in ("about", "expected", "right")},
            "href": href, "verdict": report.verdict,
            "js_divergence": b.js_divergence, "top1_agreement": b.top1_agreement,
            "greedy_text_similarity": b.greedy_text_similarity, "bpb_correlation": b.bpb_correlation,
            "bpb_p_value": b.bpb_p_value, "mmd_p_value": (b.mmd or {}).get("p_value"),
            "weights_significant": f"{sum(e['significant'] for e in tested)}/{len(tested)}",
            **{k: v for k, v in extra.items() if k not in ("about", "expected", "right")},
            "seconds": None if seconds is None else round(seconds, 1)}


class ReportSet:
    """A directory of pair reports and their index; nothing is created before the first report.

    Args:
        out_dir: where the files go (created when the first report is written).
        suspect_name: the prefix of each pair's file names, ``<suspect_name>-vs-<candidate>``.
        title / intro: the index page's heading and text.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, suspect_name: str, title: str | None = None,
                 intro: str = ""):
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out} exists and is not a directory", hint="pass a directory path")
        self.suspect_name = suspect_name
        self.title = title or f"modelkin compare: {suspect_name} vs {{n}} candidates"
        self.intro = intro
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, report: ComparisonReport, *, seconds: float | None = None,
            **extra: Any) -> dict[str, Any]:
        """Write this pair's JSON and HTML; returns its index row (with ``extra`` columns)."""
        stem = f"{self.suspect_name}-vs-{name}"
        report.save_html(self.out / f"{stem}.html")
        report.save_json(self.out / f"{stem}.json")
        row = index_row(name, report, href=f"{stem}.html", seconds=seconds, json=f"{stem}.json", **extra)
        self.rows.append(row)
        return row

    def finish(self, found: ComparisonSet | None = None, *, intro: str | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write index.json and index.html; returns the index's JSON."""
        from modelkin.compare.report.html import render_index

        data = {"schema": SCHEMA, **(found.to_json() if found is not None else {}), "comparisons": self.rows,
                **dict(extra or {})}
        title = self.title.replace("{n}", str(len(self.rows) + len(data.get("failures") or {})))
        page = render_index(self.rows, title, self.intro if intro is None else intro,
                            counters=data.get("counters"), failures=data.get("failures"))
        try:
            atomic_write_text(self.out / "index.json", to_json_text(data))
            atomic_write_text(self.out / "index.html", page)
        except OSError as err:
            raise InputError(f"cannot write the index into {self.out}: {err.strerror or err}",
                             hint="pass a writable output directory") from err
        return data
