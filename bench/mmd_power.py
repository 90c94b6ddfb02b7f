"""Power of compare's MMD two-sample test on a light fine-tune of SmolLM2-135M: how often it rejects at
0.05 over seeds, at the old budget (4 prompts x 8 samples) and the new default, in the same run; and how
often it rejects SmolLM2 against itself (the test's size).

The fine-tune is the demo's (AdamW steps on Python standard-library source, modelkin.synth.train),
cached under $MODELKIN_CACHE_DIR/mmd-power (else ~/.cache/modelkin-bench/mmd-power). Each seed samples
each model once at the larger budget; the smaller budget's test takes the first prompts and samples of
those draws. Sampled rows draw from their own uniforms, so that subset is distributed exactly as a run
at the smaller budget.

Usage (from the repository root): python -m bench.mmd_power [--seeds N] [--steps S] [--lr LR] [--threads T]
[--json FILE]
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

OLD = (4, 8)  # mmd_prompts x mmd_samples before the budget grew


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


def subset(xs: list[list[list[int]]], prompts: int, per_prompt: int) -> list[list[list[int]]]:
    return [row[:per_prompt] for row in xs[:prompts]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=12, help="AdamW steps of the fine-tune (the demo's: 12)")
    ap.add_argument("--lr", type=float, default=5e-5, help="its learning rate (the demo's: 5e-5)")
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    ft_path = fine_tune(root, steps=args.steps, lr=args.lr, log=log)
    new = BehaviourSettings()
    settings = BehaviourSettings(max_prompts=new.mmd_prompts, metrics=("mmd",))
    budgets = {f"old {OLD[0]}x{OLD[1]}": OLD, f"new {new.mmd_prompts}x{new.mmd_samples}": (new.mmd_prompts,
                                                                                            new.mmd_samples)}
    log(f"threads {torch.get_num_threads()}; loadavg {os.getloadavg()}; {args.seeds} seeds; "
        f"{new.mmd_tokens} tokens at temperature {new.temperature}; sample dtype {new.sample_dtype}")
    base = modelkin.load(train.smollm2_gguf(), device="cpu")
    ft = modelkin.load(ft_path, device="cpu")
    rejects: dict[str, dict[str, list[float]]] = {b: {"fine-tune": [], "itself": []} for b in budgets}
    seconds: list[float] = []
    for seed in range(args.seeds):
        a, ta = samples(base, settings, seed=1000 * seed)
        a2, ta2 = samples(base, settings, seed=1000 * seed + 1)
        b, tb = samples(ft, settings, seed=1000 * seed + 2)
        seconds += [ta, ta2, tb]
        line = []
        for name, (n_prompts, n_samples) in budgets.items():
            for label, other in (("fine-tune", b), ("itself", a2)):
                p = mmd_test(subset(a, n_prompts, n_samples), subset(other, n_prompts, n_samples),
                             length=new.mmd_tokens, permutations=args.permutations, seed=seed).p_value
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
        print(f"  {name:12s} fine-tune {rates['fine-tune']:.2f}   itself {rates['itself']:.2f}")
    seconds.sort()
    print(f"seconds per model sampling (new budget, {new.mmd_prompts} prompts prefilled): median "
          f"{seconds[len(seconds) // 2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "summary": summary,
                                         "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
