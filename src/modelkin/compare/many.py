"""One suspect against several candidates: ``compare_many`` reads and runs the suspect once, and each pair's
report equals ``compare(suspect, candidate)``; ``models_in`` lists the models of a directory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelkin.backends import get_backend
from modelkin.checkpoint import open_checkpoint
from modelkin.compare.api import PairRun, _check_halves, _name, trim_heap
from modelkin.compare.behaviour.outputs import OutputCache
from modelkin.compare.behaviour.prompts import PromptsArg, resolve_prompts
from modelkin.compare.fingerprints.weights import open_weights
from modelkin.compare.report.document import ComparisonReport
from modelkin.compare.report.index import ComparisonSet, ReportSet, candidate_names, new_counters, slug
from modelkin.compare.report.terminal import progress
from modelkin.compare.settings import BehaviourSettings
from modelkin.errors import InputError, ModelkinError

__all__ = ["ComparisonSet", "compare_many", "models_in"]


def compare_many(
    suspect: str | os.PathLike[str],
    candidates: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]],
    prompts: PromptsArg = None,
    device: str = "auto",
    *,
    dtype: str = "auto",
    methods: Sequence[str] | None = None,
    settings: BehaviourSettings | None = None,
    fingerprints: bool = True,
    fingerprint_options: Mapping[str, Mapping[str, Any]] | None = None,
    behaviour: bool = True,
    allow_fallback: bool | None = None,
    cache: OutputCache | None = None,
    show_progress: bool | None = None,
    background: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    on_report: Callable[[str, ComparisonReport, float], None] | None = None,
) -> ComparisonSet:
    """Compare one suspect with several candidates, reading and running the suspect once.

    Each pair's report equals ``compare(suspect, candidate, ...)`` with the same arguments. The suspect's
    checkpoint stays open for the weight fingerprints of every pair and its behaviour outputs are computed
    once; one model is resident at a time. Every path is checked before any work starts.

    Args:
        suspect: the model every candidate is compared with (side A of each report).
        candidates: checkpoint paths, or {name: path}; names label the reports (default: the file names).
        out_dir: write ``<suspect>-vs-<name>.json/.html`` per pair and index.json/index.html there.
        on_report: called with (name, report, seconds) as each pair finishes.
        Other arguments: as for ``compare``.

    Returns:
        ComparisonSet: ``reports`` by candidate name, ``failures`` (name -> one-line error), ``counters``
        per model (loads, checkpoint opens, tensors and bytes read, outputs computed and reused).

    Raises:
        InputError, CheckpointError: bad settings, no candidates, a path that is not a readable checkpoint.
        ModelkinError: the suspect cannot be loaded or run (a candidate's failure is recorded instead).

    Example:
        >>> from modelkin.compare.many import compare_many
        >>> found = compare_many("base.gguf", ["ft_dir", "other.gguf"], out_dir="reports")
        >>> {name: r.verdict for name, r in found.reports.items()}
    """
    settings = settings or BehaviourSettings()
    _check_halves(fingerprints, behaviour)
    named = candidate_names(candidates)
    # headers only: a bad path fails here, before anything is written; the suspect's stays open for the
    # fingerprints (a GGUF's metadata, ~2 s for a 49k vocabulary, is parsed once)
    held = open_checkpoint(suspect)
    try:
        for path in named.values():
            open_checkpoint(path).close()
    except BaseException:
        held.close()
        raise
    writer = ReportSet(out_dir, suspect_name=slug(_name(suspect))) if out_dir is not None else None
    chosen = resolve_prompts(prompts, settings.max_prompts) if behaviour else []
    run = PairRun(chosen=chosen, settings=settings, device=device, dtype=dtype, methods=methods,
                   fingerprints=fingerprints, fingerprint_options=fingerprint_options, behaviour=behaviour,
                   allow_fallback=allow_fallback, cache=cache, background=background)
    found = ComparisonSet(suspect=str(suspect), settings=settings.to_json())
    found.counters["suspect"] = new_counters(suspect)
    theirs = found.counters["candidates"] = {name: new_counters(path) for name, path in named.items()}
    ours = found.counters["suspect"]
    start = time.perf_counter()
    with progress(show_progress) as tick:
        # weights first, the suspect's ModelWeights (and its memo) open across pairs and closed before any
        # model runs, so that one model is resident at a time
        try:
            prints = _fingerprint_all(run, held, named, ours, theirs, tick) if fingerprints else {}
        finally:
            held.close()
        # the suspect's memo went with _fingerprint_all's frame: hand its pages back before any load
        trim_heap()
        out_a = None
        for i, (name, path) in enumerate(named.items(), 1):
            step = (lambda m, i=i, name=name: tick(f"[{i}/{len(named)}] {name}: {m}"))
            mine = theirs[name]
            t = time.perf_counter()
            try:
                if behaviour and out_a is None:  # the suspect runs once, at the first pair that needs it
                    out_a, computed = run.outputs(suspect, side="a", tick=step)
                    _count_outputs(ours, computed)
                if behaviour:
                    ours["outputs_reused"] += i > 1
                report = run.pair(suspect, path, tick=step, out_a=out_a, fingerprinted=prints.get(name),
                                  on_outputs=lambda _side, computed, mine=mine: _count_outputs(mine, computed))
            except ModelkinError as err:
                if behaviour and out_a is None:
                    raise  # the suspect itself failed: every pair would
                found.failures[name] = str(err)
                continue
            finally:
                trim_heap()  # the candidate's model and the metrics' temporaries are gone
            seconds = time.perf_counter() - t + (prints[name][2] if name in prints else 0.0)
            found.reports[name] = report
            found.seconds[name] = seconds
            if writer is not None:
                writer.add(name, report, seconds=seconds)
            if on_report is not None:
                on_report(name, report, seconds)
    found.timings["total_s"] = time.perf_counter() - start
    if writer is not None:
        writer.finish(found)
    return found


def models_in(directory: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints directly inside ``directory`` (model files and model directories), sorted by name.

    Raises:
        InputError: the directory is missing, is itself one model, or holds no model.
    """
    from modelkin.checkpoint.detect import sniff_file

    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise InputError(f"--against {folder}: not a directory", hint="pass a directory of models")
    if (folder / "config.json").is_file():
        raise InputError(f"--against {folder} is one model (it has config.json), not a directory of models",
                         hint="pass it as a candidate, or pass the directory that holds the models")
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_file() and sniff_file(entry) is None:
                continue
            open_checkpoint(entry).close()
        except ModelkinError:
            continue
        found.append(entry)
    if not found:
        raise InputError(f"--against {folder} holds no models (model directories or .safetensors, .gguf, .bin, "
                         ".onnx files)", hint="pass the directory that holds the candidate models")
    return found


def _fingerprint_all(run: PairRun, suspect: Any, named: Mapping[str, Any], ours: dict[str, Any],
                     theirs: dict[str, dict[str, Any]], tick: Callable[[str], None]
                     ) -> dict[str, tuple[Any, str | None, float]]:
    """Every pair's weight fingerprints, the suspect's checkpoint opened once (its memo serves every pair)."""
    device = get_backend(run.device, allow_fallback=run.allow_fallback).device
    prints = {}
    with open_weights(suspect, device) as weights_a:
        ours["checkpoint_opens"] += 1
        for i, (name, path) in enumerate(named.items(), 1):
            step = (lambda m, i=i, name=name: tick(f"[{i}/{len(named)}] {name}: {m}"))
            try:
                with open_weights(path, device) as weights_b:
                    theirs[name]["checkpoint_opens"] += 1
                    prints[name] = run.fingerprint(weights_a, weights_b, tick=step)
                    _count_reads(theirs[name], weights_b)
            except ModelkinError as err:  # the pair's report says why, as compare() would
                prints[name] = (None, str(err), 0.0)
            _count_reads(ours, weights_a)
            trim_heap()
    return prints


def _count_reads(counters: dict[str, Any], weights: Any) -> None:
    stats = getattr(weights, "stats", None) or {}
    counters.update(tensors_read=stats.get("tensors_read", weights.source.tensors_read),
                    bytes_read=stats.get("bytes_read", weights.source.bytes_read),
                    **{k: v for k, v in stats.items() if k in ("memo_hits", "memo_misses")})


def _count_outputs(counters: dict[str, Any], computed: bool) -> None:
    counters["outputs_computed" if computed else "outputs_reused"] += 1
    counters["loads"] += computed
    counters["checkpoint_opens"] += computed
