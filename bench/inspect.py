"""`modelkin inspect` throughput (all moments) vs a single-pass numpy read and a naive script.

Writes a multi-GB bf16 sharded safetensors checkpoint into a temp dir, warms the page cache, then
runs each method in its own subprocess (repeats, median): numpy.fromfile of every shard (the read
ceiling), a naive script (safetensors load_file + per-tensor torch std), and
modelkin.inspect_checkpoint (no cache). Reports GB/s and peak RSS of each. Each clock starts after
the method's imports (torch's import is about a second, the same for every method).
``--read`` adds TensorSource.get_tensor of every tensor (what fingerprint, compare and run use), each
tensor's bytes then touched once (a uint8 max), through each safetensors read path: a private map of
each tensor's byte range ("mmap"), positioned reads into a new buffer ("pread"), and the safetensors
library's map of the whole file ("safe_open"); ``--read-only`` runs just those.

Usage (from the repository root; as a file, bench/ would shadow the standard library's inspect):
    python -m bench.inspect [--gb 2.0] [--repeats 3] [--device cpu] [--json FILE] [--dir DIR]
                            [--read all|mmap|pread|safe_open|none] [--read-only]
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and (__spec__ is None or __spec__.name != "bench.inspect"):
    sys.exit("run this benchmark as `python -m bench.inspect ...` from the repository root")

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import textwrap
from pathlib import Path

import torch

NUMPY = """
import numpy as np
files = sorted(Path(DIR).glob("*.safetensors"))
start()
n = 0
for f in files:
    a = np.fromfile(f, dtype=np.uint8)
    n += a.size
    del a
seconds = time.perf_counter() - t0
cpu_seconds = cpu() - cpu0
"""

NAIVE = """
import torch
from safetensors.torch import load_file
files = sorted(Path(DIR).glob("*.safetensors"))
start()
n = 0
for f in files:
    sd = load_file(f)
    for t in sd.values():
        float(t.float().std())
        n += t.numel() * t.element_size()
    del sd
seconds = time.perf_counter() - t0
cpu_seconds = cpu() - cpu0
"""

MODELKIN = """
import modelkin
import modelkin.inspect.scan  # noqa: F401 - imports torch, as the other two do before their clock starts
start()
res = modelkin.inspect_checkpoint(DIR, device=DEVICE, cache=False, progress=False)
seconds = time.perf_counter() - t0
cpu_seconds = cpu() - cpu0
n = res.totals["bytes_read"]
"""

GET_TENSOR = """
import os
os.environ["MODELKIN_SAFETENSORS_READ"] = "{mode}"
import torch
from modelkin.checkpoint import open_checkpoint
start()
n = 0
with open_checkpoint(DIR) as src:
    for name in src.keys():
        t = src.get_tensor(name)
        if t.numel():
            t.reshape(-1).view(torch.uint8).max()  # touch every byte, as any consumer does
        n += t.numel() * t.element_size()
        del t
seconds = time.perf_counter() - t0
cpu_seconds = cpu() - cpu0
"""

WRAP = """
import json, resource, sys, time
from pathlib import Path
DIR, DEVICE = sys.argv[1], sys.argv[2]
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def start():  # the clocks start after the method's imports
    global t0, cpu0
    t0, cpu0 = time.perf_counter(), cpu()
{body}
try:  # VmHWM: this process's own peak (ru_maxrss would include the parent's at fork time)
    peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
