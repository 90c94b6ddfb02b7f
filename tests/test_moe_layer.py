"""The MoE layer (runtime/moe/) against an independent float64 per-token reference, per router policy;
dispatch paths against each other; routing telemetry; config errors."""

from __future__ import annotations

import math

import pytest
import torch

from modelkin.errors import ConfigError
from modelkin.runtime.layers import MLP
from modelkin.runtime.moe import (
    ExpertsImpl,
    Router,
    RouterPolicy,
    SparseMoeBlock,
    StackedExperts,
    experts_gather,
    experts_sorted,
)
from modelkin.runtime.moe.cpu import PackedExperts, balance, experts_threaded
from modelkin.runtime.moe.telemetry import RoutingTelemetry
from modelkin.runtime.moe.weights import stack_experts, unstack_experts

D, F_, F_SHARED = 48, 24, 40


# -- independent reference: plain Python over tokens, float64, written from the routing spec -----------


def _silu(v: torch.Tensor) -> torch.Tensor:
    return v / (1.0 + torch.exp(-v))


def _expert(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return down @ (_silu(gate @ x) * (up @ x))


def _choose(case: dict, logits: torch.Tensor) -> list[tuple[int, float]]:
    """(expert, weight) pairs for one token."""
    num_experts, k = logits.numel(), case["top_k"]
    m = max(float(v) for v in logits)
    ex = [math.exp(float(v) - m) for v in logits]
    p = [v / sum(ex) for v in ex]
    if case["policy"] == "moge":
        per = num_experts // case["groups"]
        chosen = []
        for g in range(case["groups"]):
            best = g * per
            for e in range(g * per, (g + 1) * per):  # argmax inside the group
                if p[e] > p[best]:
                    best = e
            chosen.append(best)
        return [(e, p[e] * float(case["scale"][e])) for e in chosen]
    chosen = sorted(range(num_experts), key=lambda e: -p[e])[:k]
    w = [p[e] for e in chosen]
    if case["renorm"]:
        w = [v / sum(w) for v in w]
    return list(zip(chosen, w))


def reference_moe(case: dict, state: dict[str, torch.Tensor], x_TD: torch.Tensor) -> torch.Tensor:
    st = {k: v.double() for k, v in state.items()}
    out = torch.zeros(x_TD.shape, dtype=torch.float64)
    for t in range(x_TD.shape[0]):
        x = x_TD[t].double()
        for e, w in _choose(case, st["gate.weight"] @ x):
            p = f"experts.{e}."
            out[t] += w * _expert(
                x, st[p + "gate_proj.weight"], st[p + "up_proj.weight"], st[p + "down_proj.weight"]
            )
        if case["shared"]:
            sh = _expert(
                x,
                st["shared_expert.gate_proj.weight"],
                st["shared_expert.up_proj.weight"],
                st["shared_expert.down_proj.weight"],
            )
            if case["shared_gate"]:
                sh = sh / (1.0 + math.exp(-float(st["shared_expert_gate.weight"][0] @ x)))
            out[t] += sh
    return out


# -- building blocks from HF-named per-expert tensors ------------------------------------------------------


CASES = {
    "softmax_renorm": {
        "policy": "softmax_topk",
        "experts": 16,
        "top_k": 4,
        "renorm": True,
        "shared": False,
        "shared_gate": False,
    },
    "softmax_plain_gated_shared": {
        "policy": "softmax_topk",
        "experts": 12,
        "top_k": 3,
        "renorm": False,
        "shared": True,
        "shared_gate": True,
    },
    "moge": {"policy": "moge", "experts": 16, "top_k": 4, "groups": 4, "shared": True, "shared_gate": False},
}


def hf_state(case: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    num_experts = case["experts"]

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale / math.sqrt(shape[-1])

    state = {"gate.weight": rnd(num_experts, D, scale=3.0)}
    for e in range(num_experts):
        state[f"experts.{e}.gate_proj.weight"] = rnd(F_, D)
        state[f"experts.{e}.up_proj.weight"] = rnd(F_, D)
        state[f"experts.{e}.down_proj.weight"] = rnd(D, F_)
    if case["shared"]:
        state["shared_expert.gate_proj.weight"] = rnd(F_SHARED, D)
        state["shared_expert.up_proj.weight"] = rnd(F_SHARED, D)
        state["shared_expert.down_proj.weight"] = rnd(D, F_SHARED)
    if case["shared_gate"]:
        state["shared_expert_gate.weight"] = rnd(1, D)
    if case["policy"] == "moge":
        state["router_scale"] = torch.rand(num_experts, generator=g) + 0.5
    return state


def build_block(
    case: dict, state: dict[str, torch.Tensor], impl: ExpertsImpl = ExpertsImpl.AUTO
) -> SparseMoeBlock:
    with torch.device("meta"):
        block = SparseMoeBlock(
            gate=Router(
                D,
                case["experts"],
                policy=RouterPolicy(case["policy"]),
                top_k=case["top_k"],
                num_groups=case.get("groups", 1),
                norm_topk_prob=case.get("renorm", False),
            ),
            experts=StackedExperts(case["experts"], D, F_, impl=impl),
            shared_expert=MLP(D, F_SHARED) if case["shared"] else None,
            shared_expert_gate=case["shared_gate"],
            router_scale=case["policy"] == "moge",
            layer_idx=3,
        )
    remapped = stack_experts(dict(state), "experts", case["experts"])
    block.load_state_dict(remapped, strict=True, assign=True)
    return block.eval()


def _ref_case(case: dict, state: dict[str, torch.Tensor]) -> dict:
    return dict(case, scale=state.get("router_scale"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_matches_float64_reference(name: str) -> None:
    case = CASES[name]
    state = hf_state(case)
    block = build_block(case, state)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = block(x)
    want = reference_moe(_ref_case(case, state), state, x.view(-1, D)).view(2, 9, D)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_moge_routes_exactly_one_expert_per_group_without_renormalisation() -> None:
    case = CASES["moge"]
    state = hf_state(case)
    block = build_block(case, state)
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        weights_TK, ids_TK, scores_TE = block.gate(x, block.router_scale)
    per = case["experts"] // case["groups"]
    assert torch.equal(torch.sort(ids_TK // per, dim=-1).values, torch.arange(case["groups"]).expand(300, -1))
    # weight = p[e] × router_scale[e], exactly, and not renormalised
    torch.testing.assert_close(weights_TK, scores_TE.gather(1, ids_TK) * state["router_scale"][ids_TK])
    assert (weights_TK.sum(-1) - 1).abs().max() > 1e-3


def test_moge_selects_on_probability_before_scaling() -> None:
    router = Router(4, 4, policy=RouterPolicy.MOGE, top_k=2, num_groups=2)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x = torch.tensor([[2.0, 1.0, 0.0, 3.0]])
    scale = torch.tensor([1.0, 100.0, 1.0, 1.0])  # would flip group 0 if applied before selection
    weights, ids, scores = router(x, scale)
    assert ids.tolist() == [[0, 3]]
    torch.testing.assert_close(weights, scores[:, [0, 3]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_dispatch_paths_agree(dtype: torch.dtype, num_tokens: int) -> None:
    g = torch.Generator().manual_seed(num_tokens)
    num_experts, k = 32, 4
    gate_up = (torch.randn(num_experts, 2 * F_, D, generator=g) / D**0.5).to(dtype)
    down = (torch.randn(num_experts, D, F_, generator=g) / F_**0.5).to(dtype)
    x = torch.randn(num_tokens, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(num_tokens)])
    ids[:, 0] = 5  # one popular expert, several unused ones
    w = torch.rand(num_tokens, k, generator=g)
    packed = PackedExperts(gate_up, down)
    with torch.no_grad():
        loop = experts_sorted(x, w, ids, gate_up, down)
        grouped = experts_sorted(x, w, ids, gate_up, down, runner=ExpertsImpl.GROUPED_MM)
        threads = experts_sorted(x, w, ids, gate_up, down, runner=ExpertsImpl.THREADS)
        threads_packed = experts_sorted(x, w, ids, gate_up, down, runner=ExpertsImpl.THREADS, packed=packed)
        loop_packed = experts_sorted(x, w, ids, gate_up, down, packed=packed)
        gather = experts_gather(x, w, ids, gate_up, down)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(grouped, loop, **tol)
    torch.testing.assert_close(gather, loop, **tol)
    torch.testing.assert_close(threads, loop, **tol)  # same GEMMs on other threads (BLAS may split K)
    torch.testing.assert_close(threads_packed, loop, **tol)
    torch.testing.assert_close(loop_packed, loop, **tol)
    assert loop.dtype == dtype and loop.shape == (num_tokens, D)
    # per-pair reference from the unstacked expert tensors
    ref = torch.zeros(num_tokens, D, dtype=torch.float64)
    experts = unstack_experts(gate_up.double(), down.double())
    for t in range(num_tokens):
        for j in range(k):
            ref[t] += w[t, j].item() * _expert(x[t].double(), *experts[ids[t, j]])
    torch.testing.assert_close(loop.double(), ref, **tol)


def test_one_row_experts_split_across_intra_op_threads(monkeypatch) -> None:
    """Decoding (one row per hit expert) on plain weights runs each GEMV as cpu_kernels.split_gemv over
    the intra-op threads, with the same numbers as the per-pair float64 reference."""
    from modelkin.runtime.moe import cpu as moe_cpu

    parts_seen = []
    real = moe_cpu.split_gemv
    monkeypatch.setattr(moe_cpu, "split_gemv", lambda *a: parts_seen.append(a[3]) or real(*a))
    g = torch.Generator().manual_seed(3)
    dim = hidden = 512  # both weights at least Linear.SPLIT_MIN_NUMEL, as in real models
    gate_up = torch.randn(8, 2 * hidden, dim, generator=g) / dim**0.5
    down = torch.randn(8, dim, hidden, generator=g) / hidden**0.5
    x, w = torch.randn(1, dim, generator=g), torch.rand(1, 3, generator=g)
    ids = torch.tensor([[6, 1, 4]])
    experts = unstack_experts(gate_up.double(), down.double())
    ref = sum(w[0, j].item() * _expert(x[0].double(), *experts[ids[0, j]]) for j in range(3))
    before = torch.get_num_threads()
    try:
        for threads, calls in ((2, [2] * 6), (1, [])):
            torch.set_num_threads(threads)
            parts_seen.clear()
            with torch.no_grad():
                out = experts_sorted(x, w, ids, gate_up, down, runner=ExpertsImpl.LOOP)
            assert parts_seen == calls
            torch.testing.assert_close(out[0].double(), ref, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(before)


def test_block_impls_and_grad_mode_give_identical_outputs() -> None:
    case = CASES["softmax_renorm"]
    state = hf_state(case)
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(3))
    outs = []
    for impl in (ExpertsImpl.LOOP, ExpertsImpl.GROUPED_MM, ExpertsImpl.GATHER, ExpertsImpl.THREADS):
        block = build_block(case, state, impl)
        with torch.no_grad():
            outs.append(block(x))
    block = build_block(case, {k: v.clone().requires_grad_() for k, v in state.items()}, ExpertsImpl.LOOP)
    with_grad = block(x)
    with_grad.sum().backward()  # the loop path stays differentiable
    assert block.experts.gate_up_proj.grad is not None
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[3], outs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(with_grad.detach(), outs[0], rtol=1e-6, atol=1e-6)  # outs: prepacked
    with torch.no_grad():
        assert torch.equal(build_block(case, state, ExpertsImpl.LOOP)(x), outs[0])  # deterministic


def test_autopack_builds_drops_stale_copies_and_can_be_disabled(monkeypatch) -> None:
    case = CASES["softmax_renorm"]
    state = hf_state(case)
    block = build_block(case, state, ExpertsImpl.LOOP)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(8))  # ≥ 4 rows per expert: fp32 packs
    monkeypatch.setattr("modelkin.runtime.moe.cpu._meminfo", lambda: (100 << 30, 90 << 30))
    with torch.no_grad():
        first = block(x)
        packed = block.experts.packed
        assert packed is not None and packed.matches(block.experts.gate_up_proj, block.experts.down_proj)
        block.experts.down_proj.mul_(2.0)  # an in-place edit makes the packed copy stale
        second = block(x)
        assert block.experts.packed is not packed
        plain = experts_sorted(x, *block.gate(x)[:2], block.experts.gate_up_proj, block.experts.down_proj)
    torch.testing.assert_close(second, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)
    monkeypatch.setattr("modelkin.runtime.moe.cpu._meminfo", lambda: (100 << 30, 40 << 30))  # < half free
    fresh = build_block(case, state, ExpertsImpl.LOOP)
    with torch.no_grad():
        fresh(x)
    assert fresh.experts.packed is None
    monkeypatch.setattr("modelkin.runtime.moe.cpu._meminfo", lambda: (100 << 30, 90 << 30))
    monkeypatch.setenv("MODELKIN_MOE_PREPACK", "0")
    with torch.no_grad():
        fresh(x)
    assert fresh.experts.packed is None


def test_telemetry_counts_entropy_and_padding_mask() -> None:
    case = CASES["moge"]
    state = hf_state(case)
    block = build_block(case, state)
    model = torch.nn.Sequential(block)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))
    tele = RoutingTelemetry()
    with torch.no_grad(), tele.recording(model):
        model(x)
        tele.token_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
        model(x)
    with torch.no_grad():
        model(x)  # hooks are gone: not recorded
        _, ids, scores = block.gate(x.view(-1, D), block.router_scale)
    (layer,) = tele.layers()
    k = case["top_k"]
    assert layer.layer == 3 and layer.top_k == k and layer.num_tokens == 10 + 7
    assert sum(layer.expert_counts) == (10 + 7) * k
    keep = torch.tensor([1] * 10 + [1] * 5 + [1, 1, 0, 0, 0], dtype=torch.bool)
    ids_all = torch.cat([ids, ids])
    want_counts = torch.bincount(ids_all[keep].reshape(-1), minlength=case["experts"])
    assert layer.expert_counts == want_counts.tolist()
    p = torch.cat([scores, scores])[keep].double()
    # the router's float32 softmax sums to 1 only to ~1e-7: the telemetry renormalises, and so does this
    p = p / p.sum(-1, keepdim=True)
    want_token_entropy = float((-(p * p.log()).sum(-1)).mean())
    assert layer.token_entropy == pytest.approx(want_token_entropy, rel=1e-9)
    load = want_counts.double() / want_counts.sum()
    load = load[load > 0]
    assert layer.load_entropy == pytest.approx(float(-(load * load.log()).sum()), rel=1e-9)
    assert layer.max_entropy == pytest.approx(math.log(case["experts"]))
    assert 0 < layer.token_entropy < layer.max_entropy and 0 < layer.load_entropy <= layer.max_entropy
    js = tele.to_json()
    assert js["layers"][0]["expert_counts"] == layer.expert_counts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 12, "top_k": 5, "num_groups": 5}, "split evenly into 5 groups"),
        ({"num_experts": 16, "top_k": 8, "num_groups": 4}, "must equal the groups"),
        ({"num_experts": 4, "top_k": 6, "num_groups": 1}, "between 1 and num_experts=4"),
    ],
)
def test_router_config_errors(kwargs: dict, message: str) -> None:
    policy = RouterPolicy.MOGE if kwargs["num_groups"] > 1 else RouterPolicy.SOFTMAX_TOPK
    with pytest.raises(ConfigError, match=message):
        Router(
            D, kwargs["num_experts"], policy=policy, top_k=kwargs["top_k"], num_groups=kwargs["num_groups"]
        )


