"""Power of compare's MMD two-sample test on a light fine-tune of SmolLM2-135M: how often it rejects at
0.05 over seeds, at several budgets (prompts x samples x tokens; by default the old 4 x 8 and the current
default) in the same run; and how often it rejects SmolLM2 against itself (the test's size).

The fine-tune is the demo's (AdamW steps on Python standard-library source, modelkin.synth.train),
cached under $MODELKIN_CACHE_DIR/mmd-power (else ~/.cache/modelkin-bench/mmd-power). Each seed samples
each model once at the largest budget (most prompts, samples and tokens of any budget asked for); each
budget's test takes the first prompts, samples and tokens of those draws. Sampled rows draw from their own
uniforms and a continuation's first tokens do not depend on its later ones, so that subset is distributed
exactly as a run at the smaller budget.

Usage (from the repository root): python -m bench.mmd_power [--seeds N] [--first-seed S]
[--budgets 4x8x16,8x16x16,...] [--steps S] [--lr LR] [--threads T] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

import modelkin
from modelkin.compare.behaviour.outputs import run_outputs
from modelkin.compare.behaviour.prompts import resolve_prompts
from modelkin.compare.settings import BehaviourSettings
from modelkin.compare.stats import mmd_test
from modelkin.synth import train
from modelkin.utils import atomic_write_text

OLD = (4, 8, 16)  # mmd_prompts x mmd_samples x mmd_tokens before the budget grew


def cache_root() -> Path:
    base = os.environ.get("MODELKIN_CACHE_DIR")
    return Path(base) / "mmd-power" if base else Path.home() / ".cache" / "modelkin-bench" / "mmd-power"


def fine_tune(root: Path, *, steps: int, lr: float, log: Any) -> Path:
    """The demo's light fine-tune of SmolLM2 (built once, then read from the cache)."""
    out = root / f"ft-steps{steps}-lr{lr:g}"
    if (out / "config.json").is_file():
        return out
    log(f"fine-tuning SmolLM2: {steps} AdamW steps, lr {lr:g}, batch 4 x 64 tokens of stdlib source")
    source = train.smollm2_gguf()
    tokens = train.stdlib_tokens(train.write_tokenizer(root / "tokenizer", source), max_tokens=60_000)
    return train.finetune(source, out, steps=steps, lr=lr, seed=0, tokens=tokens, batch=4, seq=64).path


def samples(model: Any, settings: BehaviourSettings, seed: int) -> tuple[list[list[list[int]]], float]:
    prompts = resolve_prompts(None, settings.max_prompts)
    t = time.perf_counter()
    out = run_outputs(model, prompts, settings, seed=seed)
    return out.sample_ids, time.perf_counter() - t


def subset(xs: list[list[list[int]]], prompts: int, per_prompt: int, tokens: int) -> list[list[list[int]]]:
    return [[sample[:tokens] for sample in row[:per_prompt]] for row in xs[:prompts]]


def budget(text: str) -> tuple[int, int, int]:
    """'8x16x16' -> (prompts, samples per prompt, tokens)."""
    try:
        prompts, per_prompt, tokens = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a budget is PROMPTSxSAMPLESxTOKENS, e.g. 8x16x16; got {text!r}") \
            from None
    if prompts < 1 or per_prompt < 2 or tokens < 1:
        raise argparse.ArgumentTypeError(f"{text}: needs >= 1 prompt, >= 2 samples and >= 1 token")
    return prompts, per_prompt, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from here (another panel of seeds)")
    ap.add_argument("--steps", type=int, default=12, help="AdamW steps of the fine-tune (the demo's: 12)")
    ap.add_argument("--lr", type=float, default=5e-5, help="its learning rate (the demo's: 5e-5)")
    ap.add_argument("--permutations", type=int, default=1000)
    new = BehaviourSettings()
    default = (new.mmd_prompts, new.mmd_samples, new.mmd_tokens)
    ap.add_argument("--budgets", type=lambda t: [budget(x) for x in t.split(",") if x.strip()],
                    default=[OLD, default], help="comma-separated PROMPTSxSAMPLESxTOKENS (default: the old "
                    f"{'x'.join(map(str, OLD))} and the current default {'x'.join(map(str, default))})")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    ft_path = fine_tune(root, steps=args.steps, lr=args.lr, log=log)
    budgets = {"x".join(map(str, b)) + (" (old)" if b == OLD else " (default)" if b == default else ""): b
               for b in args.budgets}
    most = [max(b[i] for b in budgets.values()) for i in range(3)]
    settings = BehaviourSettings(max_prompts=most[0], mmd_prompts=most[0], mmd_samples=most[1],
                                 mmd_tokens=most[2], metrics=("mmd",))
    log(f"threads {torch.get_num_threads()}; loadavg {os.getloadavg()}; {args.seeds} seeds; sampled at "
        f"{'x'.join(map(str, most))}, temperature {new.temperature}; sample dtype {new.sample_dtype}")
    base = modelkin.load(train.smollm2_gguf(), device="cpu")
    ft = modelkin.load(ft_path, device="cpu")
    rejects: dict[str, dict[str, list[float]]] = {b: {"fine-tune": [], "itself": []} for b in budgets}
    seconds: list[float] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        a, ta = samples(base, settings, seed=1000 * seed)
        a2, ta2 = samples(base, settings, seed=1000 * seed + 1)
        b, tb = samples(ft, settings, seed=1000 * seed + 2)
        seconds += [ta, ta2, tb]
        line = []
        for name, (n_prompts, n_samples, n_tokens) in budgets.items():
            for label, other in (("fine-tune", b), ("itself", a2)):
                cut = (n_prompts, n_samples, n_tokens)
                p = mmd_test(subset(a, *cut), subset(other, *cut), length=n_tokens,
                             permutations=args.permutations, seed=seed).p_value
                rejects[name][label].append(p)
                line.append(f"{name} {label} p={p:.3f}")
        log(f"seed {seed}: " + "; ".join(line) + f"  ({ta + ta2 + tb:.1f} s sampling)")
    log(f"loadavg {os.getloadavg()}")
    print(f"\nrejection rate at 0.05 over {args.seeds} seeds (SmolLM2 vs its {args.steps}-step "
          f"lr {args.lr:g} fine-tune; vs itself with another seed)")
    summary: dict[str, Any] = {}
    for name in budgets:
        rates = {label: sum(p < 0.05 for p in ps) / len(ps) for label, ps in rejects[name].items()}
        summary[name] = {"rates": rates, "p_values": rejects[name]}
        print(f"  {name:20s} fine-tune {rates['fine-tune']:.3f}   itself {rates['itself']:.3f}")
    seconds.sort()
    print(f"seconds per model sampling ({'x'.join(map(str, most))}, {most[0]} prompts prefilled): median "
          f"{seconds[len(seconds) // 2]:.2f}")
    if args.json:
        payload = {"args": vars(args) | {"json": str(args.json)}, "summary": summary, "seconds": seconds}
        atomic_write_text(args.json, json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
