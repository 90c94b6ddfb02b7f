"""Write a small random checkpoint of a supported architecture in its real on-disk layout
(config.json, generation_config.json, model.safetensors, tokenizer files), for tests and examples."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from modelkin.commands import common
    from modelkin.synth.tiny import TINY

    parser.add_argument("arch", metavar="ARCH", choices=sorted(TINY), help=", ".join(sorted(TINY)))
    parser.add_argument("outdir", metavar="OUTDIR", help="directory to write (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--no-tokenizer", action="store_true", help="write weights and configs only")
    common.add_json(parser)


def run(args: argparse.Namespace) -> int:
    from modelkin.commands import common
    from modelkin.synth.tiny import make_tiny

    path = make_tiny(args.arch, args.outdir, seed=args.seed, tokenizer=not args.no_tokenizer)
    files = sorted(p.name for p in path.iterdir())
    out = sys.stderr if common.json_to_stdout(args) else sys.stdout
    print(f"wrote tiny {args.arch} checkpoint to {path}: {', '.join(files)}", file=out)
    common.emit_json(args, {"arch": args.arch, "path": str(path), "seed": args.seed, "files": files})
    return 0