def test_stack_experts_round_trip_and_missing_expert() -> None:
    state = hf_state(CASES["softmax_renorm"])
    stacked = stack_experts(dict(state), "experts", 16)
    assert stacked["experts.gate_up_proj"].shape == (16, 2 * F_, D)
    assert stacked["experts.down_proj"].shape == (16, D, F_)
    assert not any(k.startswith("experts.3.") for k in stacked)
    for e, (gate, up, down) in enumerate(
        unstack_experts(stacked["experts.gate_up_proj"], stacked["experts.down_proj"])
    ):
        assert torch.equal(gate, state[f"experts.{e}.gate_proj.weight"])
        assert torch.equal(up, state[f"experts.{e}.up_proj.weight"])
        assert torch.equal(down, state[f"experts.{e}.down_proj.weight"])
    with pytest.raises(ConfigError, match="num_experts=20"):
        stack_experts(dict(state), "experts", 20)


def test_lazy_stacking_matches_eager_and_rejects_extra_experts() -> None:
    from modelkin.checkpoint.lazy import LazyTensor
    from modelkin.runtime.moe.weights import stack_layer_experts, unstack_layer_experts

    state = {f"model.layers.1.mlp.{k}": v for k, v in hf_state(CASES["softmax_renorm"]).items()}
    lazy = {k: LazyTensor(tuple(v.shape), (lambda v=v: v), (k,), v.numel() * 4) for k, v in state.items()}
    stacked = stack_layer_experts(dict(lazy))
    gate_up = stacked["model.layers.1.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (16, 2 * F_, D) and len(gate_up.sources) == 32
    eager = stack_experts(dict(state), "model.layers.1.mlp.experts")
    assert torch.equal(gate_up.load(), eager["model.layers.1.mlp.experts.gate_up_proj"])
    assert torch.equal(
        stacked["model.layers.1.mlp.experts.down_proj"].load(), eager["model.layers.1.mlp.experts.down_proj"]
    )
    back = unstack_layer_experts(
        {k: (v.load() if isinstance(v, LazyTensor) else v) for k, v in stacked.items()}
    )
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ConfigError, match="expert 15 .* but num_experts=8"):
        stack_experts(dict(state), "model.layers.1.mlp.experts", 8)


