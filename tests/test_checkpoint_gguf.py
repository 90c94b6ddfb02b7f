"""GGUF reader on small files written the llama.cpp way: names, Q/K un-permutation, experts, quant types."""

from __future__ import annotations

import itertools

import gguf
import numpy as np
import pytest
import torch

from modelkin.checkpoint import open_checkpoint
from modelkin.checkpoint.gguf_names import TOP_NAMES, block_names, gguf_to_hf, hf_to_gguf
from modelkin.checkpoint.gguf_reader import dequantize_blocks, permute_rows, unpermute_rows
from modelkin.errors import CheckpointError
from tests.ckpt_factory import (
    gguf_kv_from_config,
    hf_state_to_gguf,
    llamacpp_permute,
    tiny_llama_state,
    write_gguf_file,
)


def _moe_state(
    *,
    router_prefix: str,
    experts: int = 4,
    hidden: int = 32,
    ffn: int = 32,
    shared: bool,
    qk_norm: bool = False,
    bias: bool = False,
) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, vocab = 4, 2, 8, 40

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    p = "model.layers.0."
    sd = {
        "model.embed_tokens.weight": rnd(vocab, hidden),
        p + "input_layernorm.weight": rnd(hidden),
        p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
        p + "self_attn.k_proj.weight": rnd(kv_heads * head_dim, hidden),
        p + "self_attn.v_proj.weight": rnd(kv_heads * head_dim, hidden),
        p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
        p + "post_attention_layernorm.weight": rnd(hidden),
        f"{p}{router_prefix}.gate.weight": rnd(experts, hidden),
    }
    if bias:
        for proj, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            sd[f"{p}self_attn.{proj}_proj.bias"] = rnd(rows * head_dim)
    if qk_norm:
        sd[p + "self_attn.q_norm.weight"] = rnd(head_dim)
        sd[p + "self_attn.k_norm.weight"] = rnd(head_dim)
    names = (
        ("w1", "w3", "w2") if router_prefix == "block_sparse_moe" else ("gate_proj", "up_proj", "down_proj")
    )
    for e in range(experts):
        sd[f"{p}{router_prefix}.experts.{e}.{names[0]}.weight"] = rnd(ffn, hidden)
        sd[f"{p}{router_prefix}.experts.{e}.{names[1]}.weight"] = rnd(ffn, hidden)
        sd[f"{p}{router_prefix}.experts.{e}.{names[2]}.weight"] = rnd(hidden, ffn)
    if shared:
        sd[p + "mlp.shared_expert.gate_proj.weight"] = rnd(ffn, hidden)
        sd[p + "mlp.shared_expert.up_proj.weight"] = rnd(ffn, hidden)
        sd[p + "mlp.shared_expert.down_proj.weight"] = rnd(hidden, ffn)
        sd[p + "mlp.shared_expert_gate.weight"] = rnd(1, hidden)
    sd["model.norm.weight"] = rnd(hidden)
    config = {
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 64,
        "vocab_size": vocab,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": ffn,
    }
    config["num_local_experts" if router_prefix == "block_sparse_moe" else "num_experts"] = experts
    if shared:
        config["shared_expert_intermediate_size"] = ffn
    return sd, config


def _write(tmp_path, state, config, arch, qtypes=None):
    tensors = hf_state_to_gguf(state, config, arch)
    path = tmp_path / f"{arch}.gguf"
    return write_gguf_file(path, arch, tensors, gguf_kv_from_config(config, arch), qtypes)


def test_tiny_llama_round_trip_undoes_qk_permutation(tmp_path):
    state, config = tiny_llama_state(layers=2, bias=True, seed=5)
    path = _write(tmp_path, state, config, "llama")
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "gguf"
        assert sorted(ckpt.keys()) == sorted(state)
        assert ckpt.unmapped == {}
        for name, tensor in state.items():
            assert ckpt.info(name).shape == tuple(tensor.shape), name
            assert torch.equal(ckpt.get_tensor(name), tensor), name
        got = ckpt.config()
    for key in (
        "model_type",
        "architectures",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "attention_bias",
        "bos_token_id",
        "eos_token_id",
    ):
        assert got[key] == config[key], key


