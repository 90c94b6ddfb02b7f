"""Compare two models: weight fingerprints and behaviour on the same prompts and device, one verdict.

Writes --json (verdict, reasons, fingerprint, behaviour) and --html (a self-contained page with plots),
and prints a summary. Exit 0 whatever the verdict; 2 on bad input.
"""

from __future__ import annotations

import argparse

from modelkin.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from modelkin.compare.settings import METRICS, BehaviourSettings

    d = BehaviourSettings()
    parser.add_argument("a", metavar="A", help="first model (HF directory, .gguf, .safetensors, …)")
    parser.add_argument("b", metavar="B", help="second model")
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


def run(args: argparse.Namespace) -> int:
    from modelkin.compare.api import compare
    from modelkin.compare.report.terminal import print_summary

    report = compare(
        args.a, args.b, prompts=args.prompts, device=args.device, dtype=args.dtype,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
        settings=settings_from_args(args), fingerprints=not args.no_fingerprint,
        behaviour=not args.no_behaviour, allow_fallback=args.allow_fallback,
        background=common.background_from_args(args),
    )
    if args.html:
        report.save_html(args.html)
    common.emit_json(args, report.to_json())
    if not args.quiet:
        console = common.console(args)
        print_summary(report, console)
        if args.html:
            console.print(f"HTML report: {args.html}")
    return 0
