"""Per-tensor weight statistics computed on the device, grouped by layer and role.

Streams the checkpoint one tensor at a time (safetensors, GGUF, .bin, ONNX); --select reads only
the tensors asked for; an interrupted scan resumes from its cache.
"""

from __future__ import annotations

import argparse
import dataclasses

from modelkin.commands import common
from modelkin.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="HF directory, .gguf, .bin or .onnx file")
    parser.add_argument("--select", default="all",
                        help="attention, mlp, experts, all (comma-joinable) or a regex on names")
    parser.add_argument("--spectral", action="store_true",
                        help="also singular values, stable/effective rank and power-law alpha")
    parser.add_argument("--sample-experts", type=int, default=None, metavar="N",
                        help="spectral statistics for only N evenly spaced experts per MoE layer")
    parser.add_argument("--csv", metavar="F", help="write one row per tensor to F")
    parser.add_argument("--plot", metavar="F.png", help="plot per-layer std curves to F.png")
    parser.add_argument("--no-cache", action="store_true",
                        help="neither read nor write the resumable cache")
    parser.add_argument("--no-table", action="store_true", help="print only the summary")
    common.add_common(parser, dtype=False)


def run(args: argparse.Namespace) -> int:
    from modelkin.inspect.scan import ScanOptions, scan
    from modelkin.utils import atomic_write_text

    if args.sample_experts is not None and args.sample_experts < 1:
        raise InputError(f"--sample-experts {args.sample_experts} must be at least 1",
                         hint="give a positive number of experts, or leave it out for all")
    backend = common.backend_from_args(args)
    options = ScanOptions(select=args.select, spectral=args.spectral,
                          sample_experts=args.sample_experts, cache=not args.no_cache)
    from modelkin.checkpoint import open_checkpoint
    from modelkin.inspect import sharded

    share = sharded.start(backend)  # under torchrun: tensors split across ranks, results gathered
    if share is not None and not share.is_main:
        options = dataclasses.replace(options, progress=False)
    try:
        with open_checkpoint(args.model) as src:
            result = scan(src, share.device if share else backend.device, options, shard=share)
    finally:
        sharded.finish(share)
    if share is not None and not share.is_main:
        return 0  # rank 0 prints and writes
    if args.csv:
        atomic_write_text(args.csv, result.to_csv())
    if args.plot:
        from modelkin.inspect.plot import plot_std_curves

        plot_std_curves(result, args.plot)
    common.emit_json(args, result.to_json())
    console = common.console(args)
    if args.no_table:
        console.print(result.summary())
    else:
        from modelkin.inspect.report import render_table

        render_table(result, console)
    return 0
