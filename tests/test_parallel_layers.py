"""Tensor and expert parallelism in one process: each rank's shard is loaded as under torchrun and
the ranks run in threads whose all-reduce is a barrier + sum, so every tiny architecture and
tp × ep grid is checked against the single-process model in float64 (exact up to rounding).
The real gloo launches are in test_parallel_torchrun.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import modelkin
from modelkin.backends import get_backend
from modelkin.checkpoint import open_checkpoint
from modelkin.errors import ConfigError, InputError
from modelkin.runtime.api import Model, load_source
from modelkin.runtime.parallel import Layout, expert_range, head_ranges, resolve_degrees, split_range
from modelkin.runtime.parallel.shard import build
from modelkin.synth.tiny import make_tiny

IDS = [[1, 50, 34, 28, 46, 31, 25, 13, 30, 37], [1, 2, 3, 4, 9]]


class ThreadGroup:
    """all_reduce among threads: every member deposits its tensor; all get the rank-ordered sum."""

    def __init__(self, members: list[int]):
        self.members = members
        self.barrier = threading.Barrier(len(members), timeout=60)
        self.slots: dict[int, torch.Tensor] = {}

    def reduce_for(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[m] for m in self.members)
            self.barrier.wait()
            t.copy_(total)
            return t

        return reduce


class ThreadCtx:
    """What loading a shard needs of a DistContext, with thread collectives."""

    def __init__(self, layout: Layout, tp_group: ThreadGroup, world: ThreadGroup):
        self.layout, self.backend = layout, get_backend("cpu")
        self._tp, self._world = tp_group, world
        self.is_main = layout.rank == 0

    def reduce_tp(self):
        return None if self.layout.tp == 1 else self._tp.reduce_for(self.layout.rank)

    def reduce_world(self):
        return None if self.layout.world_size == 1 else self._world.reduce_for(self.layout.rank)


def run_parallel(path: Path, tp: int, ep: int, fn) -> list:
    """Load every rank's shard (float64), then run ``fn(model)`` on all ranks at once."""
    world = ThreadGroup(list(range(tp * ep)))
    tp_groups = [ThreadGroup(list(range(e * tp, (e + 1) * tp))) for e in range(ep)]
    models = []
    for layout in Layout(tp, ep).ranks():
        ctx = ThreadCtx(layout, tp_groups[layout.ep_rank], world)
        with open_checkpoint(path) as src:
            models.append(load_source(src, path, backend=ctx.backend, dtype=torch.float64, parallel=ctx))
    results: list = [None] * len(models)
    errors: list = []

    def work(i: int) -> None:
        try:
            results[i] = fn(models[i])
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            world.barrier.abort()
            for g in tp_groups:
                g.barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def outputs(model: Model) -> dict:
    result = model.generate(IDS[0], max_new_tokens=6)
    return {"logits": model.logits(IDS), "tokens": result.tokens, "routing": result.routing}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str, **overrides) -> Path:
        key = arch + repr(sorted(overrides.items()))
        if key not in made:
            made[key] = make_tiny(
                arch, tmp_path_factory.mktemp(arch) / "m", overrides=overrides, tokenizer=False
            )
        return made[key]

    return get


def check(path: Path, tp: int, ep: int) -> list[dict]:
    ref = outputs(modelkin.load(path, device="cpu", dtype=torch.float64))
    got = run_parallel(path, tp, ep, outputs)
    for r in got:
        assert (r["logits"] - ref["logits"]).abs().max().item() < 1e-10
        assert r["tokens"] == ref["tokens"]
        if ref["routing"] is not None:
            assert [la["expert_counts"] for la in r["routing"]["layers"]] == [
                la["expert_counts"] for la in ref["routing"]["layers"]
            ]
    return got


# SmolLM2's shape: 9 query heads on 3 KV heads, so tp=2 splits the KV groups 2 / 1
SMOL_LIKE = {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3}


@pytest.mark.parametrize(
    ("arch", "overrides", "tp", "ep"),
    [
        ("llama", SMOL_LIKE, 2, 1),
        ("llama", SMOL_LIKE, 3, 1),
        ("qwen2", {}, 2, 1),  # q/k/v biases, tied embeddings
        ("pangu_embedded", {}, 2, 1),  # o_proj bias: added once, after the all-reduce
        ("pangu_moe", {}, 1, 2),  # MoGE: 2 whole groups per rank
        ("pangu_moe", {}, 2, 1),  # every expert on both ranks, neurons split
        ("pangu_moe", {}, 2, 2),  # 4 ranks: attention tp 2, experts over ep × tp
        ("qwen2_moe", {}, 2, 2),  # shared expert behind a sigmoid gate, one dense layer
        ("qwen3_moe", {}, 1, 2),  # softmax top-k: a token's experts may sit on either rank
        ("mixtral", {}, 2, 1),
    ],
)
def test_parallel_matches_single_process(tiny_dir, arch, overrides, tp, ep):
    check(tiny_dir(arch, **overrides), tp, ep)


