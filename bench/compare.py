"""Seconds per pair (load / fingerprint / behaviour) and peak anonymous memory of `compare`: one suspect
against three candidates, before (one compare() per pair at the old behaviour budget) and after
(compare_many at the default budget), each case in its own process; SmolLM2-135M pairs and a random
>= 1B-parameter bf16 Llama pair.

Models are built once and cached under $MODELKIN_CACHE_DIR/compare (else ~/.cache/modelkin-bench/compare).

With smol cases the run ends with the matmul-only bound per model of the behaviour budget (matmul_bound).

Usage (from the repository root): python -m bench.compare [--repeats N] [--cases smol,big] [--only NAMES]
[--json FILE] [--baseline DIR]. With ``--baseline`` (another checkout, e.g. ``git worktree add /tmp/base REV``) every case
also runs on that tree's code, interleaved with this tree's, and the table gains a row and a ratio per case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# the behaviour budget before issue 17 (prompts x samples 4x smaller than today's default)
OLD_BUDGET = {"max_prompts": 24, "greedy_tokens": 32, "mmd_prompts": 4, "mmd_samples": 8, "mmd_tokens": 16,
              "permutations": 2000}
# a 1.2B model in fp32 on 2 CPU cores: a small budget, the same before and after
BIG_BUDGET = {"max_prompts": 4, "greedy_tokens": 8, "mmd_prompts": 1, "mmd_samples": 4, "mmd_tokens": 8,
              "permutations": 500}
BIG_CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
              "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": False,
              "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}


def cache_root() -> Path:
    base = os.environ.get("MODELKIN_CACHE_DIR")
    return Path(base) / "compare" if base else Path.home() / ".cache" / "modelkin-bench" / "compare"


# ---- models -------------------------------------------------------------------------------------------

def smol_models(root: Path, log: Any) -> tuple[Path, dict[str, Path]]:
    """SmolLM2-135M (GGUF) and three relatives: a fine-tune, a permuted copy, the std-matched twin."""
    from modelkin.synth import derive, train, variants

    source = train.smollm2_gguf()
    out = {name: root / name for name in ("fine-tuned", "permuted-copy", "std-matched-twin")}
    if not (out["fine-tuned"] / "config.json").is_file():
        log("fine-tuning SmolLM2 (12 AdamW steps, once)")
        tokens = train.stdlib_tokens(train.write_tokenizer(root / "tokenizer", source), max_tokens=60_000)
        train.finetune(source, out["fine-tuned"], steps=12, lr=5e-5, seed=0, tokens=tokens, batch=4, seq=64)
    if not all((out[n] / "config.json").is_file() for n in ("permuted-copy", "std-matched-twin")):
        log("writing the permuted copy and the std-matched twin (once)")
        config, tensors = variants.read_dense(source)
        variants.write_hf_checkpoint(out["permuted-copy"], config, variants.permute_dense(config, tensors, seed=1),
                                     tokenizer_from=source)
        variants.write_hf_checkpoint(out["std-matched-twin"], *derive.std_matched(config, tensors, seed=3),
                                     tokenizer_from=source)
    return source, out


def big_models(root: Path, log: Any) -> tuple[Path, dict[str, Path]]:
    """A random Llama of ~1.2B parameters in bf16 and a derived copy (its weights plus 1 % noise)."""
    a, b = root / "llama-1b-a", root / "llama-1b-b"
    for path, noise in ((a, 0.0), (b, 0.01)):
        if not (path / "config.json").is_file():
            log(f"writing {path.name} (bf16 safetensors, once)")
            _write_big(path, noise=noise)
    return a, {"llama-1b-derived": b}


def _write_big(path: Path, *, noise: float) -> None:
    """Stream a random bf16 Llama checkpoint to disk one tensor at a time (no full state dict in memory)."""
    import torch

    from modelkin.runtime.models import get_architecture
    from modelkin.synth import train
    from modelkin.synth.tiny import tiny_config
    from modelkin.utils import atomic_path

    config = tiny_config("llama", BIG_CONFIG)
    module = get_architecture(config)
    args = module.ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        model = module.Model(args)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shapes.items():
            n = 2 * int(torch.tensor(shape).prod())
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for i, (name, shape) in enumerate(shapes.items()):
                g = torch.Generator().manual_seed(i)
                t = (torch.ones(shape) if name.endswith("norm.weight")
                     else torch.randn(shape, generator=g) / shape[-1] ** 0.5)
                if noise:
                    t = t + noise * t.std() * torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + i))
                f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        train.write_tokenizer(tmp / "tok")
        for f in (tmp / "tok").iterdir():
            f.rename(tmp / f.name)
        (tmp / "tok").rmdir()


# ---- one case, in a child process ---------------------------------------------------------------------

class AnonPeak:
    """Samples this process's RssAnon every 10 ms (mapped file pages are page cache and do not count)."""

    def __init__(self) -> None:
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now(field: str = "RssAnon") -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from modelkin.compare.api import compare
    from modelkin.compare.many import compare_many
    from modelkin.compare.settings import BehaviourSettings

    torch.set_num_threads(case.get("threads") or torch.get_num_threads())
    base = AnonPeak.now()
    sampler = AnonPeak()
    budget = {"old": OLD_BUDGET, "big": BIG_BUDGET, "default": {}}[case["budget"]]
    settings = BehaviourSettings(**budget)
    common = {"device": case["device"], "dtype": case["dtype"], "settings": settings, "show_progress": False}
    start = time.perf_counter()
    pairs: list[dict[str, Any]] = []
    counters = None
    if case["mode"] == "single":
        for name, path in case["candidates"].items():
            t = time.perf_counter()
            report = compare(case["suspect"], path, **common)
            pairs.append(_split(name, report, time.perf_counter() - t, suspect_loaded=True))
    else:
        found = compare_many(case["suspect"], case["candidates"], **common)
        counters = found.counters
        for i, (name, report) in enumerate(found.reports.items()):
            pairs.append(_split(name, report, found.seconds[name], suspect_loaded=i == 0))
    wall = time.perf_counter() - start
    peak = sampler.stop()
    return {"case": case["name"], "wall_s": wall, "pairs": pairs, "peak_anon": peak, "base_anon": base,
            "vm_hwm": AnonPeak.now("VmHWM"), "counters": counters,
            "settings": settings.to_json(), "weights_bytes": _weights_bytes(case)}


