"""Score a text with a model: per-token log-probabilities, total NLL and bits per byte."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelkin.commands import common
from modelkin.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="HF model directory or .gguf file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to score")
    source.add_argument("--file", metavar="F", help="score the UTF-8 text of file F")
    common.add_common(parser)


def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        return args.text
    try:
        return Path(args.file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"text file not found: {args.file}", hint="check the --file path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {args.file} as UTF-8 text: {err}") from None


def run(args: argparse.Namespace) -> int:
    from modelkin.runtime.api import load

    text = _read_text(args)
    model = load(args.model, device=common.backend_from_args(args), dtype=args.dtype)
    result = model.score(text)
    print(
        f"bits per byte: {result.bits_per_byte:.4f}  (nll {result.nll:.3f} nats over "
        f"{len(result.tokens)} tokens, {result.n_bytes} bytes; {model.device} "
        f"{str(model.dtype).removeprefix('torch.')})",
        file=sys.stderr if common.json_to_stdout(args) else sys.stdout,
    )
    common.emit_json(
        args,
        {
            "model": str(args.model),
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            **result.to_json(),
        },
    )
    return 0
