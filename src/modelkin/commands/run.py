"""Generate text with a model: stream the continuation of --prompt to the terminal.

Greedy by default; --temperature with --top-k/--top-p/--min-p and --seed samples. --chat wraps the
prompt in the model's chat template. --json writes prompt_ids, tokens, text, device, dtype, timings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from modelkin.commands import common, parallel_options
from modelkin.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="HF model directory or .gguf file")
    parser.add_argument("--prompt", default=None, help="the text to continue (required unless --dry-run)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, metavar="K")
    parser.add_argument("--top-p", type=float, default=None, metavar="P")
    parser.add_argument("--min-p", type=float, default=None, metavar="P")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop when the output contains TEXT (repeatable)",
    )
    parser.add_argument("--no-stream", action="store_true", help="print the text once, at the end")
    parser.add_argument(
        "--engine",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="onnxruntime runs a directory written by `modelkin export-onnx`",
    )
    common.add_common(parser)
    parallel_options.add_arguments(parser)


def _load(args: argparse.Namespace) -> Any:
    if args.engine == "onnxruntime":
        try:
            from modelkin.export.ort_engine import load as load_ort
        except ModuleNotFoundError as err:
            raise InputError(
                "the onnxruntime engine is not available in this build", hint="use --engine torch"
            ) from err
        # the device picks an onnxruntime provider, checked against onnxruntime, not torch
        return load_ort(args.model, device=args.device, dtype=args.dtype, allow_fallback=args.allow_fallback)
    backend = common.backend_from_args(args)
    from modelkin.runtime.api import load

    return load(args.model, device=backend, dtype=args.dtype)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.prompt is None and not args.dry_run:
        raise InputError("--prompt is required", hint='pass --prompt "TEXT" (or --dry-run to plan memory)')
    setup = parallel_options.prepare(args)  # torchrun group, memory plan (--dry-run stops here)
    if setup is None:
        return 0
    with contextlib.ExitStack() as stack:
        stack.callback(setup.close)
        if not setup.is_main:  # under torchrun only rank 0 prints and writes
            null = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(null))
            stack.enter_context(contextlib.redirect_stderr(null))
        return _run(args, setup)


def _run(args: argparse.Namespace, setup: parallel_options.Setup) -> int:
    model = setup.load(args) if setup.ctx is not None else _load(args)
    out = sys.stderr if common.json_to_stdout(args) else sys.stdout
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "seed": args.seed,
        "stop": args.stop,
    }
    prompt_ids = model.encode_prompt(args.prompt, chat=args.chat)
    responses = []
    for response in model.stream([prompt_ids], **sampling):
        responses.append(response)
        if not args.no_stream and response.text:
            out.write(response.text)
            out.flush()
    from modelkin.runtime.api import collect_result

    result = collect_result(prompt_ids, responses)
    if args.no_stream:
        out.write(result.text)
    out.write("\n")
    out.flush()
    t = result.timings
    print(
        f"[{len(result.tokens)} tokens, finish {result.finish_reason}, prefill {t['prefill_s']:.3f} s, "
        f"decode {t['tokens_per_s']:.1f} tok/s, {model.device} {_dtype(model.dtype)}]",
        file=sys.stderr,
    )
    report: dict[str, Any] = {
        "model": str(args.model),
        "prompt": args.prompt,
        "chat": args.chat,
        "prompt_ids": result.prompt_ids,
        "tokens": result.tokens,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "device": str(model.device),
        "dtype": _dtype(model.dtype),
        "timings": result.timings,
        "sampling": {k: v for k, v in sampling.items() if k != "max_new_tokens"},
    }
    routing = model.routing()
    if routing is not None:
        report["routing"] = routing
    if setup.describe() is not None:
        report["parallel"] = setup.describe()
    common.emit_json(args, report)
    return 0


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
