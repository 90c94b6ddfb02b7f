"""One rank of the torchrun checks in test_parallel_torchrun.py (launched there; not a test module).

    torchrun --standalone --nproc_per_node 2 tests/parallel_worker.py OUTDIR SMOLLM2_GGUF TINY_PANGU

Every rank writes OUTDIR/rank{R}.pt (logits, tokens, routing, bytes read) and the captured stdout
of the in-process CLI calls; rank 0 alone writes the CLI's --json files.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from modelkin.backends import get_backend
from modelkin.checkpoint import open_checkpoint
from modelkin.cli import main as cli_main
from modelkin.runtime.api import Model, load
from modelkin.runtime.parallel import init_distributed, shutdown
from modelkin.runtime.parallel.shard import build, read_weights

SMOL_IDS = [[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378], [1, 5248, 8844, 28, 2]]
TINY_IDS = [[1, 50, 34, 28, 46, 31, 25, 13, 30, 37], [1, 2, 3, 4]]


def run_model(model: Model, ids: list[list[int]], new_tokens: int) -> dict:
    out = {"logits": model.logits(ids).cpu()}
    result = model.generate(ids[0], max_new_tokens=new_tokens)
    out["tokens"] = result.tokens
    out["routing"] = result.routing
    model.module.double()  # the same weights in float64: parallel vs single maths, no fp32 noise
    out["logits64"] = model.logits(ids).cpu()
    return out


def tiny(path: str, ctx) -> dict:
    with open_checkpoint(path) as source:
        module = read_weights(source, build(source, ctx=ctx), device=ctx.backend.device, dtype=torch.float32)
        read = source.bytes_read
    model = Model(module, tokenizer=None, backend=ctx.backend, dtype=torch.float32, path=path)
    return {**run_model(model, TINY_IDS, 8), "bytes_read": read}


def cli(args: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli_main(args)
    return {"code": code, "stdout": buf.getvalue()}


def main(outdir: Path, smollm2: str, pangu: str) -> None:
    cpu = get_backend("cpu")
    ctx_tp = init_distributed(cpu, tp=2, ep=1)
    ctx_ep = init_distributed(cpu, tp=1, ep=2)
    rank = ctx_tp.rank
    results = {
        "smollm2_tp2": run_model(load(smollm2, parallel=ctx_tp), SMOL_IDS, 10),
        "pangu_ep2": tiny(pangu, ctx_ep),
        "pangu_tp2": tiny(pangu, ctx_tp),
        "cli_run": cli(
            [
                "run",
                pangu,
                "--prompt",
                "hello world",
                "--max-new-tokens",
                "6",
                "--ep",
                "2",
                "--json",
                str(outdir / "run_ep2.json"),
            ]
        ),
        "cli_inspect": cli(
            ["inspect", pangu, "--no-cache", "--no-table", "--json", str(outdir / "inspect_pangu.json")]
        ),
        "cli_inspect_smol": cli(
            [
                "inspect",
                smollm2,
                "--no-cache",
                "--no-table",
                "--select",
                "attention",
                "--json",
                str(outdir / "inspect_smol.json"),
            ]
        ),
    }
    torch.save(results, outdir / f"rank{rank}.pt")
    (outdir / f"rank{rank}.done").write_text(json.dumps({"rank": rank}))
    shutdown()


main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
