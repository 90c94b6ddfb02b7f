"""Memory planning: exact weight and KV-cache bytes per rank (checked against arithmetic on the
config), the refusal before any weight is read (with the plan and the --tp that would fit), and
`modelkin run --dry-run`."""

from __future__ import annotations

import json

import pytest
import torch

from modelkin.backends.base import Backend
from modelkin.checkpoint import open_checkpoint
from modelkin.cli import main as cli_main
from modelkin.errors import DeviceError, InputError
from modelkin.runtime.parallel.memory_plan import fitting_tp, parse_bytes, plan_memory, refuse


class FakeGPU(Backend):
    """An accelerator with a stated amount of free memory (each rank its own device)."""

    name = "cuda"
    dist_backend = "nccl"

    def __init__(self, free: int):
        super().__init__(0)
        self.free = free

    def memory_info(self):
        return {"total": self.free, "free": self.free, "allocated": 0, "peak": 0}

    def default_dtype(self):
        return torch.bfloat16


def test_parse_bytes():
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5e9") == 1_500_000_000
    assert parse_bytes(" 64 kb ") == 64_000
    with pytest.raises(InputError, match="cannot read 'lots' as a memory size"):
        parse_bytes("lots")


def _smol_expected(tp_rank_heads: tuple[int, int], neurons: int, length: int, size: int) -> tuple[int, int]:
    """SmolLM2-135M from its config: V 49152, D 576, 30 layers, head_dim 64, tied embeddings."""
    vocab, dim, layers, dh = 49152, 576, 30, 64
    q, kv = tp_rank_heads
    per_layer = (q + 2 * kv) * dh * dim + dim * q * dh + 3 * neurons * dim + 2 * dim
    weights = (vocab * dim + dim + layers * per_layer) * size
    kv_cache = layers * 2 * kv * dh * length * size
    return weights, kv_cache


def test_smollm2_plan_is_exact_per_rank(smollm2_gguf):
    with open_checkpoint(smollm2_gguf) as src:
        one = plan_memory(src, backend=FakeGPU(10**12), dtype=torch.bfloat16, max_len=100, prompt_len=10)
        two = plan_memory(
            src, backend=FakeGPU(10**12), dtype=torch.bfloat16, tp=2, max_len=100, prompt_len=10
        )
        assert src.bytes_read == 0  # planning reads no tensor data
    assert (one.ranks[0].weights, one.ranks[0].kv_cache) == _smol_expected((9, 3), 1536, 100, 2)
    # KV groups split 2 / 1 (query heads 6 / 3), MLP neurons 768 / 768
    assert (two.ranks[0].weights, two.ranks[0].kv_cache) == _smol_expected((6, 2), 768, 100, 2)
    assert (two.ranks[1].weights, two.ranks[1].kv_cache) == _smol_expected((3, 1), 768, 100, 2)
    assert one.ranks[0].weights == 134_515_008 * 2  # every parameter once, in bf16
    assert two.need == max(r.total for r in two.ranks) < one.need  # separate devices: largest rank
    assert one.ranks[0].load_buffer == 49152 * 576 * 4  # GGUF: the whole embedding, dequantised


def test_refusal_names_the_tp_that_fits(tmp_path):
    from modelkin.synth.tiny import make_tiny

    path = make_tiny(
        "llama",
        tmp_path / "m",
        tokenizer=False,
        overrides={"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3},
    )
    with open_checkpoint(path) as src:
        needs = {
            tp: plan_memory(
                src, backend=FakeGPU(10**12), dtype=torch.bfloat16, tp=tp, max_len=64, prompt_len=8
            ).need
            for tp in (1, 2, 3)
        }
        assert needs[1] > needs[2] > needs[3]
        budget = needs[3]
        plan = plan_memory(src, backend=FakeGPU(budget), dtype=torch.bfloat16, max_len=64, prompt_len=8)
        tp = fitting_tp(
            src,
            backend=FakeGPU(budget),
            dtype=torch.bfloat16,
            ep=1,
            batch_size=1,
            max_len=64,
            prompt_len=8,
            available=budget,
        )
        assert (
            fitting_tp(
                src,
                backend=FakeGPU(10),
                dtype=torch.bfloat16,
                ep=1,
                batch_size=1,
                max_len=64,
                prompt_len=8,
                available=10,
            )
            is None
        )  # 3 KV heads: tp <= 3
    assert not plan.fits and tp == 3
    err = refuse(plan, suggestion=tp)
    assert isinstance(err, DeviceError)
    assert "per device (tp=1, ep=1, bfloat16)" in str(err) and "refusing to load" in str(err)
    assert "--tp 3 (torchrun --nproc_per_node 3 -m modelkin run … --tp 3)" in str(err)


def test_run_refuses_before_loading_and_prints_the_plan(smollm2_gguf, tmp_path, monkeypatch, capsys):
    from modelkin.runtime import api

    def no_load(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(api, "load", no_load)
    monkeypatch.setattr(api, "load_source", no_load)
    out = tmp_path / "plan.json"
    code = cli_main(
        [
            "run",
            str(smollm2_gguf),
            "--prompt",
            "hi",
            "--device",
            "cpu",
            "--memory-limit",
            "100MB",
            "--json",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "memory plan for" in err and "does NOT fit" in err and "weights" in err
    assert "needs" in err and "but 100.00 MB is available: refusing to load" in err
    plan = json.loads(out.read_text())["memory_plan"]
    assert plan["fits"] is False and plan["available"] == 100_000_000
    assert plan["available_from"] == "--memory-limit"


def test_memory_limit_from_environment(smollm2_gguf, monkeypatch, capsys):
    monkeypatch.setenv("MODELKIN_MEMORY_LIMIT", "50MB")
    code = cli_main(["run", str(smollm2_gguf), "--device", "cpu", "--dry-run"])  # no prompt needed
    assert code == 0
    assert "available 50.00 MB (MODELKIN_MEMORY_LIMIT): does NOT fit" in capsys.readouterr().out


def test_dry_run_plans_ranks_without_loading(smollm2_gguf, monkeypatch, capsys):
    from modelkin.runtime import api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("weights were loaded"))
    monkeypatch.setattr(api, "load_source", lambda *a, **k: pytest.fail("weights were loaded"))
    code = cli_main(
        [
            "run",
            str(smollm2_gguf),
            "--prompt",
            "hello",
            "--max-new-tokens",
            "20",
            "--device",
            "cpu",
            "--dry-run",
            "--tp",
            "3",
            "--json",
            "-",
        ]
    )
    captured = capsys.readouterr()
    plan = json.loads(captured.out)["memory_plan"]
    assert code == 0 and "rank" in captured.err and "tp=3 ep=1" in captured.err
    assert [r["rank"] for r in plan["ranks"]] == [0, 1, 2]
    assert plan["max_len"] == len(b"hello") + 8 + 20
    assert plan["shared_host"] is True and plan["need"] == sum(r["total"] for r in plan["ranks"])
