"""Upcycling: the Pangu-layout MoGE builder (exact layout, partition, noise, atomicity, CLI) and the detector.

The real case: SmolLM2-135M (GGUF) upcycled with noise is called related by the fingerprints, and the
upcycle detector finds the source MLP layer of every expert.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modelkin.checkpoint import open_checkpoint
from modelkin.cli import main
from modelkin.compare import fingerprint
from modelkin.compare.fingerprints.std_curve import compute_std_curves
from modelkin.compare.fingerprints.weights import ModelWeights
from modelkin.errors import ConfigError, InputError
from modelkin.synth.upcycle import plan, upcycle
from tests.ckpt_factory import tiny_llama_state, write_safetensors_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensor ops only: avoid intra-op threads spinning against other processes on a shared box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_plan_sizes_and_errors():
    spec = plan(1536, 8, 4, 0.25)
    assert (spec.moe_intermediate_size, spec.shared_intermediate_size) == (144, 384)
    spec = plan(100, 3, 1, 0.1)
    assert (spec.moe_intermediate_size, spec.shared_intermediate_size) == (30, 10)
    with pytest.raises(InputError, match="multiple of --groups"):
        plan(64, 6, 4, 0.25)
    with pytest.raises(InputError, match="shared-fraction"):
        plan(64, 4, 2, 1.0)
    with pytest.raises(InputError, match="cannot feed"):
        plan(8, 16, 4, 0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycle_tiny")
    sd, cfg = tiny_llama_state(layers=2, hidden=16, heads=4, kv_heads=2, inter=40, vocab=32, seed=4)
    dense = write_safetensors_checkpoint(root / "dense", sd, cfg)
    out = root / "moge"
    summary = upcycle(dense, out, experts=4, groups=2, shared_fraction=0.25, seed=3)
    return {"root": root, "sd": sd, "cfg": cfg, "dense": dense, "out": out, "summary": summary,
            "moe": load_file(str(out / "model.safetensors"))}


def test_layout_is_exactly_pangu_pro_moe(tiny):
    moe, e = tiny["moe"], 4
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "mlp.gate.weight",
                     p + "mlp.router_scale"}
        expected |= {f"{p}self_attn.{r}_proj.{kind}" for r in "qkvo" for kind in ("weight", "bias")}
        expected |= {f"{p}mlp.experts.{j}.{r}_proj.weight" for j in range(e) for r in ("gate", "up", "down")}
        expected |= {f"{p}mlp.shared_expert.{r}_proj.weight" for r in ("gate", "up", "down")}
    assert set(moe) == expected
    p = "model.layers.1."
    assert moe[p + "mlp.gate.weight"].shape == (e, 16)
    assert moe[p + "mlp.router_scale"].shape == (1, e) and torch.equal(moe[p + "mlp.router_scale"], torch.ones(1, e))
    assert moe[p + "mlp.experts.3.gate_proj.weight"].shape == (7, 16)  # int(40 * 0.75) // 4
    assert moe[p + "mlp.experts.3.down_proj.weight"].shape == (16, 7)
    assert moe[p + "mlp.shared_expert.up_proj.weight"].shape == (12, 16)
    assert torch.equal(moe[p + "self_attn.o_proj.bias"], torch.zeros(16))  # zero biases added, o_proj too
    assert torch.equal(moe[p + "self_attn.k_proj.bias"], torch.zeros(8))
    for r in "qkvo":
        assert torch.equal(moe[f"{p}self_attn.{r}_proj.weight"], tiny["sd"][f"{p}self_attn.{r}_proj.weight"])
    cfg = json.loads((tiny["out"] / "config.json").read_text())
    assert cfg["architectures"] == ["PanguProMoEForCausalLM"] and cfg["model_type"] == "PanguProMoE"
    assert (cfg["num_experts"], cfg["num_experts_per_tok"]) == (4, 2)
    assert (cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]) == (7, 12)
    assert "intermediate_size" not in cfg and cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] == 2 and cfg["hidden_act"] == "silu"
    leftovers = [x.name for x in tiny["root"].iterdir() if x.name.startswith(".")]
    assert leftovers == []


def test_experts_partition_the_dense_mlp(tiny):
    moe, sd = tiny["moe"], tiny["sd"]
    record = json.loads((tiny["out"] / "modelkin_upcycle.json").read_text())
    for i in range(2):
        part = record["partition"][str(i)]
        ids = sorted([u for rows in part["experts"] for u in rows] + part["shared"])
        assert ids == list(range(40))
        p = f"model.layers.{i}."
        gate = sd[p + "mlp.gate_proj.weight"]
        for j, rows in enumerate(part["experts"]):
            assert torch.equal(moe[f"{p}mlp.experts.{j}.gate_proj.weight"], gate[rows])
            assert torch.allclose(moe[f"{p}mlp.gate.weight"][j], gate[rows].mean(0))
        # routed experts plus the shared expert, all with weight 1, compute the dense MLP exactly
        x = torch.randn(5, 16, generator=torch.Generator().manual_seed(i))

        def mlp(g, u, d, x=x):
            return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T

        dense = mlp(*(sd[f"{p}mlp.{r}_proj.weight"] for r in ("gate", "up", "down")))
        parts = [mlp(*(moe[f"{p}mlp.experts.{j}.{r}_proj.weight"] for r in ("gate", "up", "down"))) for j in range(4)]
        parts.append(mlp(*(moe[f"{p}mlp.shared_expert.{r}_proj.weight"] for r in ("gate", "up", "down"))))
        assert torch.allclose(sum(parts), dense, atol=1e-5)


def test_noise_biases_and_refusals(tiny, tmp_path):
    sd, cfg = tiny_llama_state(layers=1, hidden=32, heads=4, kv_heads=2, inter=64, vocab=48, seed=6, bias=True)
    dense = write_safetensors_checkpoint(tmp_path / "dense", sd, cfg)
    upcycle(dense, tmp_path / "noisy", experts=4, groups=4, noise=0.1, seed=1, dtype="float32")
    moe = load_file(str(tmp_path / "noisy" / "model.safetensors"))
    w = sd["model.layers.0.self_attn.q_proj.weight"]
    rel = (moe["model.layers.0.self_attn.q_proj.weight"] - w).std() / w.std()
    assert 0.08 < float(rel) < 0.12
    assert torch.equal(moe["model.layers.0.self_attn.o_proj.bias"], torch.zeros(32))  # zero stays zero
    assert not torch.equal(moe["model.layers.0.self_attn.q_proj.bias"], sd["model.layers.0.self_attn.q_proj.bias"])
    with pytest.raises(InputError, match="not empty"):
        upcycle(dense, tmp_path / "noisy", experts=4, groups=4)
    upcycle(dense, tmp_path / "noisy", experts=2, groups=1, overwrite=True)
    assert json.loads((tmp_path / "noisy" / "config.json").read_text())["num_experts"] == 2
    with pytest.raises(ConfigError, match="not a dense"):
        upcycle(tiny["out"], tmp_path / "again", experts=2, groups=1)


def test_cli_upcycle(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["upcycle", str(tiny["dense"]), str(out), "--experts", "4", "--groups", "2", "--json", "-"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["experts"] == 4 and summary["moe_intermediate_size"] == 7
    assert main(["upcycle", str(tiny["dense"]), str(tmp_path / "bad"), "--experts", "3", "--groups", "2"]) == 2
    assert "multiple of --groups" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smol_moge(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol_moge")
    upcycle(smollm2_gguf, root / "moge", experts=8, groups=4, noise=0.05, seed=7, dtype="float16")
    sd, cfg = tiny_llama_state(layers=2, hidden=576, heads=9, kv_heads=3, inter=256, vocab=64, seed=9)
    unrelated = write_safetensors_checkpoint(root / "unrelated", {k: v * 0.05 for k, v in sd.items()}, cfg)
    with open_checkpoint(smollm2_gguf) as src:
        yield {"gguf": smollm2_gguf, "src": src, "moge": root / "moge", "unrelated": unrelated}


def test_upcycled_smollm2_is_related_and_its_source_is_found(smol_moge):
    options = {"invariants": {"n_tokens": 384}, "upcycle": {"max_layers": 4}}
    report = fingerprint(smol_moge["src"], smol_moge["moge"], device="cpu", options=options)
    assert report.verdict == "related"
    for name in ("std_curve", "pcs", "invariants", "spectral", "upcycle"):
        assert report[name].p_value < 0.01, name
        assert report[name].call == ("related" if report[name].deciding else "descriptive"), name
    assert report["permtest"].call == "skipped" and "upcycle detector" in report["permtest"].skipped
    assert report["invariants"].details["token_selection"].startswith("same vocabulary")
    up = report["upcycle"].details
    assert up["source_layers"] == {m: m for m in up["source_layers"]} and len(up["source_layers"]) == 4
    for layer in up["layers"].values():
        assert set(layer["experts"]) == {*map(str, range(8)), "shared"}
        assert all(e["matched_fraction"] > 0.9 for e in layer["experts"].values())


def test_upcycle_detector_negative_control(smol_moge):
    result = fingerprint(smol_moge["moge"], smol_moge["unrelated"], methods="upcycle", device="cpu")["upcycle"]
    assert result.p_value >= 0.05 and result.call == "unrelated"
    assert result.details["mean_cosine"] < 0.1


def test_pangu_std_curve_reads_attention_tensors_only(smol_moge):
    with open_checkpoint(smol_moge["moge"]) as src:
        curves = compute_std_curves(ModelWeights(src, CPU))
        attention = sum(src.info(f"model.layers.{i}.self_attn.{r}_proj.weight").nbytes
                        for i in range(30) for r in "qkvo")
        assert src.bytes_read == attention
        assert len(curves.layers) == 30
        before = src.bytes_read
        compute_std_curves(ModelWeights(src, CPU), extra=True)
        extra = sum(src.info(n).nbytes for n in src.keys()
                    if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "input_layernorm.weight")))
        assert src.bytes_read - before == attention + extra


def test_exported_tokenizer_matches_the_gguf(smol_moge):
    from modelkin.tokenizer import load_tokenizer

    text = "Upcycling: 72B MoE from a 14B dense model? ¿Quién sabe — 42 tokens."
    ours = load_tokenizer(None, smol_moge["moge"])
    ref = load_tokenizer(smol_moge["src"], smol_moge["gguf"])
    assert ours is not None and ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))
