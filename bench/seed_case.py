"""The seed case at full scale: `fingerprint` of a Pangu-Pro-MoE-72B-layout checkpoint against a
Qwen2.5-14B-layout one, as sparse safetensors shards in which only the tensors (and embedding rows) the
methods read hold data; every other byte is a hole. Prints seconds, bytes read and peak RssAnon per method.

    python -m bench.seed_case [--dir DIR] [--layers N] [--small]

The pair is cached in DIR (default $MODELKIN_CACHE_DIR/seed-case or ~/.cache/modelkin-bench/seed-case).
Full size: ~150 GB apparent, ~40 GB on disk. Pangu's attention is copied from the dense model and its
experts (and shared expert) are the dense MLP's neurons split at random, for the layers the methods read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

QWEN_14B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
            "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
            "intermediate_size": 13824, "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
PANGU_72B = {"architectures": ["PanguProMoEForCausalLM"], "model_type": "PanguProMoE", "hidden_size": 5120,
             "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "num_experts": 64,
             "num_experts_per_tok": 8, "moe_intermediate_size": 1344, "shared_expert_intermediate_size": 5376,
             "vocab_size": 153376, "rms_norm_eps": 1e-5, "rope_theta": 1.6e7, "hidden_act": "silu",
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
TOKENS = (151646, 153376)  # tokenizer entries of Qwen2.5 and Pangu; the first 151646 are shared here
SMALL = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 704,
         "num_experts": 8, "num_experts_per_tok": 4, "moe_intermediate_size": 64,
         "shared_expert_intermediate_size": 192,
         "vocab_size": (3200, 3300)}
SHARD_BYTES = 4 << 30
DATA_ROWS = 1024  # invariants' default n_tokens: the last shared tokens' embedding rows hold data


@dataclass
class Layout:
    """One checkpoint: tensor names and shapes in file order, and which hold data (rows for embeddings)."""

    config: dict
    tensors: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    data: dict[str, tuple[int, int] | None] = field(default_factory=dict)  # name -> row range, None: all


def configs(layers: int | None = None, small: bool = False) -> tuple[dict, dict, tuple[int, int]]:
    dense, moe, tokens = dict(QWEN_14B), dict(PANGU_72B), TOKENS
    if small:
        vocab = SMALL["vocab_size"]
        for cfg, v in ((dense, vocab[0]), (moe, vocab[1])):
            cfg.update({k: v2 for k, v2 in SMALL.items() if k in cfg and k != "vocab_size"}, vocab_size=v)
        tokens = (vocab[0] - 100, vocab[1])
    if layers:
        dense["num_hidden_layers"] = moe["num_hidden_layers"] = layers
    return dense, moe, tokens


def read_layers(n: int) -> tuple[list[int], list[int]]:
    """(upcycle detector's MoE layers, invariants' layers) under the default options."""
    from modelkin.compare.fingerprints.weights import pick_layers

    return pick_layers(list(range(n)), 4), [n - 2, n - 1]


def _attention(cfg: dict, p: str, o_bias: bool) -> list[tuple[str, tuple[int, ...]]]:
    d, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [(f"{p}.input_layernorm.weight", (d,))]
    for name, rows in (("q", q), ("k", kv), ("v", kv)):
        out += [(f"{p}.self_attn.{name}_proj.weight", (rows, d)),
                (f"{p}.self_attn.{name}_proj.bias", (rows,))]
    out.append((f"{p}.self_attn.o_proj.weight", (d, q)))
    if o_bias:
        out.append((f"{p}.self_attn.o_proj.bias", (d,)))
    return out + [(f"{p}.post_attention_layernorm.weight", (d,))]


def dense_layout(cfg: dict, shared_rows: int) -> Layout:
    d, f, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    out = Layout(cfg)
    out.tensors.append(("model.embed_tokens.weight", (v, d)))
    out.data["model.embed_tokens.weight"] = (shared_rows - DATA_ROWS, shared_rows)
    _, inv = read_layers(n)
    for i in range(n):
        p = f"model.layers.{i}"
        out.tensors += _attention(cfg, p, o_bias=False)
        out.tensors += [(f"{p}.mlp.gate_proj.weight", (f, d)), (f"{p}.mlp.up_proj.weight", (f, d)),
                        (f"{p}.mlp.down_proj.weight", (d, f))]
        for name, _ in out.tensors:
            if name.startswith(p + ".") and (".self_attn." in name or "layernorm" in name
                                             or name.endswith(("gate_proj.weight", "up_proj.weight"))
                                             or i in inv):
                out.data[name] = None
    out.tensors += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    out.data["model.norm.weight"] = None
    return out


def moe_layout(cfg: dict, shared_rows: int) -> Layout:
    d, v, n, e = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["num_experts"]
    f, s = cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
    out = Layout(cfg)
    out.tensors.append(("model.embed_tokens.weight", (v, d)))
    out.data["model.embed_tokens.weight"] = (shared_rows - DATA_ROWS, shared_rows)
    up, inv = read_layers(n)
    for i in range(n):
        p = f"model.layers.{i}"
        out.tensors += _attention(cfg, p, o_bias=True)
        out.tensors += [(f"{p}.mlp.gate.weight", (e, d)), (f"{p}.mlp.router_scale", (1, e))]
        for j in range(e):
            out.tensors += [(f"{p}.mlp.experts.{j}.gate_proj.weight", (f, d)),
                            (f"{p}.mlp.experts.{j}.up_proj.weight", (f, d)),
                            (f"{p}.mlp.experts.{j}.down_proj.weight", (d, f))]
        out.tensors += [(f"{p}.mlp.shared_expert.gate_proj.weight", (s, d)),
                        (f"{p}.mlp.shared_expert.up_proj.weight", (s, d)),
                        (f"{p}.mlp.shared_expert.down_proj.weight", (d, s))]
        for name, _ in out.tensors:
            if not name.startswith(p + "."):
                continue
            if ".self_attn." in name or "layernorm" in name:
                out.data[name] = None
            elif ".experts." in name or ".shared_expert." in name:
                if i in inv or (i in up and not name.endswith("down_proj.weight")):
                    out.data[name] = None
    out.tensors += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    out.data["model.norm.weight"] = None
    return out


class _Shards:
    """Sparse safetensors shards: headers and holes first (truncate), then data written where asked."""

    def __init__(self, folder: Path, layout: Layout):
        self.folder, self.where = folder, {}
        groups, size = [[]], 0
        for name, shape in layout.tensors:
            nbytes = 2 * math.prod(shape)
            if size and size + nbytes > SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append((name, shape))
            size += nbytes
        names = ["model.safetensors"] if len(groups) == 1 else \
            [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        for file, group in zip(names, groups):
            header, start = {"__metadata__": {"format": "pt"}}, 0
            for name, shape in group:
                nbytes = 2 * math.prod(shape)
                header[name] = {"dtype": "BF16", "shape": list(shape),
                                "data_offsets": [start, start + nbytes]}
                start += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(folder / file, "wb") as f:
                f.write(len(raw).to_bytes(8, "little") + raw)
                f.truncate(8 + len(raw) + start)
            base = 8 + len(raw)
            for name, shape in group:
                self.where[name] = (folder / file, base + header[name]["data_offsets"][0], shape)
        if len(names) > 1:
            index = {"metadata": {"total_size": sum(2 * math.prod(s) for _, s in layout.tensors)},
                     "weight_map": {n: self.where[n][0].name for n, _ in layout.tensors}}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index) + "\n")

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        file, offset, shape = self.where[name]
        rows = tensor.shape[0] if len(shape) > 1 else shape[0]
        assert tuple(tensor.shape) == (rows, *shape[1:]) and tensor.dtype == torch.bfloat16, name
        partial = name.endswith("embed_tokens.weight")  # only the embedding gets some rows
        assert first_row + rows <= shape[0] and (partial or rows == shape[0]), name
        row = 2 * math.prod(shape[1:]) if len(shape) > 1 else 2
        with open(file, "r+b") as f:
            f.seek(offset + first_row * row)
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def _tokenizer(folder: Path, n: int) -> None:
    vocab = {f"t{i}": i for i in range(n)}
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []}}
    (folder / "tokenizer.json").write_text(json.dumps(data))


def build(root: Path, *, layers: int | None = None, small: bool = False,
          seed: int = 0) -> tuple[Path, Path, dict]:
    """Write (or reuse) the pair under ``root``: (pangu dir, qwen dir, {"pangu": Layout, "qwen": Layout})."""
    dense_cfg, moe_cfg, tokens = configs(layers, small)
    layouts = {"qwen": dense_layout(dense_cfg, tokens[0]), "pangu": moe_layout(moe_cfg, tokens[0])}
    key = json.dumps([dense_cfg, moe_cfg, tokens, seed, 3], sort_keys=True)
    done = root / "done.json"
    if done.is_file() and done.read_text() == key:
        return root / "pangu", root / "qwen", layouts
    gen = torch.Generator().manual_seed(seed)
    pool = _Pool(dense_cfg["hidden_size"], gen)
    shards = {}
    for tag, cfg, n_tok in (("qwen", dense_cfg, tokens[0]), ("pangu", moe_cfg, tokens[1])):
        folder = root / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        _tokenizer(folder, n_tok)
        shards[tag] = _Shards(folder, layouts[tag])
    _fill(shards, layouts, dense_cfg, moe_cfg, pool)
    done.write_text(key)
    return root / "pangu", root / "qwen", layouts


class _Pool:
    """Gaussian bf16 values drawn once; each tensor is a window at a random offset (not a multiple of the
    row length, so no row repeats another tensor's row), times its std: GBs of data at memcpy speed."""

    def __init__(self, d: int, gen: torch.Generator):
        self.gen, self.d = gen, d
        self.size = 1 << 28 if d >= 4096 else 1 << 20
        self.values = torch.randn(self.size + self.size // 4, generator=gen).to(torch.bfloat16)

    def __call__(self, shape: tuple[int, ...], std: float = 0.02) -> torch.Tensor:
        numel = math.prod(shape)
        out = torch.empty(numel, dtype=torch.bfloat16)
        done = 0
        while done < numel:
            start = int(torch.randint(0, self.size - self.d, (1,), generator=self.gen))
            take = min(numel - done, self.values.numel() - start)
            out[done:done + take] = self.values[start:start + take]
            done += take
        return (out * std).reshape(shape)


def _fill(shards: dict, layouts: dict, dense_cfg: dict, moe_cfg: dict, pool: _Pool) -> None:
    dense, moe = layouts["qwen"], layouts["pangu"]
    n, d = dense_cfg["num_hidden_layers"], dense_cfg["hidden_size"]
    e, f = moe_cfg["num_experts"], moe_cfg["moe_intermediate_size"]
    gen = pool.gen

    def rand(shape, std=0.02):
        return pool(shape, std)

    lo, hi = dense.data["model.embed_tokens.weight"]
    emb = rand((hi - lo, d))
    for tag in ("qwen", "pangu"):
        shards[tag].write("model.embed_tokens.weight", emb, lo)
        shards[tag].write("model.norm.weight", (1 + rand((d,), 0.1).float()).to(torch.bfloat16))
    shapes = dict(dense.tensors)
    for i in range(n):
        p = f"model.layers.{i}"
        depth = 0.02 * (1.0 + 0.5 * math.sin(i / 3.0) + i / n)  # a depth trend, as trained models have
        for name, shape in dense.tensors:
            if not name.startswith(p + ".") or name not in dense.data:
                continue
            if ".self_attn." in name or "layernorm" in name:
                t = rand(shape, depth) if len(shape) == 2 else \
                    (1 + rand(shape, 0.1).float()).to(torch.bfloat16)
                shards["qwen"].write(name, t)
                shards["pangu"].write(name, t)
        if f"{p}.self_attn.o_proj.bias" in moe.data:
            shards["pangu"].write(f"{p}.self_attn.o_proj.bias", torch.zeros(d, dtype=torch.bfloat16))
        mlp = {r: rand(shapes[f"{p}.mlp.{r}_proj.weight"], depth) if f"{p}.mlp.{r}_proj.weight" in dense.data
               else None for r in ("gate", "up", "down")}
        for r, t in mlp.items():
            if t is not None:
                shards["qwen"].write(f"{p}.mlp.{r}_proj.weight", t)
        if not any(k.startswith(f"{p}.mlp.experts.") for k in moe.data):
            continue
        width, shared = dense_cfg["intermediate_size"], moe_cfg["shared_expert_intermediate_size"]
        if e * f + shared <= width:  # a partition of the dense neurons
            order = torch.randperm(width, generator=gen)
            parts = [(f"{p}.mlp.experts.{j}", order[j * f:(j + 1) * f]) for j in range(e)]
            parts.append((f"{p}.mlp.shared_expert", order[e * f:e * f + shared]))
        else:  # more expert neurons than dense ones (72B from 14B): each expert a random subset of them
            parts = [(f"{p}.mlp.experts.{j}", torch.randperm(width, generator=gen)[:f]) for j in range(e)]
            parts.append((f"{p}.mlp.shared_expert", torch.randperm(width, generator=gen)[:shared]))
        for prefix, idx in parts:
            for r in ("gate", "up", "down"):
                name = f"{prefix}.{r}_proj.weight"
                if name in moe.data and mlp[r] is not None:
                    shards["pangu"].write(name, mlp[r][:, idx] if r == "down" else mlp[r][idx])


class PeakAnon:
    """Samples RssAnon (kB in /proc/self/status) in a thread; ``take()`` returns and resets the peak."""

    def __init__(self, every: float = 0.05):
        self.peak = self.overall = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            value = self.now()
            self.peak, self.overall = max(self.peak, value), max(self.overall, value)

    def take(self) -> int:
        peak, self.peak = max(self.peak, self.now()), self.now()
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(pangu: Path, qwen: Path, *, methods: str | None = None, options: dict | None = None,
        echo=print) -> dict:
    """Fingerprint the pair through open ModelWeights; per method seconds, bytes read, peak RssAnon."""
    from modelkin.checkpoint import open_checkpoint
    from modelkin.compare.api import fingerprint
    from modelkin.compare.fingerprints.weights import ModelWeights

    cpu = torch.device("cpu")
    peak = PeakAnon()
    rows = {}
    start = time.perf_counter()

    def done(result) -> None:
        io = result.details.get("io", {})
        rows[result.name] = {"seconds": result.seconds, "bytes_a": io.get("a", {}).get("bytes_read", 0),
                             "bytes_b": io.get("b", {}).get("bytes_read", 0), "peak_anon": peak.take(),
                             "score": result.score, "p": result.p_value, "skipped": result.skipped}
        r = rows[result.name]
        echo(f"  {result.name:12s} {r['seconds']:7.1f} s  read A {r['bytes_a'] / 1e6:9.1f} MB  "
             f"B {r['bytes_b'] / 1e6:9.1f} MB  peak anon {r['peak_anon'] / 1e9:5.2f} GB  "
             f"score {r['score']}  p {r['p']}  {r['skipped'] or ''}")

    with open_checkpoint(pangu) as sa, open_checkpoint(qwen) as sb:
        wa, wb = ModelWeights(sa, cpu, "pangu-72b-layout"), ModelWeights(sb, cpu, "qwen2.5-14b-layout")
        report = fingerprint(wa, wb, methods=methods, device="cpu", options=options,
                             progress=lambda name: echo(f"running {name}…"), on_result=done)
        reads = {"pangu": dict(wa.reads), "qwen": dict(wb.reads)}
        stats = {"pangu": wa.stats, "qwen": wb.stats}
    peak.stop()
    return {"methods": rows, "verdict": report.verdict, "seconds": time.perf_counter() - start,
            "peak_anon": peak.overall, "stats": stats, "reads": reads}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.seed_case", description=__doc__.splitlines()[0])
    cache = Path(os.environ.get("MODELKIN_CACHE_DIR", Path.home() / ".cache" / "modelkin-bench"))
    parser.add_argument("--dir", type=Path, default=cache / "seed-case")
    parser.add_argument("--layers", type=int, help="fewer layers than the real 48")
    parser.add_argument("--small", action="store_true", help="small widths (a quick check of the machinery)")
    parser.add_argument("--methods", help="fingerprint methods (default: all)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    pangu, qwen, _ = build(args.dir, layers=args.layers, small=args.small)
    print(f"pair ready in {time.perf_counter() - t:.0f} s under {args.dir} "
          f"({sum(f.stat().st_size for f in args.dir.rglob('*.safetensors')) / 1e9:.0f} GB apparent, "
          f"{sum(f.stat().st_blocks * 512 for f in args.dir.rglob('*.safetensors')) / 1e9:.1f} GB on disk)")
    out = run(pangu, qwen, methods=args.methods)
    print(f"verdict {out['verdict']}; {out['seconds'] / 60:.1f} min; "
          f"peak RssAnon {out['peak_anon'] / 1e9:.2f} GB; load average {os.getloadavg()}")
    if args.json:
        numbers = {k: v for k, v in out.items() if k != "reads"}
        args.json.write_text(json.dumps(numbers, indent=1, default=str))


if __name__ == "__main__":
    main()
