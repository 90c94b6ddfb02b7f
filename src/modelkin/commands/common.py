"""Options and output helpers shared by the commands: --json, --device, --dtype, --allow-fallback."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from modelkin.errors import InputError
from modelkin.utils import atomic_write_text, to_json_text  # noqa: F401 (re-exported)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE|-", help="write the result as JSON to FILE, or to stdout with -")


def add_device(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    parser.add_argument("--device", default="auto", help="auto (npu > cuda > cpu), cpu, cuda[:i] or npu[:i]")
    parser.add_argument(
        "--allow-fallback", action="store_true", default=None,
        help="run on CPU with a warning if the device is unavailable (or MODELKIN_ALLOW_FALLBACK=1)",
    )
    if dtype:
        parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")


def add_common(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """--json, --device, --allow-fallback and (optionally) --dtype."""
    add_json(parser)
    add_device(parser, dtype=dtype)


def backend_from_args(args: argparse.Namespace):
    """The Backend for --device / --allow-fallback; raises DeviceError with the reason when unusable."""
    from modelkin.backends import get_backend

    return get_backend(getattr(args, "device", "auto"), allow_fallback=getattr(args, "allow_fallback", None))


def json_to_stdout(args: argparse.Namespace) -> bool:
    return getattr(args, "json", None) == "-"


def console(args: argparse.Namespace | None = None):
    """A rich Console for human output: stderr when --json - keeps stdout for the JSON."""
    from rich.console import Console

    to_stderr = args is not None and json_to_stdout(args)
    return Console(stderr=to_stderr, highlight=False, soft_wrap=True)


def emit_json(args: argparse.Namespace, obj: Any) -> None:
    """Write `obj` where --json says: '-' for stdout, else a file written atomically."""
    target = getattr(args, "json", None)
    if not target:
        return
    text = to_json_text(obj)
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        try:
            atomic_write_text(target, text)
        except OSError as err:
            raise InputError(f"cannot write JSON to {target}: {err.strerror}",
                             hint="choose a writable path") from err


def background_from_args(args: argparse.Namespace):
    """The --background directory loaded (InputError, one line, when it is not one); None: the shipped one."""
    path = getattr(args, "background", None)
    if path is None:
        return None
    from modelkin.compare.fingerprints.background import load

    return load(path)