def _split(name: str, report: Any, seconds: float, *, suspect_loaded: bool) -> dict[str, Any]:
    models, t = report.models, report.timings
    load = (models["a"].get("timings", {}).get("load_s", 0.0) if suspect_loaded else 0.0) \
        + models["b"].get("timings", {}).get("load_s", 0.0)
    return {"name": name, "verdict": report.verdict, "seconds": seconds, "load_s": load,
            "fingerprint_s": t.get("fingerprint_s", 0.0), "behaviour_s": t.get("behaviour_s", 0.0) - load}


def _weights_bytes(case: dict[str, Any]) -> int:
    """The largest model's weights at the compute dtype (float32 on CPU unless the case names one)."""
    from modelkin.checkpoint import open_checkpoint

    size = {"auto": 4, "float32": 4, "bfloat16": 2, "float16": 2}[case["dtype"]]
    best = 0
    for path in (case["suspect"], *case["candidates"].values()):
        with open_checkpoint(path) as src:
            best = max(best, sum(int(src.info(k).numel) for k in src.keys()) * size)
    return best


def mmd_power(suspect: str, relative: str, budget: dict[str, Any], seeds: int) -> dict[str, Any]:
    """How often the MMD two-sample test rejects at 0.05 on a light fine-tune, over ``seeds`` seeds."""
    from modelkin.compare.api import compare
    from modelkin.compare.settings import BehaviourSettings

    p_values = []
    for seed in range(seeds):
        settings = BehaviourSettings(**{**budget, "seed": seed, "metrics": ("mmd",)})
        report = compare(suspect, relative, device="cpu", settings=settings, fingerprints=False, show_progress=False)
        p_values.append((report.behaviour.mmd or {}).get("p_value"))
    done = [p for p in p_values if p is not None]
    return {"seeds": seeds, "rejects": sum(p < 0.05 for p in done), "p_values": p_values,
            "power": sum(p < 0.05 for p in done) / max(1, len(done))}


# ---- the physical bound of the behaviour half --------------------------------------------------------

