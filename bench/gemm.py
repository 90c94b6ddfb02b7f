"""The CPU kernel behind modelkin's multi-row float32 products: `cpu_kernels.onednn_linear` (oneDNN's
matmul) against PyTorch's `F.linear` (the BLAS it links, MKL in the CPU wheels), on every linear layer of a
SmolLM2-135M-shaped model (30 layers of q/k/v/o and gate/up/down, and the 49152-row lm_head).

For each row count M (one decode step of M sequences, or a prefill of M tokens) it prints the milliseconds
for all layers, the GFLOPS, and the ratio, as medians over interleaved repeats; float32 and bfloat16 (where
both paths take oneDNN, a control). The physical bound printed is the machine's best measured float32 rate
in the run (the largest M through either kernel): at small M no kernel reaches it.

Usage (from the repository root): python -m bench.gemm [--rows 1,8,24,64,128,320] [--repeats 7]
[--threads T]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from modelkin.runtime.cpu_kernels import _ONEDNN, onednn_linear

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # one layer


def weights(dtype: torch.dtype, layers: int = 30, vocab: int = 49152) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = [(torch.randn(o, i, generator=gen) * 0.02).to(dtype) for _ in range(layers) for o, i in SHAPES]
    out.append((torch.randn(vocab, 576, generator=gen) * 0.02).to(dtype))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,24,64,128,320")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN path {'on' if _ONEDNN else 'OFF'}")
    paths = {"F.linear": lambda x, w: F.linear(x, w), "onednn_linear": lambda x, w: onednn_linear(x, w, None)}
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        ws = weights(dtype)
        flops_per_row = sum(2 * w.numel() for w in ws)
        for m in [int(r) for r in args.rows.split(",")]:
            xs = {k: torch.randn(m, k).to(dtype) for k in {w.shape[1] for w in ws}}
            times: dict[str, list[float]] = {name: [] for name in paths}
            with torch.inference_mode():
                for rep in range(args.repeats + 1):  # interleaved; the first round pays page faults
                    for name, f in paths.items():
                        t = time.perf_counter()
                        for w in ws:
                            f(xs[w.shape[1]], w)
                        if rep:
                            times[name].append(time.perf_counter() - t)
            med = {name: statistics.median(v) for name, v in times.items()}
            rate = {name: flops_per_row * m / s / 1e9 for name, s in med.items()}
            if dtype == torch.float32:
                best = max(best, *rate.values())
            print(f"{str(dtype).removeprefix('torch.'):9s} M={m:4d}  " + "  ".join(
                f"{name} {med[name] * 1e3:7.1f} ms {rate[name]:5.0f} GFLOPS" for name in paths)
                + f"  ratio {med['F.linear'] / med['onednn_linear']:.2f}x")
    print(f"best float32 rate measured in this run (the bound small M falls short of): {best:.0f} GFLOPS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
