"""Two processes on CPU/gloo under torchrun (one launch, tests/parallel_worker.py) against one process:
SmolLM2-135M with --tp 2, tiny Pangu MoE (4 MoGE groups) with --ep 2 and --tp 2, sharded inspection,
and the `modelkin run` / `modelkin inspect` commands under torchrun (rank 0 alone prints and writes).

fp32 logits of a split matmul differ from the unsplit one by rounding (summation order): the
float64 runs of the same weights must agree within 1e-5 (they agree to ~1e-12); the fp32 runs must
pick the same greedy tokens and differ by no more than fp32 itself differs from float64.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelkin.checkpoint import open_checkpoint

WORKER = Path(__file__).with_name("parallel_worker.py")
SMOL_IDS = [[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378], [1, 5248, 8844, 28, 2]]
TINY_IDS = [[1, 50, 34, 28, 46, 31, 25, 13, 30, 37], [1, 2, 3, 4]]


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def pangu(tmp_path_factory) -> Path:
    from modelkin.synth.tiny import make_tiny

    return make_tiny("pangu_moe", tmp_path_factory.mktemp("pangu") / "tiny")  # 16 experts, 4 groups


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, smollm2_gguf, pangu) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "MODELKIN_CACHE_DIR": str(out / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [
        *_torchrun(),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(out),
        str(smollm2_gguf),
        str(pangu),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _single(path: Path, ids: list[list[int]], new_tokens: int) -> dict:
    import modelkin

    model = modelkin.load(path, device="cpu", dtype="float32")
    out = {"logits": model.logits(ids)}
    result = model.generate(ids[0], max_new_tokens=new_tokens)
    out["tokens"], out["routing"] = result.tokens, result.routing
    model.module.double()
    out["logits64"] = model.logits(ids)
    out["logits_fp32_vs_fp64"] = (out["logits"].double() - out["logits64"]).abs().max().item()
    return out


def _check_logits(par: dict, ref: dict, mask: list[list[int]]) -> None:
    keep = torch.zeros(ref["logits"].shape[:2], dtype=torch.bool)
    for i, row in enumerate(mask):
        keep[i, : len(row)] = True  # right-padded positions hold padding logits
    diff64 = (par["logits64"] - ref["logits64"]).abs()[keep].max().item()
    diff32 = (par["logits"] - ref["logits"]).abs()[keep].max().item()
    assert diff64 < 1e-5, diff64
    # two float32 computations in different summation orders (K split over ranks) differ by at most about
    # the sum of their errors; each rank's own error against its float64 run is of the single run's size
    ref_err = max(ref["logits_fp32_vs_fp64"], 1e-5)
    par_err = (par["logits"].double() - par["logits64"]).abs()[keep].max().item()
    assert par_err <= 2 * ref_err, (par_err, ref_err)
    assert diff32 <= 2 * ref_err, (diff32, ref_err)
    assert par["tokens"] == ref["tokens"]


def test_smollm2_tp2_logits_and_greedy_tokens(ranks, smollm2_gguf):
    _, (r0, r1) = ranks
    ref = _single(smollm2_gguf, SMOL_IDS, 10)
    for r in (r0, r1):  # every rank holds the full, replicated result
        _check_logits(r["smollm2_tp2"], ref, SMOL_IDS)
    assert torch.equal(r0["smollm2_tp2"]["logits"], r1["smollm2_tp2"]["logits"])


@pytest.fixture(scope="module")
def pangu_single(pangu) -> dict:
    ref = _single(pangu, TINY_IDS, 8)
    with open_checkpoint(pangu) as src:
        ref["bytes_total"] = sum(src.info(n).nbytes for n in src)
    return ref


@pytest.mark.parametrize("layout", ["pangu_ep2", "pangu_tp2"])
def test_pangu_moe_parallel_logits_and_routing(ranks, pangu_single, layout):
    _, rs = ranks
    for r in rs:
        par = r[layout]
        _check_logits(par, pangu_single, TINY_IDS)
        for got, want in zip(par["routing"]["layers"], pangu_single["routing"]["layers"], strict=True):
            assert got["expert_counts"] == want["expert_counts"]
            assert got["num_tokens"] == want["num_tokens"]
            assert got["token_entropy"] == pytest.approx(want["token_entropy"], rel=1e-6)
            assert got["load_entropy"] == pytest.approx(want["load_entropy"], rel=1e-12)


def test_each_rank_reads_only_its_shard(ranks, pangu_single):
    _, rs = ranks
    total = pangu_single["bytes_total"]
    for layout in ("pangu_ep2", "pangu_tp2"):
        reads = [r[layout]["bytes_read"] for r in rs]
        # replicated tensors (embeddings, lm_head, norms, routers) on both, the rest split in two
        assert all(0.5 * total < b < 0.8 * total for b in reads), (layout, reads, total)
        assert sum(reads) < 1.5 * total


def test_cli_run_under_torchrun_rank0_writes(ranks, pangu):
    out, (r0, r1) = ranks
    assert r0["cli_run"]["code"] == r1["cli_run"]["code"] == 0
    assert r0["cli_run"]["stdout"].strip() and r1["cli_run"]["stdout"] == ""
    report = json.loads((out / "run_ep2.json").read_text())
    assert report["parallel"] == {"tp": 1, "ep": 2, "world_size": 2}
    import modelkin

    single = modelkin.load(pangu, device="cpu").generate("hello world", max_new_tokens=6)
    assert report["tokens"] == single.tokens
    assert [la["expert_counts"] for la in report["routing"]["layers"]] == [
        la["expert_counts"] for la in single.routing["layers"]
    ]


def _without_timing(report: dict) -> dict:
    totals = {k: v for k, v in report["totals"].items() if k not in ("seconds", "gb_per_s")}
    return {**report, "totals": totals}


@pytest.mark.parametrize(("name", "select"), [("inspect_pangu", "all"), ("inspect_smol", "attention")])
def test_sharded_inspection_equals_single_process(ranks, pangu, smollm2_gguf, name, select):
    from modelkin.inspect.scan import ScanOptions, scan

    out, (r0, r1) = ranks
    key = "cli_inspect" if name == "inspect_pangu" else "cli_inspect_smol"
    assert r0[key]["code"] == r1[key]["code"] == 0 and r1[key]["stdout"] == ""
    sharded = json.loads((out / f"{name}.json").read_text())
    path = pangu if name == "inspect_pangu" else smollm2_gguf
    with open_checkpoint(path) as src:  # default threads here, OMP_NUM_THREADS=1 in the ranks
        single = scan(src, "cpu", ScanOptions(select=select, cache=False)).to_json()
    from modelkin.commands.common import to_json_text

    assert _without_timing(sharded) == _without_timing(json.loads(to_json_text(single)))
