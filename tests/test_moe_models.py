"""MoE architectures end to end: tiny Pangu Pro MoE against a float64 reference written here from the
spec (docs/pangu-pro-moe.md), tiny Qwen2-MoE / Qwen3-MoE / Mixtral written by transformers'
save_pretrained against transformers, `modelkin run --chat --json` routing telemetry, config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelkin
from modelkin.errors import ConfigError, UnsupportedArchitectureError
from modelkin.runtime.moe import SparseMoeBlock
from modelkin.synth.tiny import make_tiny

# -- Pangu Pro MoE: an independent float64 reference, one token and one group at a time ------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / math.sqrt(float((x * x).mean()) + eps)


def _rope(v: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """Rotate-half (NeoX) rotary embedding of one head vector at one position."""
    half = v.numel() // 2
    out = v.clone()
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / v.numel())
        c, s = math.cos(angle), math.sin(angle)
        out[i] = v[i] * c - v[i + half] * s
        out[i + half] = v[i + half] * c + v[i] * s
    return out


def _swiglu_mlp(x: torch.Tensor, w: dict, p: str) -> torch.Tensor:
    g, u = w[p + "gate_proj.weight"] @ x, w[p + "up_proj.weight"] @ x
    return w[p + "down_proj.weight"] @ (g / (1 + torch.exp(-g)) * u)


def pangu_reference(path: Path, ids: list[int]) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """Logits [L, V] in float64 and, per layer and token, the chosen experts."""
    cfg = json.loads((path / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(path / "model.safetensors").items()}
    dim, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, theta = dim // heads, cfg["rms_norm_eps"], cfg["rope_theta"]
    num_experts, groups = cfg["num_experts"], cfg["num_experts_per_tok"]
    per_group = num_experts // groups
    h = [w["model.embed_tokens.weight"][t].clone() for t in ids]
    chosen_all = []
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        xs = [_rms(v, w[p + "input_layernorm.weight"], eps) for v in h]
        q, k, v = ([w[p + f"self_attn.{n}_proj.weight"] @ x + w[p + f"self_attn.{n}_proj.bias"] for x in xs]
                   for n in "qkv")
        for t in range(len(ids)):
            out = []
            for head in range(heads):
                kvh = head // (heads // kv_heads)
                qv = _rope(q[t][head * hd:(head + 1) * hd], t, theta)
                scores = [float(qv @ _rope(k[s][kvh * hd:(kvh + 1) * hd], s, theta)) / math.sqrt(hd)
                          for s in range(t + 1)]
                m = max(scores)
                e = [math.exp(x - m) for x in scores]
                out.append(sum(e[s] / sum(e) * v[s][kvh * hd:(kvh + 1) * hd] for s in range(t + 1)))
            h[t] = h[t] + w[p + "self_attn.o_proj.weight"] @ torch.cat(out) + w[p + "self_attn.o_proj.bias"]
        chosen_layer = []
        for t in range(len(ids)):
            x = _rms(h[t], w[p + "post_attention_layernorm.weight"], eps)
            logits = w[p + "mlp.gate.weight"] @ x
            ex = torch.exp(logits - logits.max())
            prob = ex / ex.sum()  # one softmax over all experts
            y = _swiglu_mlp(x, w, p + "mlp.shared_expert.")  # shared expert, ungated
            chosen = []
            for g in range(groups):
                best = max(range(g * per_group, (g + 1) * per_group), key=lambda j: float(prob[j]))
                chosen.append(best)
                scale = float(w[p + "mlp.router_scale"].reshape(-1)[best])
                y = y + float(prob[best]) * scale * _swiglu_mlp(x, w, p + f"mlp.experts.{best}.")
            chosen_layer.append(chosen)
            h[t] = h[t] + y
        chosen_all.append(chosen_layer)
    logits = torch.stack([w["lm_head.weight"] @ _rms(x, w["model.norm.weight"], eps) for x in h])
    return logits, chosen_all


@pytest.fixture(scope="module")
def pangu_dir(tmp_path_factory) -> Path:
    return make_tiny("pangu_moe", tmp_path_factory.mktemp("pangu") / "tiny", seed=3)


@pytest.fixture(scope="module")
def pangu(pangu_dir):
    return modelkin.load(pangu_dir, device="cpu", dtype="float32")


def _capture_routing(model) -> tuple[list, list]:
    captured, handles = [], []
    for block in model.module.modules():
        if isinstance(block, SparseMoeBlock):
            handles.append(block.gate.register_forward_hook(
                lambda _m, _a, out, i=block.layer_idx: captured.append((i, out[1].clone()))))
    return captured, handles


def test_pangu_checkpoint_has_the_released_layout(pangu_dir):
    names = set(load_file(pangu_dir / "model.safetensors"))
    p = "model.layers.1."
    for suffix in ("self_attn.o_proj.bias", "mlp.gate.weight", "mlp.router_scale", "mlp.experts.15.up_proj.weight",
                   "mlp.shared_expert.down_proj.weight"):
        assert p + suffix in names
    assert not any("shared_expert_gate" in n or "gate.bias" in n for n in names)
    assert load_file(pangu_dir / "model.safetensors")[p + "mlp.router_scale"].shape == (1, 16)
    assert "intermediate_size" not in json.loads((pangu_dir / "config.json").read_text())


def test_pangu_logits_match_float64_reference_and_route_one_expert_per_group(pangu_dir, pangu):
    seqs = [[1, 17, 230, 5, 99, 402, 31, 7, 260, 88, 150], [1, 45, 301, 12, 77, 9]]
    captured, handles = _capture_routing(pangu)
    try:
        ours = pangu.logits(seqs)  # a right-padded batch
    finally:
        for handle in handles:
            handle.remove()
    for b, seq in enumerate(seqs):
        ref, chosen = pangu_reference(pangu_dir, seq)
        got = ours[b, : len(seq)].double()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        for layer, ids_TK in captured:
            ids = ids_TK.view(len(seqs), -1, 4)[b, : len(seq)]
            assert ids.tolist() == chosen[layer]  # the same experts as the reference
            assert torch.equal(torch.sort(ids // 4, dim=-1).values, torch.arange(4).expand(len(seq), 4))
    assert ours.std() > 0.5


def test_pangu_generation_with_cache_matches_full_forward(pangu):
    prompt = [1, 17, 230, 5, 99, 402]
    result = pangu.generate(prompt, max_new_tokens=6)
    full = pangu.logits([prompt + result.tokens[:-1]])[0, len(prompt) - 1:]
    assert full.argmax(-1).tolist() == result.tokens
    routing = result.routing
    assert [layer["layer"] for layer in routing["layers"]] == [0, 1]
    for layer in routing["layers"]:
        assert layer["num_tokens"] == len(prompt) + len(result.tokens) - 1
        assert sum(layer["expert_counts"]) == 4 * layer["num_tokens"]


def test_pangu_batch_routing_excludes_left_padding(pangu):
    prompts = [[1, 17, 230, 5, 99, 402, 31], [1, 45, 301]]
    results = pangu.generate_batch(prompts, max_new_tokens=3)
    layer = results[0].routing["layers"][0]
    assert layer["num_tokens"] == 7 + 3 + 2 * 2  # prompts + two decode steps each, no padding
    assert pangu.routing_telemetry is not None and pangu.routing() == results[1].routing


def test_modelkin_run_chat_json_prints_routing(pangu_dir, cli, tmp_path):
    out = tmp_path / "run.json"
    proc = cli("run", pangu_dir, "--prompt", "你好", "--chat", "--max-new-tokens", "3", "--json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(pangu_dir / "tokenizer.model"))
    assert report["prompt_ids"][0] == sp.bos_id() == 1
    text = sp.decode(report["prompt_ids"][1:]).replace(" ", "")
    assert text == "[unused9]系统：[unused10][unused9]用户：你好[unused10][unused9]助手："
    layers = report["routing"]["layers"]
    assert len(layers) == 2
    tokens = len(report["prompt_ids"]) + len(report["tokens"]) - 1
    for layer in layers:
        assert layer["num_tokens"] == tokens and sum(layer["expert_counts"]) == 4 * tokens
        assert 0 < layer["token_entropy"] <= layer["max_entropy"] == pytest.approx(math.log(16))


# -- config / tensor mismatches ---------------------------------------------------------------------


def _copy_tiny(src: Path, dst: Path, *, config: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config:
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    if drop:
        tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
        save_file(tensors, dst / "model.safetensors", {"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"config": {"num_experts": 32}}, ConfigError,
         r"experts\.gate_up_proj expected shape \[32, 64, 64\] \(config\.json\), found \[16, 64, 64\]"),
        ({"config": {"num_experts": 8}}, ConfigError, r"expected shape \[8, 64, 64\].*found \[16, 64, 64\]"),
        ({"config": {"num_experts_per_tok": 3}}, ConfigError,
         "num_experts=16 is not divisible into num_experts_per_tok=3 expert groups"),
        ({"drop": ("model.layers.1.mlp.router_scale",)}, ConfigError, r"model\.layers\.1\.mlp\.router_scale is missing"),
        ({"drop": ("model.layers.0.mlp.experts.3.up_proj.weight",)}, ConfigError,
         r"expert tensors missing .*experts\.3\.up_proj"),
        ({"config": {"architectures": ["PanguProMoEV2ForCausalLM"]}}, UnsupportedArchitectureError, "V2"),
    ],
)
def test_pangu_mismatches_are_clear_errors(pangu_dir, tmp_path, change, error, message):
    bad = _copy_tiny(pangu_dir, tmp_path / "bad", **change)
    with pytest.raises(error, match=message):
        modelkin.load(bad, device="cpu")


def test_mismatch_is_one_line_on_the_cli(pangu_dir, tmp_path, cli):
    bad = _copy_tiny(pangu_dir, tmp_path / "bad", config={"num_experts_per_tok": 3})
    proc = cli("run", bad, "--prompt", "hi", "--max-new-tokens", "1")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "expert groups" in proc.stderr


# -- Qwen2-MoE, Qwen3-MoE, Mixtral: checkpoints written by transformers, logits against transformers --------

transformers = pytest.importorskip("transformers")

_COMMON = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
HF_CASES = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "intermediate_size": 96, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 80,
        "num_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": [1], "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 3,
        "head_dim": 32, "decoder_sparse_step": 2, "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2}),
}


def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Weights that make routing decisive and logits far from uniform (HF's 0.02 init is too flat)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            elif "embed" in name:
                p.copy_(0.25 * noise)
            else:
                p.copy_(noise * (2.0 if name.endswith("gate.weight") else 1.0) / math.sqrt(p.shape[-1]))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict:
    out = {}
    for i, (name, (config_cls, model_cls, extra)) in enumerate(HF_CASES.items()):
        config = getattr(transformers, config_cls)(**_COMMON, **extra)
        model = getattr(transformers, model_cls)(config)
        _reinit(model, seed=10 + i)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model.eval(), path)
    return out


@pytest.mark.parametrize("name", list(HF_CASES))
def test_logits_match_transformers_with_padding(name, hf_models):
    hf, path = hf_models[name]
    ours = modelkin.load(path, device="cpu", dtype="float32")
    assert sum(isinstance(m, SparseMoeBlock) for m in ours.module.modules()) == {"qwen2_moe": 2, "qwen3_moe": 1,
                                                                                 "mixtral": 3}[name]
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (23, 14)]
    got = ours.logits(seqs)
    ids = torch.zeros(2, 23, dtype=torch.long)
    mask = torch.zeros(2, 23, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
    with torch.inference_mode():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    for b, s in enumerate(seqs):
        assert (got[b, : len(s)] - ref[b, : len(s)]).abs().max().item() <= 1e-4
    assert ref.std() > 0.5
    result = ours.generate(seqs[1], max_new_tokens=5)
    with torch.inference_mode():
        hf_ids = hf.generate(torch.tensor([seqs[1]]), max_new_tokens=5, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[0, len(seqs[1]):].tolist()
    assert result.tokens == hf_ids[: len(result.tokens)]


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_make_tiny_writes_layouts_transformers_loads(arch, tmp_path):
    path = make_tiny(arch, tmp_path / arch, seed=1)
    ours = modelkin.load(path, device="cpu", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [ours.tokenizer.encode("Mixture-of-experts layers route each token.")]
    with torch.inference_mode():
        ref = hf(torch.tensor(ids)).logits
    assert (ours.logits(ids) - ref).abs().max().item() <= 1e-4
    assert ours.generate(ids[0], max_new_tokens=3).routing["layers"]
