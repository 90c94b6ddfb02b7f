"""`modelkin upcycle`: build a Pangu-Pro-MoE-layout (MoGE) checkpoint from a dense Llama/Qwen2 checkpoint
(HF dir or GGUF) with the upcycle builder, synth/upcycle.py (`fingerprint --methods upcycle` is the detector).

Attention is copied; each layer's MLP neurons are split at random into E routed experts and a shared
expert; the router starts from each expert's mean gate row; router_scale is ones; --noise adds Gaussian
noise of that many stds of each tensor. The output loads as model_type PanguProMoE.
"""

from __future__ import annotations

import argparse

from modelkin.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dense", metavar="DENSE", help="dense Llama/Qwen2 checkpoint (HF directory or .gguf)")
    parser.add_argument("outdir", metavar="OUTDIR", help="new directory for the MoGE checkpoint")
    parser.add_argument("--experts", type=int, required=True, help="routed experts E")
    parser.add_argument("--groups", type=int, required=True,
                        help="expert groups G (= num_experts_per_tok: one expert per group is active)")
    parser.add_argument("--shared-fraction", type=float, default=0.25,
                        help="share of each layer's MLP neurons for the shared expert (default 0.25)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="Gaussian noise as a multiple of each tensor's std (default 0: exact copy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the partition, router and noise")
    parser.add_argument("--dtype", default="auto", help="auto (the dense model's; float32 for quantised GGUF), "
                                                        "float32, bfloat16 or float16")
    parser.add_argument("--router", choices=("mean", "random"), default="mean",
                        help="router init: each expert's mean gate row, or N(0, 0.02²)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTDIR")
    common.add_json(parser)


def run(args: argparse.Namespace) -> int:
    from modelkin.synth.upcycle import upcycle

    summary = upcycle(args.dense, args.outdir, experts=args.experts, groups=args.groups,
                      shared_fraction=args.shared_fraction, noise=args.noise, seed=args.seed,
                      dtype=args.dtype, router=args.router, overwrite=args.overwrite)
    common.emit_json(args, summary)
    console = common.console(args)
    console.print(f"wrote {summary['outdir']}: {summary['experts']} experts × {summary['moe_intermediate_size']} "
                  f"+ shared {summary['shared_expert_intermediate_size']}, {summary['groups']} groups, "
                  f"noise {summary['noise']}, {summary['dtype']}")
    console.print(f"tokenizer: {summary['tokenizer']}")
    return 0