def test_shards_have_the_documented_shapes(tiny_dir):
    with open_checkpoint(tiny_dir("llama", **SMOL_LIKE)) as src:
        shapes = [
            {n: tuple(p.shape) for n, p in build(src, lay).module.named_parameters()}
            for lay in Layout(2, 1).ranks()
        ]
    dh = 8
    for rank, (q_heads, kv_heads) in enumerate([(6, 2), (3, 1)]):
        s = shapes[rank]
        assert s["model.layers.0.self_attn.q_proj.weight"] == (q_heads * dh, 72)
        assert s["model.layers.0.self_attn.k_proj.weight"] == (kv_heads * dh, 72)
        assert s["model.layers.0.self_attn.o_proj.weight"] == (72, q_heads * dh)
        assert s["model.layers.0.mlp.gate_proj.weight"] == (80, 72)
        assert s["model.layers.0.mlp.down_proj.weight"] == (72, 80)
        assert s["lm_head.weight"] == (512, 72)  # replicated


def test_expert_parallel_reads_only_local_experts(tiny_dir):
    path = tiny_dir("pangu_moe")
    with open_checkpoint(path) as src:
        total = sum(src.info(n).nbytes for n in src)
        split_bytes = sum(src.info(n).nbytes for n in src if ".experts." in n or ".shared_expert." in n)
    reads = []
    for layout in Layout(1, 2).ranks():
        with open_checkpoint(path) as src:
            ctx = ThreadCtx(layout, ThreadGroup([0]), ThreadGroup([0, 1]))
            load_source(src, path, backend=ctx.backend, dtype=torch.float32, parallel=ctx)
            reads.append(src.bytes_read)
    # routed experts (2 of 4 groups) and shared-expert neurons split in half; the rest on both ranks
    assert reads == [total - split_bytes // 2] * 2


def test_split_helpers():
    assert [split_range(9, 2, i) for i in range(2)] == [(0, 5), (5, 9)]
    assert head_ranges(9, 3, 2, 0) == (range(6), range(2))
    assert head_ranges(9, 3, 2, 1) == (range(6, 9), range(2, 3))
    assert expert_range(64, 8, 4, 3) == (48, 64)  # Pangu Pro MoE, ep=4: groups 6 and 7
    assert expert_range(8, None, 3, 2) == (6, 8)
    assert resolve_degrees(None, None, 4) == (4, 1)
    assert resolve_degrees(None, 2, 4) == (2, 2)
    assert Layout(2, 2, 3).tp_rank == 1 and Layout(2, 2, 3).ep_rank == 1


def test_split_errors():
    with pytest.raises(ConfigError, match="--tp 4 exceeds the model's 3 key/value heads"):
        head_ranges(9, 3, 4, 0)
    with pytest.raises(ConfigError, match="--ep 3 does not divide the 4 MoGE expert groups"):
        expert_range(16, 4, 3, 0)
    with pytest.raises(InputError, match="needs 4 processes, but 2 were launched"):
        resolve_degrees(2, 2, 2)
    with pytest.raises(InputError, match="torchrun --nproc_per_node 2"):
        resolve_degrees(2, None, 1)


def test_lazy_narrow_reads_only_slices(tmp_path):
    from safetensors.torch import save_file

    from modelkin.checkpoint.lazy import cat
    from modelkin.runtime.loader import lazy_state
    from modelkin.runtime.moe.weights import stack_experts

    names = ("gate_proj", "up_proj", "down_proj")
    tensors = {f"e.{j}.{n}.weight": torch.randn(6, 4) for j in range(4) for n in names}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with open_checkpoint(tmp_path) as src:
        state = lazy_state(src)
        gate_up = cat([state["e.1.gate_proj.weight"], state["e.1.up_proj.weight"]])
        assert torch.equal(gate_up.narrow(0, 7, 9).load(), tensors["e.1.up_proj.weight"][1:3])
        assert src.bytes_read == 2 * 4 * 4
        gu = stack_experts(state, "e")["e.gate_up_proj"]  # how MoE checkpoints are read
        part = gu.narrow(0, 2, 4).narrow(1, 7, 9)  # experts 2-3, up rows 1-2
        want = torch.stack([tensors[f"e.{j}.up_proj.weight"][1:3] for j in (2, 3)])
        assert torch.equal(part.load(), want)
        assert src.bytes_read == 2 * 4 * 4 + 2 * 2 * 4 * 4
        gate0 = tensors["e.0.gate_proj.weight"]
        assert torch.equal(src.get_slice("e.0.gate_proj.weight", 1, 1, 3), gate0[:, 1:3])
