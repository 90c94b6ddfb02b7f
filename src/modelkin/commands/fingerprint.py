"""Weight fingerprints of two models, each with a score, a p-value under a stated null, and a call.

Methods: std_curve (HonestAGI), pcs (HuRef), invariants (HuRef ICS-style), spectral (GhostSpec-style),
permtest (Zhu et al.), upcycle (MoE from dense). Call: related if p < 0.01, unrelated if p >= 0.05,
inconclusive between; methods that do not fit the pair are listed as skipped with the reason.
"""

from __future__ import annotations

import argparse

from modelkin.commands import common
from modelkin.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="first model (HF directory, .gguf, .safetensors, .bin, .onnx)")
    parser.add_argument("b", metavar="B", help="second model")
    parser.add_argument("--methods", help="comma-separated: std_curve,pcs,invariants,spectral,permtest,upcycle "
                                          "(default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every surrogate and permutation (default 0)")
    parser.add_argument("--null-library", metavar="DIR|FILE",
                        help="std curves of unrelated models (files written by --save-curves): adds a z-score")
    parser.add_argument("--save-curves", metavar="FILE", help="write both models' std curves to FILE (JSON)")
    parser.add_argument("--extra-curves", action="store_true",
                        help="std_curve also compares q/k/v bias and attention-norm curves where present")
    parser.add_argument("--plot", metavar="F.png", help="overlay both models' std curves per projection")
    parser.add_argument("--background", metavar="DIR",
                        help="real unrelated models (`modelkin background add`) for the empirical null "
                             "(default: the shipped one)")
    common.add_common(parser, dtype=False)


def _table(report, console) -> None:
    from rich.table import Table

    from modelkin.compare.fingerprints.empirical import null_label, rank_text
    from modelkin.compare.fingerprints.result import CALL_RULE

    table = Table(title=f"fingerprints: {report.a}  vs  {report.b}", title_justify="left")
    for col in ("method", "null", "score", "p-value", "Holm p", "z", "call", "among real unrelated pairs / note"):
        table.add_column(col, justify="right" if col in ("score", "p-value", "Holm p", "z") else "left")
    colour = {"related": "red", "unrelated": "green", "inconclusive": "yellow", "skipped": "dim",
              "descriptive": "dim"}

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.4g}"

    for name, r in report.methods.items():
        note = r.skipped or rank_text(r)
        table.add_row(name, null_label(r), fmt(r.score), fmt(r.p_value), fmt(report.p_holm.get(name)), fmt(r.z),
                      f"[{colour.get(r.call, '')}]{r.call}[/]", note)
    console.print(table)
    console.print(f"verdict: [bold]{report.verdict}[/]  (device {report.device}, seed {report.seed})")
    console.print(f"[dim]rule: {CALL_RULE}[/]")


def _curves(report):
    from modelkin.compare.fingerprints.std_curve import StdCurves

    result = report.methods.get("std_curve")
    if result is None or result.skipped or "curves" not in result.details:
        raise InputError("--save-curves and --plot need the std_curve method",
                         hint="add std_curve to --methods (or leave --methods out)")
    curves = result.details["curves"]
    return StdCurves.from_json(curves["a"]), StdCurves.from_json(curves["b"]), result.details.get("r")


def _done(console):
    def show(result) -> None:
        io = result.details.get("io") or {}
        read = sum(int(side.get("bytes_read", 0)) for side in io.values())
        console.print(f"[dim]  {result.name}: {result.seconds:.1f} s, read {read / 1e6:.1f} MB[/]")
    return show


def run(args: argparse.Namespace) -> int:
    from modelkin.compare.api import fingerprint

    console = common.console(args)
    options = {"std_curve": {"extra": True}} if args.extra_curves else None
    report = fingerprint(args.a, args.b, methods=args.methods, device=args.device, seed=args.seed,
                         allow_fallback=args.allow_fallback, null_library=args.null_library, options=options,
                         background=common.background_from_args(args),
                         progress=lambda name: console.print(f"[dim]running {name}…[/]"),
                         on_result=_done(console))
    if args.save_curves or args.plot:
        ca, cb, r = _curves(report)
        if args.save_curves:
            from modelkin.compare.fingerprints.std_curve import save_curves

            save_curves([ca, cb], args.save_curves)
        if args.plot:
            from modelkin.compare.report.plots import std_curves_png
            from modelkin.utils import atomic_write_bytes

            png = std_curves_png(ca.curves, cb.curves, (ca.label, cb.label), r=r,
                                 title=f"std curves: {ca.label} vs {cb.label}")
            if png is None:
                raise InputError("--plot: the two models share no attention projection to draw")
            atomic_write_bytes(args.plot, png)
    common.emit_json(args, report.to_json())
    _table(report, console)
    return 0
