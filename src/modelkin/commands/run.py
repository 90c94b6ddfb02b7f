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


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.prompt is None and not args.dry_run:
        raise InputError("--prompt is required", hint='pass --prompt "TEXT" (or --dry-run to plan memory)')
    if args.engine == "onnxruntime":
        from modelkin.export.ort_engine import load as load_ort

        parallel_options.check_one_process(args)
        # the device picks an onnxruntime provider, checked against onnxruntime, not torch
        model = load_ort(args.model, device=args.device, dtype=args.dtype, allow_fallback=args.allow_fallback)
        return _generate(args, model, seed=args.seed)
    backend = common.backend_from_args(args)
    if args.dry_run:
        parallel_options.dry_run(args, backend)
        return 0
    from modelkin.checkpoint import open_checkpoint
    from modelkin.runtime.api import load_source

    with contextlib.ExitStack() as stack:
        plan = parallel_options.start(args, backend)
        stack.callback(plan.close)
        with open_checkpoint(args.model) as source:
            plan = parallel_options.plan(args, source, plan)
            if not plan.is_main:  # under torchrun only rank 0 prints and writes
                null = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(null))
                stack.enter_context(contextlib.redirect_stderr(null))
            model = load_source(
                source, args.model, backend=plan.backend, dtype=plan.dtype, parallel=plan.ctx,
                shard=plan.shard,
            )
        return _generate(args, model, seed=plan.seed, parallel=plan.describe(), write_json=plan.is_main)


def _generate(
    args: argparse.Namespace,
    model: Any,
    *,
    seed: int | None,
    parallel: dict[str, int] | None = None,
    write_json: bool = True,
) -> int:
    out = sys.stderr if common.json_to_stdout(args) else sys.stdout
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "seed": seed,
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
    if parallel is not None:
        report["parallel"] = parallel
    if write_json:
        common.emit_json(args, report)
    return 0


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
