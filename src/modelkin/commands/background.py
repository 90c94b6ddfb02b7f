"""Manage a background of real unrelated models: `background add MODEL` stores its compact record (std curves,
per-layer spectra, vocabulary hash, shape, stratum), `background list` shows what a background holds.

`fingerprint` and `compare` take --background DIR (default: the one shipped with modelkin) and place each
score among the scores of the background's unrelated pairs; with N >= 99 pairs in every stratum that
empirical null decides. Add only models you trust to be unrelated to each other and to what you compare.
"""

from __future__ import annotations

import argparse

from modelkin.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    add = sub.add_parser("add", help="store a model's record in a background directory")
    add.add_argument("model", metavar="MODEL", help="checkpoint (HF directory, .gguf, .safetensors, .bin)")
    add.add_argument("--dir", required=True, help="background directory (created when absent)")
    add.add_argument("--label", help="name in reports (default: the checkpoint's file or directory name)")
    add.add_argument("--stratum", default="cross-family",
                     help="kind of unrelatedness: cross-family (default), same-family-other-size, seed-only "
                          "(trained from scratch with its own seed), or any name")
    common.add_common(add, dtype=False)
    show = sub.add_parser("list", help="the models and strata of a background")
    show.add_argument("--dir", help="background directory (default: the shipped one)")
    common.add_json(show)


def _add(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modelkin.compare.fingerprints import background

    bg_dir = background.init(args.dir)
    bg = background.load(bg_dir)
    label = args.label or Path(args.model).name
    device = common.backend_from_args(args).device
    record = background.make_record(args.model, label=label, stratum=args.stratum, device=device)
    path = bg.add(record)
    size = sum(f.stat().st_size for f in path.parent.glob(f"{path.stem}.*"))
    common.emit_json(args, {"dir": str(bg_dir), "label": label, "stratum": args.stratum, "bytes": size,
                            "layers": record.layers, "hidden_size": record.hidden_size,
                            "notes": record.notes})
    console = common.console(args)
    console.print(f"added {label} ({args.stratum}, {record.layers} layers, hidden {record.hidden_size}) to "
                  f"{bg_dir}: {size / 1e3:.1f} kB" + "".join(f"; {n}" for n in record.notes))
    return 0


def _list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from modelkin.compare.fingerprints import background

    bg = background.load(args.dir)
    rows = [{"label": r.label, "stratum": r.stratum, "architecture": r.architecture, "layers": r.layers,
             "hidden_size": r.hidden_size, "vocab_size": r.vocab_size,
             "methods": [m for m in background.METHODS if r.stats(m) is not None]} for r in bg.records]
    strata = {s: {"models": len(rs), "pairs": len(rs) * (len(rs) - 1) // 2} for s, rs in bg.strata().items()}
    common.emit_json(args, {"dir": str(bg.path), "models": rows, "strata": strata})
    console = common.console(args)
    table = Table(title=f"background {bg.path} ({len(rows)} models)", title_justify="left")
    for col in ("label", "stratum", "architecture", "layers", "hidden", "vocab", "methods"):
        table.add_column(col, justify="right" if col in ("layers", "hidden", "vocab") else "left")
    for r in rows:
        table.add_row(r["label"], r["stratum"], r["architecture"], str(r["layers"]), str(r["hidden_size"]),
                      str(r["vocab_size"] or "–"), ",".join(r["methods"]))
    console.print(table)
    for s, v in strata.items():
        console.print(f"stratum {s}: {v['models']} models, {v['pairs']} unrelated pairs among them")
    return 0


def run(args: argparse.Namespace) -> int:
    return _add(args) if args.action == "add" else _list(args)