def test_permutation_helpers_match_llamacpp():
    w = torch.randn(4 * 8, 5)
    for heads in (1, 2, 4):
        permuted = permute_rows(w, heads)
        assert torch.equal(permuted, torch.from_numpy(llamacpp_permute(w.numpy(), heads)))
        assert torch.equal(unpermute_rows(permuted, heads), w)
    b = torch.randn(32)
    assert torch.equal(unpermute_rows(torch.from_numpy(llamacpp_permute(b.numpy(), 4)), 4), b)


def test_tied_embeddings_and_qwen2_is_not_permuted(tmp_path):
    state, config = tiny_llama_state(layers=1, bias=True, seed=6)
    del state["lm_head.weight"]
    path = _write(tmp_path, state, config, "qwen2")
    with open_checkpoint(path) as ckpt:
        assert "lm_head.weight" not in ckpt
        cfg = ckpt.config()
        assert cfg["tie_word_embeddings"] is True and cfg["model_type"] == "qwen2"
        assert cfg["architectures"] == ["Qwen2ForCausalLM"]
        q = "model.layers.0.self_attn.q_proj."
        assert torch.equal(ckpt.get_tensor(q + "weight"), state[q + "weight"])
        assert torch.equal(ckpt.get_tensor(q + "bias"), state[q + "bias"])


def test_qwen2moe_stacked_experts_become_per_expert_names(tmp_path):
    state, config = _moe_state(router_prefix="mlp", shared=True, bias=True)
    gate_exps = "blk.0.ffn_gate_exps.weight"
    path = _write(tmp_path, state, config, "qwen2moe", qtypes={gate_exps: "Q8_0"})
    stored = gguf.GGUFReader(path).tensors
    raw = next(t for t in stored if t.name == gate_exps)
    expected_gate = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type))
    with open_checkpoint(path) as ckpt:
        assert sorted(ckpt.keys()) == sorted(state)
        cfg = ckpt.config()
        assert (cfg["model_type"], cfg["num_experts"], cfg["num_experts_per_tok"]) == ("qwen2_moe", 4, 2)
        assert cfg["moe_intermediate_size"] == 32 and cfg["shared_expert_intermediate_size"] == 32
        for e in range(4):
            name = f"model.layers.0.mlp.experts.{e}.gate_proj.weight"
            info = ckpt.info(name)
            assert (info.dtype, info.shape, info.torch_dtype) == ("Q8_0", (32, 32), torch.float32)
            assert info.nbytes == raw.n_bytes // 4
            before = ckpt.bytes_read
            got = ckpt.get_tensor(name)
            assert ckpt.bytes_read - before == info.nbytes
            assert torch.equal(got, expected_gate[e])
            assert (got - state[name]).abs().max() < 0.05  # Q8_0 rounding only
        for name, tensor in state.items():
            if ".experts." in name and "gate_proj" in name:
                continue
            assert torch.equal(ckpt.get_tensor(name), tensor), name
        assert ckpt.info("model.layers.0.mlp.shared_expert_gate.weight").shape == (1, 32)


def test_mixtral_gguf_uses_mixtral_names(tmp_path):
    state, config = _moe_state(router_prefix="block_sparse_moe", shared=False, experts=3)
    path = _write(tmp_path, state, config, "llama")
    with open_checkpoint(path) as ckpt:
        assert sorted(ckpt.keys()) == sorted(state)
        cfg = ckpt.config()
        assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 3
        for name, tensor in state.items():
            assert torch.equal(ckpt.get_tensor(name), tensor), name


def test_qwen3moe_qk_norm(tmp_path):
    state, config = _moe_state(router_prefix="mlp", shared=False, qk_norm=True)
    config["head_dim"] = 8
    path = _write(tmp_path, state, config, "qwen3moe")
    with open_checkpoint(path) as ckpt:
        assert sorted(ckpt.keys()) == sorted(state)
        assert ckpt.config()["model_type"] == "qwen3_moe" and ckpt.config()["head_dim"] == 8
        for name in ("model.layers.0.self_attn.k_norm.weight", "model.layers.0.self_attn.q_proj.weight"):
            assert torch.equal(ckpt.get_tensor(name), state[name])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "BF16", "F16"])
