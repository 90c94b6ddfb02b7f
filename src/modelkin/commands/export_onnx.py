"""Export a model to ONNX: prefill (model.onnx) and decode (decode.onnx) graphs with explicit KV-cache
inputs/outputs and dynamic batch/sequence axes, weights in model.onnx.data under their HF names,
config, tokenizer and manifest.json beside them. Run the result with
`modelkin run OUTDIR --engine onnxruntime`; inspect it with `modelkin inspect OUTDIR/model.onnx`.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from modelkin.commands import common
    from modelkin.export.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    parser.add_argument("model", metavar="MODEL", help="HF model directory, .gguf or .bin checkpoint")
    parser.add_argument("outdir", metavar="OUTDIR", help="directory to write (replaced atomically)")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="float32 (default), float16 or bfloat16 (bfloat16 runs on CUDA, not on onnxruntime's CPU)",
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset {MIN_OPSET}..{MAX_OPSET}"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="afterwards, run both graphs on onnxruntime (CPU) and compare logits with the torch engine",
    )
    common.add_json(parser)


def run(args: argparse.Namespace) -> int:
    from modelkin.commands import common
    from modelkin.export.onnx import export_onnx
    from modelkin.utils import human_bytes

    start = time.perf_counter()
    manifest = export_onnx(args.model, args.outdir, dtype=args.dtype, opset=args.opset)
    seconds = time.perf_counter() - start
    out = sys.stderr if common.json_to_stdout(args) else sys.stdout
    from pathlib import Path

    data = Path(args.outdir) / manifest.external_data
    print(
        f"exported {manifest.model_type} ({manifest.num_layers} layers, {manifest.dtype}) to {args.outdir}: "
        f"{manifest.prefill} (prefill), {manifest.decode} (decode), {manifest.external_data} "
        f"({human_bytes(data.stat().st_size)}) in {seconds:.1f} s",
        file=out,
    )
    report = {"manifest": manifest.to_json(), "seconds": seconds}
    if args.verify:
        from modelkin.export.verify import verify_export

        check = verify_export(args.model, args.outdir)
        report["verify"] = check
        print(
            f"verify: max |logits(onnxruntime) - logits(torch)| = {check['max_abs_diff']:.3g} "
            f"(prefill {check['prefill_max_abs_diff']:.3g}, decode {check['decode_max_abs_diff']:.3g}, "
            f"logits up to {check['max_abs_logit']:.3g})",
            file=out,
        )
    common.emit_json(args, report)
    return 0