def matmul_bound(path: str, budget: dict[str, Any], repeats: int = 3) -> dict[str, Any]:
    """Seconds per model that the behaviour budget's linear layers alone take on this machine: every linear
    layer of the model at its real shapes (random weights at the compute dtype, so the weights stream from
    memory as in the real run) through the runtime's kernel (``cpu_kernels.onednn_linear``: oneDNN for
    float32, F.linear otherwise), timed for one prefill of the prompts' tokens and one decode step of the
    greedy rows (float32) and of the sampled rows (bfloat16 where the CPU has it), times the steps. Attention,
    norms, sampling, loading and the metrics are left out, so the real behaviour time is above it."""
    import torch

    from modelkin.checkpoint import open_checkpoint
    from modelkin.compare.behaviour.outputs import native_bfloat16
    from modelkin.compare.behaviour.prompts import resolve_prompts
    from modelkin.compare.settings import BehaviourSettings
    from modelkin.runtime.cpu_kernels import onednn_linear
    from modelkin.tokenizer import load_tokenizer

    settings = BehaviourSettings(**budget)
    with open_checkpoint(path) as source:
        config, tok = source.config(), load_tokenizer(source, path)
    prompts = resolve_prompts(None, settings.max_prompts)
    prompt_tokens = sum(len(tok.encode(p.prompt, add_special_tokens=True)) for p in prompts)
    d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or d // heads
    shapes = [(heads * hd, d), (kv * hd, d), (kv * hd, d), (d, heads * hd), (inter, d), (inter, d), (d, inter)]
    sample_dtype = torch.bfloat16 if native_bfloat16(torch.device("cpu")) else torch.float32

    def step_seconds(rows: int, dtype: torch.dtype) -> float:
        weights = [torch.randn(o, i, dtype=dtype) for _ in range(layers) for o, i in shapes]
        weights.append(torch.randn(config["vocab_size"], d, dtype=dtype))
        inputs = {i: torch.randn(rows, i, dtype=dtype) for i in {w.shape[1] for w in weights}}
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):
                t = time.perf_counter()
                for w in weights:
                    onednn_linear(inputs[w.shape[1]], w, None)  # the runtime's kernel for these rows
                times.append(time.perf_counter() - t)
        return statistics.median(times[1:])  # the first run pays page faults

    greedy_rows = len(prompts)
    sampled_rows = min(settings.mmd_prompts, len(prompts)) * settings.mmd_samples
    parts = {"prefill_fp32": step_seconds(prompt_tokens, torch.float32),
             "greedy_fp32": step_seconds(greedy_rows, torch.float32) * (settings.greedy_tokens - 1),
             f"sampled_{str(sample_dtype).removeprefix('torch.')}":
                 step_seconds(sampled_rows, sample_dtype) * (settings.mmd_tokens - 1)}
    return {"prompt_tokens": prompt_tokens, "greedy_rows": greedy_rows, "sampled_rows": sampled_rows,
            "parts_s": parts, "total_s": sum(parts.values())}


# ---- the parent: cases, repeats, table --------------------------------------------------------------

BASELINE = " [baseline]"  # the rows of --baseline's tree

def cases(which: list[str], log: Any) -> list[dict[str, Any]]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    out = []
    if "smol" in which:
        suspect, cands = smol_models(root, log)
        cands = {k: str(v) for k, v in cands.items()}
        for mode, budget in (("single", "old"), ("single", "default"), ("many", "old"), ("many", "default")):
            out.append({"name": f"smol {mode} {budget}-budget", "suspect": str(suspect), "candidates": cands,
                        "mode": mode, "budget": budget, "device": "cpu", "dtype": "auto"})
    if "big" in which:
        suspect, cands = big_models(root, log)
        for mode in ("single", "many"):
            out.append({"name": f"1.2B bf16 {mode}", "suspect": str(suspect),
                        "candidates": {k: str(v) for k, v in cands.items()}, "mode": mode, "budget": "big",
                        "device": "cpu", "dtype": "bfloat16"})
    return out