def test_quant_types_dequantise_like_gguf(tmp_path, qtype):
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    path = write_gguf_file(
        tmp_path / "q.gguf",
        "llama",
        {"token_embd.weight": w},
        {"llama.block_count": 0},
        {"token_embd.weight": qtype},
    )
    raw = gguf.GGUFReader(path).tensors[0]
    with open_checkpoint(path) as ckpt:
        info = ckpt.info("model.embed_tokens.weight")
        assert info.dtype == qtype and info.shape == (8, 64) and info.nbytes == raw.n_bytes
        got = ckpt.get_tensor("model.embed_tokens.weight")
        assert got.dtype == info.torch_dtype
        if qtype == "BF16":
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, torch.from_numpy(w).to(torch.bfloat16))
        elif qtype == "F16":
            assert torch.equal(got, torch.from_numpy(w.astype(np.float16)))
        else:
            expected = gguf.quants.dequantize(raw.data, raw.tensor_type)
            assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(expected))


def _bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1).view(np.uint32)


def test_smollm2_blocks_dequantise_bit_for_bit_like_gguf(smollm2_gguf):
    """The reader's torch dequantisation of SmolLM2's real Q4_1 and Q8_0 tensors equals gguf.quants' numpy
    one bit for bit (a Q8_0 embedding and one Q4_1 tensor of each kind in a layer)."""
    kinds = {}
    for t in gguf.GGUFReader(smollm2_gguf).tensors:
        if t.tensor_type.name in ("Q4_1", "Q8_0") and (t.name.startswith("blk.3.") or "blk" not in t.name):
            kinds[t.name] = t
    assert {t.tensor_type.name for t in kinds.values()} == {"Q4_1", "Q8_0"} and len(kinds) >= 5
    for name, t in kinds.items():
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        got = dequantize_blocks(torch.from_numpy(np.array(t.data)), t.tensor_type.name)
        assert np.array_equal(_bits(got.numpy()), _bits(expected)), name


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_block_dequantisation_keeps_special_scales_like_gguf(qtype):
    """Scales of -0, subnormal, inf and NaN and every quant value give gguf.quants' results (NaN as NaN)."""
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(6, size), dtype=np.uint8)
    specials = np.array([-0.0, 6e-8, np.inf, -np.inf, np.nan, 1.5], dtype=np.float16)
    blocks[:, :2] = specials.view(np.uint8).reshape(6, 2)
    if qtype == "Q4_1":
        blocks[:, 2:4] = specials[::-1].copy().view(np.uint8).reshape(6, 2)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 and inf - inf, as intended
        expected = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype)).reshape(-1)
    got = dequantize_blocks(torch.from_numpy(blocks), qtype).numpy()
    assert got.shape == expected.shape
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan) and np.array_equal(_bits(got)[~nan], _bits(expected)[~nan])


def test_unknown_names_are_kept_and_reported(tmp_path):
    tensors = {
        "token_embd.weight": np.ones((4, 8), np.float32),
        "blk.0.attn_qkv.weight": np.ones((24, 8), np.float32),
        "rope_freqs.weight": np.ones(4, np.float32),
        "blk.0.ffn_odd_exps.weight": np.ones((3, 4, 8), np.float32),
    }
    path = write_gguf_file(tmp_path / "odd.gguf", "phi3", tensors, {"phi3.block_count": 1})
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == [
            "model.embed_tokens.weight",
            "model.layers.0.attn_qkv.weight",
            "rope_freqs.weight",
            "model.layers.0.ffn_odd_exps.weight",
        ]
        assert ckpt.unmapped == {
            "model.layers.0.attn_qkv.weight": "blk.0.attn_qkv.weight",
            "rope_freqs.weight": "rope_freqs.weight",
            "model.layers.0.ffn_odd_exps.weight": "blk.0.ffn_odd_exps.weight",
        }
        assert ckpt.info("model.layers.0.ffn_odd_exps.weight").shape == (3, 4, 8)
        assert ckpt.get_tensor("model.layers.0.attn_qkv.weight").shape == (24, 8)
        assert ckpt.config()["model_type"] == "phi3"


