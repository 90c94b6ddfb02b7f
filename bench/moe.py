"""One MoE layer, modelkin vs transformers' `eager` and `grouped_mm` experts, against the layer's bound.

Qwen3-30B-A3B dims (E=128, D=2048, F=768, top-8) and a MoGE layer at Pangu Pro MoE dims scaled to fit
(E=64 in G=8 groups, D=2560, F=672, shared expert 4F), for T = 1, 8, 128 tokens in fp32 and bf16.
All implementations share the same weight tensors and run interleaved in one process; the bound is
measured in the same run: max(expert bytes touched / copy bandwidth, FLOPs / plain GEMM rate).

Usage (from the repository root): python -m bench.moe [--tokens 1 8 128] [--dtypes float32 bfloat16] [--repeats 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from modelkin.runtime.layers import MLP
from modelkin.runtime.moe import ExpertsImpl, Router, RouterPolicy, SparseMoeBlock, StackedExperts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# -- the bound's two rates, measured here ------------------------------------------------------------


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 7) -> float:
    """Bytes moved per second (read + write) by a large tensor copy."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = _times(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / min(times)


def read_bandwidth(nbytes: int = 512 << 20, repeats: int = 7) -> float:
    """Bytes read per second by a large reduction (streaming reads only, as expert GEMMs do)."""
    src = torch.ones(nbytes // 4)
    times = _times(lambda: src.sum(), repeats)
    return nbytes / min(times)


def weights_read_bandwidth(tensors: list[torch.Tensor], repeats: int = 5) -> float:
    """Bytes per second a reduction streams from these very tensors. On these VMs a fresh 512 MB
    buffer reads at 33 or 57 GB/s depending on where its pages land, so the bound is measured on
    the expert weights the GEMMs stream, not on a stand-in."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    times = _times(lambda: [t.sum() for t in tensors], repeats)
    return nbytes / min(times)


def gemm_rate(dtype: torch.dtype, m: int = 512, n: int = 2048, k: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of a plain, well-shaped GEMM at this dtype."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    times = _times(lambda: torch.mm(a, b, out=out), repeats)
    return 2 * m * n * k / min(times)


def layer_bound(ids_TK: torch.Tensor, dim: int, hidden: int, esize: int, bw: float, rate: float,
                shared_hidden: int = 0, read_bw: float | None = None) -> dict[str, float]:
    """Seconds the routed + shared experts need, from bytes touched and FLOPs: `bound_s` with the
    copy bandwidth (the brief's definition), `strict_bound_s` with the read bandwidth of the
    weights themselves."""
    num_pairs, hit = ids_TK.numel(), int(torch.unique(ids_TK).numel())
    num_tokens = ids_TK.shape[0]
    nbytes = (hit * hidden + shared_hidden) * 3 * dim * esize
    flops = 6 * dim * (num_pairs * hidden + num_tokens * shared_hidden)
    return {"bytes": nbytes, "flops": flops, "experts_hit": hit,
            "bound_s": max(nbytes / bw, flops / rate), "mem_s": nbytes / bw, "flop_s": flops / rate,
            "strict_bound_s": max(nbytes / (read_bw or bw), flops / rate)}


# -- layers -------------------------------------------------------------------------------------------


def qwen3_layers(dtype: torch.dtype, dim: int, hidden: int, num_experts: int, top_k: int):
    """modelkin's block and transformers' Qwen3MoeSparseMoeBlock (eager, grouped_mm) on shared weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf = {}
    for impl in ("eager", "grouped_mm"):
        cfg = Qwen3MoeConfig(hidden_size=dim, moe_intermediate_size=hidden, num_experts=num_experts,
                             num_experts_per_tok=top_k, norm_topk_prob=True, hidden_act="silu")
        cfg._experts_implementation = impl
        hf[impl] = Qwen3MoeSparseMoeBlock(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    ref = hf["eager"]
    with torch.no_grad():
        ref.gate.weight.copy_(torch.randn(num_experts, dim, generator=g) / dim**0.5)
        ref.experts.gate_up_proj.copy_(torch.randn(num_experts, 2 * hidden, dim, generator=g) / dim**0.5)
        ref.experts.down_proj.copy_(torch.randn(num_experts, dim, hidden, generator=g) / hidden**0.5)
    hf["grouped_mm"].gate.weight = ref.gate.weight  # same tensors, not copies
    hf["grouped_mm"].experts.gate_up_proj = ref.experts.gate_up_proj
    hf["grouped_mm"].experts.down_proj = ref.experts.down_proj

    mk = SparseMoeBlock(
        gate=Router(dim, num_experts, policy=RouterPolicy.SOFTMAX_TOPK, top_k=top_k, norm_topk_prob=True),
        experts=StackedExperts(num_experts, dim, hidden),
    )
    mk.gate.weight = ref.gate.weight
    mk.experts.gate_up_proj = ref.experts.gate_up_proj
    mk.experts.down_proj = ref.experts.down_proj
    impls = {"transformers eager": hf["eager"], "transformers grouped_mm": hf["grouped_mm"]}
    impls.update(_modelkin_variants(mk))
    return impls, mk


def moge_layers(dtype: torch.dtype, dim: int, hidden: int, num_experts: int, groups: int):
    """A Pangu-style MoGE block (shared expert 4F ungated); transformers' experts functions on its routing."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    g = torch.Generator().manual_seed(1)
    mk = SparseMoeBlock(
        gate=Router(dim, num_experts, policy=RouterPolicy.MOGE, top_k=groups, num_groups=groups),
        experts=StackedExperts(num_experts, dim, hidden),
        shared_expert=MLP(dim, 4 * hidden),
        router_scale=True,
    ).to(dtype).eval()
    with torch.no_grad():
        for p in mk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        mk.router_scale.uniform_(0.5, 1.5, generator=g)
    impls = _modelkin_variants(mk)
    for impl in ("eager", "grouped_mm"):
        cfg = Qwen3MoeConfig(hidden_size=dim, moe_intermediate_size=hidden, num_experts=num_experts,
                             num_experts_per_tok=groups, hidden_act="silu")
        cfg._experts_implementation = impl
        with torch.device("meta"):
            experts = Qwen3MoeExperts(cfg)
        experts.gate_up_proj, experts.down_proj = mk.experts.gate_up_proj, mk.experts.down_proj
        impls[f"transformers {impl} experts"] = _hf_experts_on_moge(mk, experts)
    return impls, mk


def _hf_experts_on_moge(mk: SparseMoeBlock, experts: torch.nn.Module) -> Callable:
    def run(x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        w, ids, _ = mk.gate(x_TD, mk.router_scale)
        return (experts(x_TD, ids, w.to(x.dtype)) + mk.shared_expert(x_TD)).view(x.shape)

    return run


def _modelkin_variants(mk: SparseMoeBlock) -> dict[str, Callable]:
    """AUTO (what models use: autopack on) plus every explicit runner on plain weights, and the CPU
    runners on prepacked weights."""
    mk.experts.prepack_cpu()
    packed, mk.experts.packed = mk.experts.packed, None

    def variant(impl: ExpertsImpl, use_packed: bool = False) -> Callable:
        auto = impl is ExpertsImpl.AUTO  # exactly what a loaded model does (packs when memory allows)

        def run(x: torch.Tensor) -> torch.Tensor:
            mk.experts.impl, mk.experts.autopack = impl, auto
            mk.experts.packed = packed if (use_packed or auto) else None
            return mk(x)

        return run

    out = {"modelkin auto": variant(ExpertsImpl.AUTO)}
    for impl in (ExpertsImpl.THREADS, ExpertsImpl.LOOP, ExpertsImpl.GROUPED_MM, ExpertsImpl.GATHER):
        out[f"modelkin {impl.value}"] = variant(impl)
    if packed is not None:
        out["modelkin threads+prepacked"] = variant(ExpertsImpl.THREADS, use_packed=True)
        out["modelkin loop+prepacked"] = variant(ExpertsImpl.LOOP, use_packed=True)
    return out


# -- timing -------------------------------------------------------------------------------------------


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def time_interleaved(impls: dict[str, Callable], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Round-robin over implementations so load drift on the machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    with torch.inference_mode():
        for fn in impls.values():
            fn(x)
        for _ in range(repeats):
            for name, fn in impls.items():
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return times


def bench_case(label: str, impls: dict[str, Callable], mk: SparseMoeBlock, *, dtype: torch.dtype,
               tokens: int, repeats: int, bw: float, rate: float, shared_hidden: int,
               read_bw: float | None = None) -> dict:
    dim = mk.experts.dim
    x = torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    skip = {n for n in impls if "gather" in n and tokens > 8}  # gathers T·K weight copies: GBs at T=128
    run = {n: f for n, f in impls.items() if n not in skip}
    with torch.inference_mode():
        outs = {n: f(x).float() for n, f in run.items()}
        _, ids, _ = mk.gate(x.view(-1, dim), mk.router_scale)
    ref = outs[next(iter(outs))]
    load_before = os.getloadavg()[0]
    times = time_interleaved(run, x, repeats if tokens > 8 else repeats * 3)
    bound = layer_bound(ids, dim, mk.experts.hidden, x.element_size(), bw, rate, shared_hidden, read_bw)
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_s": med, "min_s": min(ts), "repeats": len(ts),
                      "fraction_of_bound": bound["bound_s"] / med,
                      "fraction_of_strict_bound": bound["strict_bound_s"] / med,
                      "max_abs_diff_vs_first": float((outs[name] - ref).abs().max())}
    hf = [r["median_s"] for n, r in rows.items() if n.startswith("transformers")]
    best_hf = min(hf) if hf else None
    mk_med = rows["modelkin auto"]["median_s"]
    return {"case": label, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "bound": bound,
            "load_avg_1min": [load_before, os.getloadavg()[0]],
            "impls": rows, "best_transformers_s": best_hf,
            "speedup_vs_best_transformers": best_hf / mk_med if best_hf else None}


def print_case(r: dict) -> None:
    b = r["bound"]
    print(f"\n## {r['case']}  {r['dtype']}  T={r['tokens']}  (experts hit {b['experts_hit']}, "
          f"{b['bytes'] / 1e6:.0f} MB, {b['flops'] / 1e9:.2f} GFLOP; bound {b['bound_s'] * 1e3:.1f} ms = "
          f"max(mem {b['mem_s'] * 1e3:.1f}, flops {b['flop_s'] * 1e3:.1f}); with the weights' read bandwidth "
          f"{b['strict_bound_s'] * 1e3:.1f} ms);  load avg "
          f"{r['load_avg_1min'][0]:.1f} → {r['load_avg_1min'][1]:.1f}")
    for name, row in r["impls"].items():
        print(f"  {name:32s} {row['median_s'] * 1e3:9.2f} ms median (min {row['min_s'] * 1e3:8.2f})  "
              f"{100 * row['fraction_of_bound']:5.1f}% of bound ({100 * row['fraction_of_strict_bound']:5.1f}% "
              f"with the weights' read bandwidth)   max|Δ| {row['max_abs_diff_vs_first']:.2e}")
    if r["speedup_vs_best_transformers"]:
        print(f"  modelkin auto vs best transformers: {r['speedup_vs_best_transformers']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    ap.add_argument("--cases", nargs="+", default=["qwen3", "moge"], choices=["qwen3", "moge"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw, read_bw = copy_bandwidth(), read_bandwidth()
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}, nice {os.nice(0)}, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write), read bandwidth {read_bw / 1e9:.1f} GB/s")
    results = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        rate = gemm_rate(dtype)
        print(f"\n# {dname}: plain GEMM 512x2048x2048 {rate / 1e9:.1f} GFLOP/s")
        for case in args.cases:
            if case == "qwen3":
                impls, mk = qwen3_layers(dtype, 2048, 768, 128, 8)
                label, shared = "Qwen3-30B-A3B MoE layer (E=128, D=2048, F=768, K=8)", 0
            else:
                impls, mk = moge_layers(dtype, 2560, 672, 64, 8)
                label, shared = "MoGE layer, Pangu Pro MoE dims / 2 (E=64, G=8, D=2560, F=672, shared 4F)", 4 * 672
            for tokens in args.tokens:
                bw, rate = copy_bandwidth(), gemm_rate(dtype)  # next to the case
                read_bw = weights_read_bandwidth([mk.experts.gate_up_proj, mk.experts.down_proj])
                r = bench_case(label, impls, mk, dtype=dtype, tokens=tokens, repeats=args.repeats,
                               bw=bw, rate=rate, shared_hidden=shared, read_bw=read_bw)
                r["gemm_rate_flops"], r["copy_bandwidth"] = rate, bw
                print_case(r)
                results.append(r)
            del impls, mk
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor(),
                "nproc": os.cpu_count(), "nice": os.nice(0), "copy_bandwidth": bw}
        with open(args.json + ".tmp", "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