def spawn(case: dict[str, Any], timeout: float, tree: Path | None = None) -> dict[str, Any]:
    """Run one case in a child process: with this tree's code, or with the checkout at ``tree`` (its own
    bench.compare and modelkin; its own default behaviour budget)."""
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree / "src")}
    proc = subprocess.run([sys.executable, "-m", "bench.compare", "--child", json.dumps(case)],
                          capture_output=True, text=True, timeout=timeout, cwd=tree, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{case['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for name, results in runs.items():
        if not results:
            continue
        med = statistics.median
        n_pairs = len(results[0]["pairs"])
        row = {"case": name, "repeats": len(results), "pairs": n_pairs,
               "s_per_pair": med(r["wall_s"] / n_pairs for r in results),
               **{k: med(sum(p[k] for p in r["pairs"]) / n_pairs for r in results)
                  for k in ("load_s", "fingerprint_s", "behaviour_s")},
               "peak_anon_gb": med(r["peak_anon"] for r in results) / 1e9,
               "base_anon_gb": med(r["base_anon"] for r in results) / 1e9,
               "vm_hwm_gb": med(r["vm_hwm"] for r in results) / 1e9,
               "budget_gb": (results[0]["weights_bytes"] + 0.5e9) / 1e9,
               "verdicts": {p["name"]: p["verdict"] for p in results[0]["pairs"]},
               "counters": results[0]["counters"]}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="smol,big", help="smol, big or both (comma-separated)")
    parser.add_argument("--only", help="run only the cases whose name contains one of these "
                        "(comma-separated), e.g. 'single default,many default'")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case run")
    parser.add_argument("--json", help="write every run and the summary to this file")
    parser.add_argument("--power-seeds", type=int, default=0,
                        help="also measure the MMD test's power on the fine-tune over this many seeds, old budget "
                             "and default budget")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="another checkout of modelkin: every case also runs on its code, interleaved")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "bench" / "compare.py").is_file():
        parser.error(f"--baseline {args.baseline} is not a modelkin checkout with bench/compare.py "
                     "(make one with: git worktree add DIR REV)")
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return 0
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    todo = cases([c.strip() for c in args.cases.split(",")], log)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        todo = [c for c in todo if any(w in c["name"] for w in wanted)]
        if not todo:
            parser.error(f"--only {args.only!r} matches no case")
    trees: dict[str, Path | None] = {"": None}
    if args.baseline is not None:
        trees[BASELINE] = args.baseline.resolve()
    runs: dict[str, list[dict[str, Any]]] = {c["name"] + tag: [] for c in todo for tag in trees}
    for rep in range(args.repeats):  # interleaved, so load changes hit every case (and tree) alike
        for case in todo:
            for tag, tree in trees.items():
                load = os.getloadavg()[0]
                log(f"repeat {rep + 1}/{args.repeats}: {case['name']}{tag} (load average {load:.1f})")
                runs[case["name"] + tag].append(spawn(case, args.timeout, tree))
    rows = summarise(runs)
    width = max([26] + [len(r["case"]) for r in rows])
    print(f"{'case':{width}s} {'s/pair':>7s} {'load':>6s} {'fprint':>7s} {'behav':>6s} {'anon GB':>8s} "
          f"{'budget':>7s} {'HWM GB':>7s}  verdicts")
    for r in rows:
        print(f"{r['case']:{width}s} {r['s_per_pair']:7.1f} {r['load_s']:6.1f} {r['fingerprint_s']:7.1f} "
              f"{r['behaviour_s']:6.1f} {r['peak_anon_gb']:8.2f} {r['budget_gb']:7.2f} {r['vm_hwm_gb']:7.2f}  "
              + ", ".join(f"{k}={v}" for k, v in r["verdicts"].items()))
    by = {r["case"]: r for r in rows}
    pairs = [("smol single old-budget", "smol many old-budget"),
             ("smol single old-budget", "smol many default-budget"),
             ("smol single old-budget", "smol single default-budget"), ("1.2B bf16 single", "1.2B bf16 many")]
    pairs += [(c["name"] + BASELINE, c["name"]) for c in todo if args.baseline is not None]
    for before, after in pairs:
        if before in by and after in by:
            print(f"{after} vs {before}: {by[before]['s_per_pair'] / by[after]['s_per_pair']:.2f}x seconds per pair, "
                  f"peak anon {by[after]['peak_anon_gb']:.2f} vs {by[before]['peak_anon_gb']:.2f} GB")
    for r in rows:
        if r["counters"]:
            s = r["counters"]["suspect"]
            print(f"{r['case']}: suspect loads {s['loads']}, checkpoint opens {s['checkpoint_opens']}, tensors read "
                  f"{s['tensors_read']} ({s['bytes_read'] / 1e6:.0f} MB), outputs computed {s['outputs_computed']}"
                  f" / reused {s['outputs_reused']}")
    bound = {}
    if "smol" in [c.strip() for c in args.cases.split(",")]:
        suspect, _ = smol_models(cache_root(), log)
        for label, budget in (("old", OLD_BUDGET), ("default", {})):
            bound[label] = matmul_bound(str(suspect), budget)
            parts = ", ".join(f"{k} {v:.2f}" for k, v in bound[label]["parts_s"].items())
            row = by.get(f"smol many {label}-budget")
            measured = f"; measured behaviour per pair (one candidate) {row['behaviour_s']:.1f} s, " \
                f"{row['behaviour_s'] / bound[label]['total_s']:.1f}x the bound" if row else ""
            print(f"matmul-only bound per model, {label} budget: {bound[label]['total_s']:.2f} s ({parts}; "
                  f"{bound[label]['prompt_tokens']} prompt tokens){measured}")
    power = {}
    if args.power_seeds:
        suspect, cands = smol_models(cache_root(), log)
        for label, budget in (("old", OLD_BUDGET), ("default", {})):
            log(f"MMD power, {label} budget, {args.power_seeds} seeds")
            power[label] = mmd_power(str(suspect), str(cands["fine-tuned"]), budget, args.power_seeds)
            print(f"MMD power on the light fine-tune, {label} budget: {power[label]['rejects']}/{args.power_seeds} "
                  "seeds reject at 0.05")
    print(f"load average now {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": rows, "mmd_power": power,
                                               "matmul_bound": bound}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
