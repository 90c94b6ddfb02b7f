"""A labelled provenance panel: seed-only twins trained from scratch, relatives made from one of them by real
procedures, every fingerprint method on every pair; confusion, AUROC, margins, p calibration, seconds per pair.

Models are small Llamas (SmolLM2's tokenizer) trained with AdamW on the Python standard library's source
(modelkin.synth.train), cached under $MODELKIN_CACHE_DIR/provenance (else ~/.cache/modelkin-bench/provenance).

Usage (from the repository root): python -m bench.provenance [--pairs N] [--quick] [--steps S] [--json FILE]
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
from modelkin.synth import derive, train
from modelkin.synth.variants import permute_dense, read_dense, write_hf_checkpoint
from modelkin.utils import atomic_write_text

METHODS = ("csu_aligned", "permtest", "std_curve", "pcs", "invariants", "spectral")
EXACT = ("csu_aligned", "permtest", "pcs")  # nulls that hold for independently trained real models
CALLS = ("related", "inconclusive", "unrelated", "skipped")
# invariants' token-relabelling null costs ~40 s per pair at 1024 tokens on a loaded core; 512 keeps it usable
OPTIONS: dict[str, dict[str, Any]] = {"invariants": {"n_tokens": 512}}


def cache_root() -> Path:
    base = os.environ.get("MODELKIN_CACHE_DIR")
    return Path(base) / "provenance" if base else Path.home() / ".cache" / "modelkin-bench" / "provenance"


class Panel:
    """Builds (or finds in the cache) every model of the panel; one directory per model."""

    def __init__(self, root: Path, *, steps: int, batch: int, seq: int, log: Callable[[str], None]):
        self.root, self.steps, self.batch, self.seq, self.log = root, steps, batch, seq, log
        self.models = root / f"steps{steps}-b{batch}x{seq}"
        self.tok = train.write_tokenizer(root / "tokenizer")
        self.tokens = self._tokens("stdlib", 0)
        self.other_tokens = self._tokens("stdlib-other", 400)  # later stdlib files: text for the fine-tunes
        self.train_log: dict[str, Any] = {}

    def _tokens(self, name: str, skip_files: int) -> torch.Tensor:
        path = self.root / f"{name}.npy"
        if not path.is_file():
            ids = train.stdlib_tokens(self.tok, max_tokens=400_000, skip_files=skip_files).numpy()
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, ids)
            os.replace(tmp, path)
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))

    def _ensure(self, name: str, build: Callable[[Path], Any]) -> Path:
        out = self.models / name
        meta = self.models / f"{name}.train.json"
        if not (out / "model.safetensors").is_file():
            start = time.perf_counter()
            result = build(out)
            info = result.summary() if isinstance(result, train.TrainResult) else {}
            if isinstance(result, train.TrainResult):
                info["losses"] = [round(x, 4) for x in result.losses]
            info["seconds"] = round(time.perf_counter() - start, 2)
            atomic_write_text(meta, json.dumps(info))
            loss = f" (loss {info['first_loss']:.2f} -> {info['last_loss']:.2f})" if "losses" in info else ""
            self.log(f"  built {name} in {info['seconds']:.1f}s{loss}")
        if meta.is_file():
            self.train_log[name] = json.loads(meta.read_text())
        return out

    def twin(self, i: int, side: str) -> Path:
        seed = 2 * i + (1 if side == "a" else 2)
        return self._ensure(f"twin{i:02d}{side}", lambda out: train.train(
            out, seed=seed, data_seed=10_000 + seed, tokens=self.tokens, tokenizer_dir=self.tok,
            steps=self.steps, batch=self.batch, seq=self.seq))

    def surgery(self, base: Path, name: str, fn: Callable[..., Any]) -> Path:
        def build(out: Path) -> None:
            config, tensors = read_dense(base)
            config, tensors = fn(config, tensors)
            write_hf_checkpoint(out, config, tensors, tokenizer_from=self.tok)
        return self._ensure(name, build)

    def finetuned(self, base: Path, name: str, *, steps: int, lr: float, seed: int) -> Path:
        return self._ensure(name, lambda out: train.finetune(
            base, out, steps=steps, lr=lr, seed=seed, tokens=self.other_tokens, tokenizer_from=self.tok,
            batch=self.batch, seq=self.seq, warmup=0.05))

    def derived(self, base: Path) -> dict[str, Path]:
        cfg = json.loads((base / "config.json").read_text())
        middle = [int(cfg["num_hidden_layers"]) // 2]
        surgery = self.surgery
        return {
            "ft_light": self.finetuned(base, "ft_light", steps=max(10, self.steps // 10), lr=3e-4, seed=1),
            "ft_heavy": self.finetuned(base, "ft_heavy", steps=self.steps, lr=3e-3, seed=2),
            "depth_pruned": surgery(base, "depth_pruned", lambda c, t: derive.drop_layers(c, t, middle)),
            "width_pruned": surgery(base, "width_pruned", lambda c, t: derive.prune_mlp(c, t, 0.75)),
            "rotated": surgery(base, "rotated", lambda c, t: derive.rotate_residual(c, t, seed=3)),
            "mlp_permuted": surgery(base, "mlp_permuted", lambda c, t: derive.permute_mlp(c, t, seed=4)),
            "permuted_copy": surgery(base, "permuted_copy", lambda c, t: (c, permute_dense(c, t, seed=5))),
        }

    def std_twin(self, base: Path) -> Path:
        return self.surgery(base, "std_matched", lambda c, t: derive.std_matched(c, t, seed=6))


def function_gap(a: Path, b: Path, tokens: torch.Tensor) -> float:
    """Max |logit difference| of two checkpoints on 2 windows of text (0 for a function-preserving copy)."""
    from modelkin.synth.train import load_trainable

    batch = torch.stack([tokens[s:s + 33] for s in (1000, 50_000)])
    outs = []
    for path in (a, b):
        _, model = load_trainable(path)
        L = 32
        with torch.no_grad():
            outs.append(model(batch[:, :L], positions_BL=torch.arange(L).expand(2, L),
                              mask_BLS=torch.ones(L, L, dtype=torch.bool).tril().expand(2, L, L)))
    return float((outs[0] - outs[1]).abs().max())


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
        print_(f"{m}: seed-twin p-values (sorted): " + " ".join(f"{p:.3f}" for p in twin_p))
    for m in [x for x in EXACT if x in methods]:
        misses = [f"{r['pair']} ({r['results'][m]['skipped'] or 'p=' + _fmt_p(r['results'][m]['p'])})"
                  for r in rows if r["label"] == "related" and r["results"][m]["call"] != "related"]
        false = [r["pair"] for r in rows if r["label"] == "unrelated" and r["results"][m]["call"] == "related"]
        print_(f"{m}: derived pairs not called related: {', '.join(misses) or 'none'}; "
               f"unrelated pairs called related: {', '.join(false) or 'none'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.provenance", description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20, help="seed-only twin pairs (2 models each, disjoint)")
    ap.add_argument("--quick", action="store_true", help="3 twin pairs, 60 training steps (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="AdamW steps per model (default 200; quick 60)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write every pair's results and the summary here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = 3 if args.quick and args.pairs == 20 else args.pairs
    steps = args.steps or (60 if args.quick else 200)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    log = lambda s: print(s, flush=True)  # noqa: E731
    root = args.cache or cache_root()
    log(f"cache {root}; {pairs} twin pairs; {steps} AdamW steps x {args.batch}x{args.seq} tokens per model; "
        f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    panel = Panel(root, steps=steps, batch=args.batch, seq=args.seq, log=log)
    base = panel.twin(0, "a")
    pair_list: list[tuple[str, str, str, Path, Path]] = []
    for name, path in panel.derived(base).items():
        pair_list.append((f"base~{name}", "related", "derived", base, path))
    pair_list.append(("base~std_matched", "unrelated", "std-matched", base, panel.std_twin(base)))
    for i in range(pairs):
        pair_list.append((f"twin{i:02d}", "unrelated", "seed-only", panel.twin(i, "a"), panel.twin(i, "b")))
    build_s = time.perf_counter() - t0
    losses = [v for k, v in panel.train_log.items() if k.startswith("twin") and "losses" in v]
    if losses:
        curve = np.mean([v["losses"] for v in losses if len(v["losses"]) == len(losses[0]["losses"])], axis=0)
        log(f"models ready in {build_s:.0f}s; from-scratch loss curve (mean of {len(losses)} twins, every 10 "
            f"steps): " + " ".join(f"{x:.2f}" for x in curve))
        log("train seconds per twin model: " + ", ".join(f"{v['seconds']:.0f}" for v in losses))
    for name in ("ft_light", "ft_heavy", "rotated", "mlp_permuted", "permuted_copy"):
        path = panel.models / name
        log(f"max |logit A - logit {name}| = {function_gap(base, path, panel.tokens):.2e}")
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
    log(f"\ntotal {time.perf_counter() - t0:.0f}s (models {build_s:.0f}s); all methods {per_pair:.1f}s per pair; "
        f"load average {os.getloadavg()[0]:.1f}")
    if args.json:
        payload = {"rows": rows, "summary": summary, "train": panel.train_log}
        atomic_write_text(args.json, json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
