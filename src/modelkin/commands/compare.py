"""Compare two models: weight fingerprints and behaviour on the same prompts and device, one verdict.

Writes --json (verdict, reasons, fingerprint, behaviour) and --html (a self-contained page with plots),
and prints a summary. `compare A B C ...` or `--against DIR` compares A with each of the others, reading
A once, into --out (a report per pair and an index). Exit 0 whatever the verdicts; 2 on bad input.
"""

from __future__ import annotations

import argparse
import json

from modelkin.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from modelkin.compare.settings import METRICS, BehaviourSettings

    d = BehaviourSettings()
    parser.add_argument("models", metavar="MODEL", nargs="+",
                        help="A B: two models (HF directory, .gguf, .safetensors, …); A B C …: A against each other")
    parser.add_argument("--against", metavar="DIR",
                        help="compare the first MODEL with every model in DIR (files and model directories)")
    parser.add_argument("--out", metavar="DIR",
                        help="with several candidates: directory for one report per pair plus index.html/"
                             "index.json (default ./modelkin-compare)")
    parser.add_argument("--prompts", metavar="F.jsonl",
                        help='prompt file: one {"prompt": …, "id": …, "category": …} per line (default: built-in set)')
    parser.add_argument("--max-prompts", type=int, default=d.max_prompts,
                        help=f"prompts to use, round-robin over categories (default {d.max_prompts}; 0 = all)")
    parser.add_argument("--html", metavar="F", help="write the HTML report to F")
    parser.add_argument("--methods", help="fingerprint methods, comma-separated (default: all)")
    parser.add_argument("--metrics", help=f"behaviour metrics, comma-separated, out of {','.join(METRICS)} "
                                          "(default: all that apply; naming 'logits' requires equal vocabularies)")
    parser.add_argument("--no-fingerprint", action="store_true", help="skip the weight fingerprints")
    parser.add_argument("--no-behaviour", action="store_true", help="skip running the models")
    parser.add_argument("--greedy-tokens", type=int, default=d.greedy_tokens, help="greedy continuation length")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="top-k set size for the overlap metric")
    parser.add_argument("--mmd-prompts", type=int, default=d.mmd_prompts, help="prompts for the two-sample test")
    parser.add_argument("--mmd-samples", type=int, default=d.mmd_samples, help="samples per prompt and model")
    parser.add_argument("--mmd-tokens", type=int, default=d.mmd_tokens, help="tokens per sample")
    parser.add_argument("--permutations", type=int, default=d.permutations, help="permutations per p-value")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of samples and permutations")
    parser.add_argument("--quiet", action="store_true", help="no summary on the terminal")
    parser.add_argument("--background", metavar="DIR",
                        help="real unrelated models (`modelkin background add`) for the empirical null "
                             "(default: the shipped one)")
    common.add_common(parser)


def settings_from_args(args: argparse.Namespace):
    """BehaviourSettings from the command line (validated there)."""
    from modelkin.compare.settings import METRICS, BehaviourSettings

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else METRICS
    return BehaviourSettings(
        max_prompts=args.max_prompts or None, top_k=args.top_k, greedy_tokens=args.greedy_tokens,
        mmd_prompts=args.mmd_prompts, mmd_samples=args.mmd_samples, mmd_tokens=args.mmd_tokens,
        permutations=args.permutations, seed=args.seed, metrics=metrics, explicit_metrics=bool(args.metrics),
    )


def _pair_options(args: argparse.Namespace) -> dict:
    return {"prompts": args.prompts, "device": args.device, "dtype": args.dtype,
            "methods": [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
            "settings": settings_from_args(args), "fingerprints": not args.no_fingerprint,
            "behaviour": not args.no_behaviour, "allow_fallback": args.allow_fallback,
            "background": common.background_from_args(args)}


def run(args: argparse.Namespace) -> int:
    from modelkin.compare.api import compare
    from modelkin.compare.report.terminal import print_summary
    from modelkin.errors import InputError

    if args.against or len(args.models) > 2:
        return _run_many(args)
    if len(args.models) < 2:
        raise InputError("compare needs two models, or one model and --against DIR",
                         hint="modelkin compare A B, modelkin compare A B C …, or modelkin compare A --against DIR")
    if args.out:
        raise InputError("--out is for several candidates; one pair writes --json and --html",
                         hint="pass --html F (and --json F) for one pair")
    report = compare(args.models[0], args.models[1], **_pair_options(args))
    if args.html:
        report.save_html(args.html)
    common.emit_json(args, report.to_json())
    if not args.quiet:
        console = common.console(args)
        print_summary(report, console)
        if args.html:
            console.print(f"HTML report: {args.html}")
    return 0


def _run_many(args: argparse.Namespace) -> int:
    """The suspect (first MODEL) against every other MODEL and every model in --against."""
    from pathlib import Path

    from modelkin.compare.many import compare_many, models_in
    from modelkin.compare.report.terminal import print_summary
    from modelkin.errors import InputError, ModelkinError

    if args.html:
        raise InputError("--html is for one pair; several candidates get one page each in --out",
                         hint="pass --out DIR")
    suspect, candidates = args.models[0], list(args.models[1:])
    if args.against:
        candidates += [p for p in models_in(args.against) if Path(p).resolve() != Path(suspect).resolve()]
    if not candidates:
        raise InputError(f"no candidate models besides {suspect}", hint="name candidates or a --against DIR")
    out = Path(args.out or "modelkin-compare")
    console = common.console(args)

    def show(name: str, report, seconds: float) -> None:
        if not args.quiet:
            print_summary(report, console)
            console.print(f"{name}: {report.verdict} ({seconds:.0f} s)")

    found = compare_many(suspect, candidates, out_dir=out, on_report=show, **_pair_options(args))
    common.emit_json(args, json.loads((out / "index.json").read_text(encoding="utf-8")))
    if not args.quiet:
        console.print(f"{len(found.reports)} reports in {out}/ (index.html)")
    if found.failures:
        raise ModelkinError(f"{len(found.failures)} comparison(s) failed: "
                            + "; ".join(f"{n}: {e}" for n, e in found.failures.items()))
    return 0