def test_info_reads_no_data(tmp_path, monkeypatch):
    state, config = tiny_llama_state(layers=1)
    path = _write(tmp_path, state, config, "llama")
    import gguf.quants

    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: pytest.fail("data read"))
    with open_checkpoint(path) as ckpt:
        assert [ckpt.info(n).numel for n in ckpt] == [state[n].numel() for n in ckpt]
        assert ckpt.bytes_read == 0


def test_metadata_has_python_values(tmp_path):
    path = write_gguf_file(
        tmp_path / "m.gguf",
        "llama",
        {"output_norm.weight": np.ones(4, np.float32)},
        {"llama.block_count": 0, "tokenizer.ggml.tokens": ["a", "b", "<s>"], "tokenizer.ggml.model": "gpt2"},
    )
    with open_checkpoint(path) as ckpt:
        meta = ckpt.metadata()
        assert meta["general.architecture"] == "llama"
        assert meta["tokenizer.ggml.tokens"] == ["a", "b", "<s>"]
        assert meta["llama.block_count"] == 0
        assert ckpt.config()["vocab_size"] == 3


@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "qwen3moe", "gemma3"])
def test_name_mapping_round_trips(arch):
    for kind, suffix in itertools.product(block_names(arch), ("weight", "bias")):
        gname = f"blk.7.{kind}.{suffix}"
        hf = gguf_to_hf(gname, arch)
        if "{expert}" in hf:
            assert hf_to_gguf(hf.format(expert=5), arch) == (gname, 5)
        else:
            assert hf_to_gguf(hf, arch) == (gname, None)
    for top in TOP_NAMES:
        assert hf_to_gguf(gguf_to_hf(f"{top}.weight", arch), arch) == (f"{top}.weight", None)
    assert (
        gguf_to_hf("blk.0.ffn_gate.3.weight", "llama")
        == "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    )
    assert gguf_to_hf("blk.0.unknown_thing.weight", arch) is None
    assert hf_to_gguf("model.layers.0.mlp.foo.weight", arch) is None


def test_gemma3_sandwich_norm_names():
    assert gguf_to_hf("blk.2.ffn_norm.weight", "gemma3") == "model.layers.2.pre_feedforward_layernorm.weight"
    assert gguf_to_hf("blk.2.post_attention_norm.weight", "gemma3") == (
        "model.layers.2.post_attention_layernorm.weight")
    assert gguf_to_hf("blk.2.post_ffw_norm.weight", "gemma3") == (
        "model.layers.2.post_feedforward_layernorm.weight")
    assert gguf_to_hf("blk.2.ffn_norm.weight", "llama") == "model.layers.2.post_attention_layernorm.weight"


def test_truncated_and_fake_gguf(tmp_path):
    state, config = tiny_llama_state(layers=1)
    path = _write(tmp_path, state, config, "llama")
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="llama.gguf is not a readable GGUF file"):
        open_checkpoint(path)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(CheckpointError, match="fake.gguf is not a readable GGUF file"):
        open_checkpoint(fake)


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_metadata_arrays_read_as_gguf_reads_them(tmp_path, endian):
    """String arrays (empty and multi-byte strings too) and number arrays, either byte order, equal gguf's own
    item-by-item walk; a string whose length runs past the end of the file is an error, not a hang."""
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian[endian])
    writer.add_array("tokenizer.ggml.tokens", ["a", "", "ünï", "<s>", "x" * 300])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0])
    writer.add_array("tokenizer.ggml.token_type", [1, 2, 3, 6])
    writer.add_array("general.tags", [])
    writer.add_string("general.name", "t")
    writer.add_tensor("token_embd.weight", np.ones((5, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    stock = {key: field.contents() for key, field in gguf.GGUFReader(str(path)).fields.items()}
    with open_checkpoint(path) as ckpt:
        meta = ckpt.metadata()
    assert meta == stock
    assert meta["tokenizer.ggml.tokens"] == ["a", "", "ünï", "<s>", "x" * 300]
    assert meta["tokenizer.ggml.scores"] == [0.5, -1.25, 3.0]

    data = bytearray(path.read_bytes())
    at = data.index(b"x" * 300) - 8  # the last token's 8-byte length
    data[at:at + 8] = (10**9).to_bytes(8, "big" if endian == "BIG" else "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="past the end of the file"):
        open_checkpoint(bad)
