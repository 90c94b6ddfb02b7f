"""A labelled provenance panel: seed-only twins trained from scratch, relatives made from one of them by real
procedures, every fingerprint method on every pair; confusion, AUROC, margins, p calibration, seconds per pair.

Models are small Llamas (SmolLM2's tokenizer) trained with AdamW on the Python standard library's source
(modelkin.synth.train), cached under $MODELKIN_CACHE_DIR/provenance (else ~/.cache/modelkin-bench/provenance).

Usage (from the repository root): python -m bench.provenance [--pairs N] [--quick] [--steps S] [--no-real]
[--json FILE]; the models are bench/provenance_models.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelkin.compare.fingerprints import csu_aligned, method_module
from modelkin.compare.fingerprints.result import FingerprintReport, MethodResult, NotApplicable, call_for
from modelkin.compare.fingerprints.weights import open_weights
from modelkin.utils import atomic_write_text

from bench.provenance_models import DEFAULT_TOKENS, Panel, function_gap, real_models, weight_change

METHODS = ("csu_aligned", "permtest", "std_curve", "pcs", "invariants", "spectral", "upcycle")
EXACT = ("csu_aligned", "permtest", "pcs", "upcycle")  # nulls that hold for independently trained real models
CALLS = ("related", "inconclusive", "unrelated", "skipped")
# invariants' token-relabelling null costs ~40 s per pair at 1024 tokens on a loaded core; 512 keeps it usable
OPTIONS: dict[str, dict[str, Any]] = {"invariants": {"n_tokens": 512}}


def cache_root() -> Path:
    base = os.environ.get("MODELKIN_CACHE_DIR")
    return Path(base) / "provenance" if base else Path.home() / ".cache" / "modelkin-bench" / "provenance"


def run_methods(a: Path, b: Path, methods: tuple[str, ...]) -> dict[str, MethodResult]:
    cpu = torch.device("cpu")
    out = {}
    with open_weights(a, cpu) as wa, open_weights(b, cpu) as wb:
        for name in methods:
            module = csu_aligned if name == "csu_aligned" else method_module(name)
            start = time.perf_counter()
            try:
                result = module.run(wa, wb, seed=0, **OPTIONS.get(name, {}))
            except NotApplicable as why:
                result = MethodResult.skip(name, str(why), module.NULL)
            result.seconds = time.perf_counter() - start
            out[name] = result
    return out


def _call(result: MethodResult) -> str:
    """The method's call; for a descriptive method, the call its p-value would make if it were allowed to
    decide (so the table shows what its synthetic null would do to real pairs)."""
    if result.skipped is None and not result.deciding:
        return call_for(result.p_value)
    return result.call


def auroc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a related pair > score of an unrelated pair), ties counted half."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.0e}"


def _values(rows: list[dict[str, Any]], method: str, key: str, **where: str) -> list[Any]:
    """One method's ``key`` (score, p, call, seconds) over the rows matching ``where``, Nones dropped."""
    return [r["results"][method][key] for r in rows
            if all(r[k] == v for k, v in where.items()) and r["results"][method][key] is not None]