except (OSError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu_seconds, "bytes": n, "peak_rss": peak}}))
"""


def make_checkpoint(directory: Path, gb: float) -> dict:
    """bf16 tensors in a Llama-like mix of shapes (largest 256 MB), 4 shards; returns sizes."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shapes = [(32768, 4096), (4096, 4096), (1024, 4096), (11008, 4096), (4096, 11008), (4096,)]
    budget, i, tensors = int(gb * 1e9), 0, {}
    while sum(t.numel() * 2 for t in tensors.values()) < budget:
        shape = shapes[i % len(shapes)] if i else shapes[0]
        tensors[f"model.layers.{i // 6}.t{i % 6}.weight"] = (
            torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
        i += 1
    names = list(tensors)
    per = -(-len(names) // 4)
    for s in range(4):
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        if part:
            save_file(part, str(directory / f"model-{s + 1:05d}-of-00004.safetensors"))
    sizes = [t.numel() * 2 for t in tensors.values()]
    return {"bytes": sum(sizes), "largest": max(sizes), "tensors": len(sizes)}


def warm(directory: Path) -> None:
    for f in directory.glob("*.safetensors"):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def run_one(body: str, directory: Path, device: str) -> dict:
    code = textwrap.dedent(WRAP.format(body=textwrap.dedent(body)))
    out = subprocess.run([sys.executable, "-c", code, str(directory), device],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _inspect_summary(summary: dict, results: dict, info: dict) -> None:
    mk, npy, naive = results["modelkin"], results["numpy_read"], results["naive_torch_std"]
    bound = 3 * info["largest"] / 1e6 + 500
    summary.update({
        "modelkin_vs_numpy": mk["gb_per_s"] / npy["gb_per_s"],
        "modelkin_vs_naive": mk["gb_per_s"] / naive["gb_per_s"],
        "rss_bound_mb": bound, "rss_within_bound": mk["peak_rss_mb"] < bound,
    })
    print(f"modelkin / numpy read = {summary['modelkin_vs_numpy']:.2f}x (target >= 0.75); "
          f"modelkin / naive = {summary['modelkin_vs_naive']:.2f}x (target > 1); "
          f"peak RSS {mk['peak_rss_mb']:.0f} MB vs bound {bound:.0f} MB; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", help="reuse/keep the checkpoint here instead of a temp dir")
    ap.add_argument("--json", help="write the numbers to this file")
    ap.add_argument("--read", choices=("all", "mmap", "pread", "safe_open", "none"), default="all",
                    help="also time get_tensor of every tensor through these safetensors read paths")
    ap.add_argument("--read-only", action="store_true", help="run only the --read methods")
    args = ap.parse_args()
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="modelkin-bench-")
    directory = Path(args.dir or tmp.name)
    info = make_checkpoint(directory, args.gb) if not list(directory.glob("*.safetensors")) else {}
    if not info:
        from safetensors import safe_open

        sizes = []
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                sizes += [h.get_slice(k).get_shape() for k in h.keys()]  # noqa: SIM118 (safe_open is not a dict)
        nbytes = [2 * int(torch.tensor(s).prod()) for s in sizes]
        info = {"bytes": sum(nbytes), "largest": max(nbytes), "tensors": len(nbytes)}
    warm(directory)
    methods = [("numpy_read", NUMPY), ("naive_torch_std", NAIVE), ("modelkin", MODELKIN)]
    if args.read_only:
        methods = []
    modes = {"all": ("mmap", "pread", "safe_open"), "none": ()}.get(args.read, (args.read,))
    methods += [(f"get_tensor_{m}", GET_TENSOR.format(mode=m)) for m in modes]
    runs: dict[str, list[dict]] = {name: [] for name, _ in methods}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all methods alike
        for name, body in methods:
            runs[name].append(run_one(body, directory, args.device))
    results = {}
    for name, _ in methods:
        secs = statistics.median(r["seconds"] for r in runs[name])
        cpu = statistics.median(r["cpu_seconds"] for r in runs[name])
        nbytes = runs[name][0]["bytes"]
        results[name] = {"seconds": secs, "gb_per_s": nbytes / secs / 1e9,
                         "cpu_seconds": cpu, "gb_per_cpu_s": nbytes / cpu / 1e9,
                         "peak_rss_mb": max(r["peak_rss"] for r in runs[name]) / 1e6,
                         "all_seconds": [r["seconds"] for r in runs[name]]}
        print(f"{name:16s} {results[name]['gb_per_s']:7.3f} GB/s  median {secs:7.2f} s  "
              f"{results[name]['gb_per_cpu_s']:7.3f} GB per CPU-s  "
              f"peak RSS {results[name]['peak_rss_mb']:7.0f} MB", flush=True)
    summary = {
        "checkpoint": info, "device": args.device, "cpus": os.cpu_count(),
        "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "results": results,
    }
    if not args.read_only:
        _inspect_summary(summary, results, info)
    read = {m: results[f"get_tensor_{m}"] for m in modes}
    if len(read) > 1:
        summary["get_tensor_vs_safe_open"] = {m: r["gb_per_s"] / read["safe_open"]["gb_per_s"]
                                              for m, r in read.items() if "safe_open" in read}
        print("get_tensor seconds: " + "; ".join(f"{m} {[round(x, 2) for x in r['all_seconds']]}"
                                                 for m, r in read.items())
              + f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