def test_cpu_workers_run_single_threaded_and_leave_the_caller_alone() -> None:
    spans = [(e, 4 * e, 4 * e + 4) for e in range(6)]
    groups = balance(spans, 2)
    assert [s for g in groups for s in g] == spans and len(groups) == 2
    before = torch.get_num_threads()
    seen = []
    gate_up, down = torch.randn(6, 8, 16), torch.randn(6, 16, 4)

    def spy(x, w):
        seen.append(torch.get_num_threads())
        return x @ w.t()

    class Spy(PackedExperts):
        def __init__(self):
            self.gate_up, self.down = list(gate_up), list(down)

        linear = staticmethod(spy)

    torch.set_num_threads(2)
    try:
        ys = experts_threaded(torch.randn(24, 16), spans, gate_up, down, Spy())
        assert ys.shape == (24, 16) and seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("busy", [False, True])
def test_auto_runs_prepacked_experts_in_the_loop_unless_the_cpu_is_oversubscribed(monkeypatch, busy) -> None:
    from modelkin.runtime.moe import cpu as moe_cpu
    from modelkin.runtime.moe import dispatch

    case = CASES["softmax_renorm"]
    block = build_block(case, hf_state(case)).to(torch.bfloat16)
    block.experts.prepack_cpu()
    calls = []
    real = moe_cpu.experts_threaded
    monkeypatch.setattr(dispatch, "oversubscribed", lambda: busy)
    monkeypatch.setattr(moe_cpu, "experts_threaded", lambda *a: calls.append(1) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            block(torch.randn(8, D).to(torch.bfloat16))
    finally:
        torch.set_num_threads(before)
    assert bool(calls) == busy


def test_plan_follows_its_rule_table(monkeypatch) -> None:
    """dispatch.plan row by row on CPU: grad, one thread, oversubscribed, packed, few vs many hit experts."""
    from modelkin.runtime.moe import dispatch

    Impl = dispatch.ExpertsImpl

    gate_up = torch.randn(32, 2 * F_, D, dtype=torch.bfloat16)
    packed = PackedExperts(gate_up, torch.randn(32, D, F_, dtype=torch.bfloat16))
    x = torch.randn(8, D, dtype=torch.bfloat16)
    few = torch.arange(16).view(8, 2)  # 16 hit experts
    many = torch.arange(32).view(8, 4)  # 32 hit experts

    def runner(ids, *, busy=False, threads=2, use_packed=False, impl=Impl.AUTO, x=x):
        monkeypatch.setattr(dispatch, "oversubscribed", lambda: busy)
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        how = dispatch.plan(impl, x, ids, gate_up, packed_weights=lambda: packed if use_packed else None)
        return how.runner, how.packed is not None, len(how.spans or [])

    assert runner(many, threads=1) == (Impl.LOOP, False, 32)
    assert runner(many, busy=True, use_packed=True) == (Impl.THREADS, True, 32)
    assert runner(few, use_packed=True) == (Impl.LOOP, True, 16)
    assert runner(few) == (Impl.LOOP, False, 16)
    assert runner(many) == (Impl.THREADS, False, 32)
    with torch.enable_grad():
        assert runner(many, use_packed=True, x=x.clone().requires_grad_()) == (Impl.LOOP, False, 32)
    assert runner(many, impl=Impl.LOOP, busy=True) == (Impl.LOOP, False, 32)  # explicit runners run as asked
    assert runner(many, impl=Impl.GROUPED_MM) == (Impl.GROUPED_MM, False, 0)  # no host sync: no spans