def report(rows: list[dict[str, Any]], methods: tuple[str, ...], print_: Callable[[str], None]
           ) -> dict[str, Any]:
    from scipy import stats

    width = max(len(r["pair"]) for r in rows)
    print_("\nper pair: p-value (call: R related, i inconclusive, u unrelated, - skipped)")
    print_(f"{'pair':<{width}} {'label':<9} " + " ".join(f"{m:>13}" for m in methods) + "  seconds")
    for r in rows:
        cells = []
        for m in methods:
            res = r["results"][m]
            mark = {"related": "R", "inconclusive": "i", "unrelated": "u"}.get(res["call"], "-")
            cells.append(f"{_fmt_p(res['p']):>11} {mark}")
        print_(f"{r['pair']:<{width}} {r['label']:<9} " + " ".join(cells) + f"  {r['seconds']:.1f}")
    summary: dict[str, Any] = {}
    print_("\nper method: confusion (calls by label; for descriptive methods, the calls their p would make if "
           "they decided), AUROC of the score, worst-case margin (min related - max unrelated score), KS p of the "
           "seed-twin p-values against uniform")
    print_(f"{'method':<12} {'label':<9} " + " ".join(f"{c:>12}" for c in CALLS) +
           "   AUROC   margin  KS p(twins)  s/pair")
    for m in methods:
        row: dict[str, Any] = {}
        for label in ("related", "unrelated"):
            calls = _values(rows, m, "call", label=label)
            row[label] = {c: calls.count(c) for c in CALLS}
        pos, neg = _values(rows, m, "score", label="related"), _values(rows, m, "score", label="unrelated")
        row["auroc"] = auroc(pos, neg)
        row["margin"] = (min(pos) - max(neg)) if pos and neg else None
        twin_p = _values(rows, m, "p", stratum="seed-only")
        row["ks_p"] = float(stats.kstest(twin_p, "uniform").pvalue) if len(twin_p) >= 3 else None
        row["n_twins"] = len(twin_p)
        row["seconds_per_pair"] = float(np.mean([r["results"][m]["seconds"] for r in rows]))
        summary[m] = row
        for label in ("related", "unrelated"):
            extra = ""
            if label == "related":
                au = "-" if row["auroc"] is None else f"{row['auroc']:.3f}"
                mg = "-" if row["margin"] is None else f"{row['margin']:+.3f}"
                ks = "-" if row["ks_p"] is None else f"{row['ks_p']:.3f} (n={row['n_twins']})"
                extra = f"  {au:>6} {mg:>8}  {ks:>11}  {row['seconds_per_pair']:.2f}"
            name = m if label == "related" else ("(descriptive)" if m not in EXACT else "")
            print_(f"{name:<13}{label:<9} " +
                   " ".join(f"{row[label][c]:>12}" for c in CALLS) + extra)
    for m in [x for x in EXACT if x in methods]:
        twin_p = sorted(_values(rows, m, "p", stratum="seed-only"))
        if twin_p:
            print_(f"{m}: seed-twin p-values (sorted): " + " ".join(f"{p:.3f}" for p in twin_p))
    for m in [x for x in EXACT if x in methods]:
        misses = [f"{r['pair']} (p={_fmt_p(r['results'][m]['p'])})" for r in rows if r["label"] == "related"
                  and r["results"][m]["call"] not in ("related", "skipped")]
        skipped = [r["pair"] for r in rows if r["label"] == "related" and r["results"][m]["call"] == "skipped"]
        false = [r["pair"] for r in rows if r["label"] == "unrelated" and r["results"][m]["call"] == "related"]
        print_(f"{m}: derived pairs not called related where it ran: {', '.join(misses) or 'none'} "
               f"(skipped on {len(skipped)}); unrelated pairs called related: {', '.join(false) or 'none'}")
    return summary


def build_pairs(panel: Panel, pairs: int, real: bool, log: Callable[[str], None]
                ) -> list[tuple[str, str, str, Path, Path]]:
    """(pair, label, stratum, A, B) of every pair: derived from twin00a, std-matched, seed-only twins, and
    real cross-family models when ``real``."""
    base = panel.twin(0, "a")
    pair_list: list[tuple[str, str, str, Path, Path]] = []
    for name, path in panel.derived(base).items():
        pair_list.append((f"base~{name}", "related", "derived", base, path))
    pair_list.append(("base~std_matched", "unrelated", "std-matched", base, panel.std_twin(base)))
    for i in range(pairs):
        pair_list.append((f"twin{i:02d}", "unrelated", "seed-only", panel.twin(i, "a"), panel.twin(i, "b")))
    if real:
        found = real_models()
        missing = [f"{k}: {v}" for k, v in found.items() if not isinstance(v, Path)]
        if missing:
            log("cross-family pair left out: " + "; ".join(missing))
        else:
            pair_list.append(("smollm2~gemma3", "unrelated", "cross-family", found["smollm2"], found["gemma3"]))
    return pair_list


def describe_models(panel: Panel, pair_list: list[tuple[str, str, str, Path, Path]],
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Loss curve of the twins, seconds per model, weight change and function gap of every relative."""
    losses = [v for k, v in panel.train_log.items() if k.startswith("twin") and "losses" in v]
    if losses:
        curve = np.mean([v["losses"] for v in losses if len(v["losses"]) == len(losses[0]["losses"])], axis=0)
        log(f"from-scratch loss curve (mean of {len(losses)} twins, every 10 steps): "
            + " ".join(f"{x:.2f}" for x in curve))
        log("train seconds per twin model: " + ", ".join(f"{v['seconds']:.0f}" for v in losses))
    info: dict[str, Any] = {}
    log("relatives of twin00a: ||W'-W||/||W|| over shared matrices (overall, min, median), max |logit gap|, "
        "training (steps, loss first -> last, seconds)")
    for pair, label, _, a, b in pair_list:
        if label != "related" and pair != "twin00":  # twin00: an independent pair, for scale
            continue
        name = pair.split("~", 1)[-1]
        change = None if name in panel.surgeries else weight_change(a, b)
        gap = function_gap(a, b, panel.tokens)
        trained = panel.train_log.get(name, {})
        info[name] = {"weight_change": change, "logit_gap": gap, **{k: v for k, v in trained.items() if k != "losses"}}
        ch = "-" if change is None else f"{change['overall']:.3f} {change['min']:.3f} {change['median']:.3f}"
        tr = (f"{trained.get('steps', '-')} steps, loss {trained['first_loss']:.2f} -> {trained['last_loss']:.2f}, "
              f"{trained['seconds']:.0f}s" if "first_loss" in trained else "")
        log(f"  {name:<15} change {ch:<20} gap {gap:9.2e}  {tr}")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.provenance", description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20, help="seed-only twin pairs (2 models each, disjoint)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 3 twin pairs, 60 training steps, 100k tokens of text, no real models")
    ap.add_argument("--steps", type=int, default=None, help="AdamW steps per model (default 150; quick 60)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=None, help=f"tokens of text (default {DEFAULT_TOKENS})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-real", action="store_true", help="leave out the real cross-family pair")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write every pair's results and the summary here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = 3 if args.quick and args.pairs == 20 else args.pairs
    steps = args.steps or (60 if args.quick else 150)
    max_tokens = args.tokens or (100_000 if args.quick else DEFAULT_TOKENS)
    real = not (args.no_real or args.quick)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    log = lambda s: print(s, flush=True)  # noqa: E731
    root = args.cache or cache_root()
    log(f"cache {root}; {pairs} twin pairs; {steps} AdamW steps x {args.batch}x{args.seq} tokens per model; "
        f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    panel = Panel(root, steps=steps, batch=args.batch, seq=args.seq, log=log, max_tokens=max_tokens)
    pair_list = build_pairs(panel, pairs, real, log)
    build_s = time.perf_counter() - t0
    log(f"models ready in {build_s:.0f}s")
    models = describe_models(panel, pair_list, log)
    rows = []
    for pair, label, stratum, a, b in pair_list:
        start = time.perf_counter()
        results = run_methods(a, b, methods)
        # the weights verdict modelkin prints: Holm over the methods whose null is valid for real models
        verdict = FingerprintReport(a=str(a), b=str(b), device="cpu", seed=0, methods=results).finish().verdict
        rows.append({"pair": pair, "label": label, "stratum": stratum, "seconds": time.perf_counter() - start,
                     "verdict": verdict,
                     "results": {m: {"score": r.score, "p": r.p_value, "call": _call(r), "seconds": r.seconds,
                                     "skipped": r.skipped, "null_kind": r.null_kind} for m, r in results.items()}})
        log(f"  {pair}: " + ", ".join(f"{m} {_fmt_p(r.p_value)}" for m, r in results.items()))
    summary = report(rows, methods, log)
    log("\nskipped methods (why), on pairs other than dense~dense where upcycle does not apply:")
    for r in rows:
        why = [f"{m}: {v['skipped']}" for m, v in r["results"].items()
               if v["skipped"] and not (m == "upcycle" and "one MoE and one dense" in v["skipped"])]
        if why:
            log(f"  {r['pair']}: " + "; ".join(why))
    log("\nweights verdict (Holm over the exact tests that ran; descriptive methods never decide):")
    for label in ("related", "unrelated"):
        verdicts = [r["verdict"] for r in rows if r["label"] == label]
        log(f"  {label:<9} " + "  ".join(f"{c} {verdicts.count(c)}" for c in ("related", "inconclusive", "unrelated")))
    wrong = [f"{r['pair']} ({r['verdict']})" for r in rows if r["verdict"] != r["label"]]
    log("  not as labelled: " + (", ".join(wrong) or "none") +
        " (compare adds behaviour: functional identity (R2) calls a permuted copy related)")
    summary["verdict"] = {label: {c: [r["verdict"] for r in rows if r["label"] == label].count(c)
                                  for c in ("related", "inconclusive", "unrelated")} for label in ("related", "unrelated")}
    per_pair = np.mean([r["seconds"] for r in rows])
    log(f"\ntotal {time.perf_counter() - t0:.0f}s (models {build_s:.0f}s); all methods {per_pair:.1f}s per pair "
        f"(median {np.median([r['seconds'] for r in rows]):.1f}s); load average {os.getloadavg()[0]:.1f}")
    if args.json:
        payload = {"rows": rows, "summary": summary, "train": panel.train_log, "models": models}
        atomic_write_text(args.json, json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
