"""Tiny random Gemma-3 and Qwen3 checkpoints written by transformers' save_pretrained, against
transformers: logits, prefill + decode, ragged batches, a multimodal wrapper, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import modelkin
from modelkin.errors import ConfigError
from modelkin.runtime.generate import decode_step, prefill
from modelkin.runtime.kv_cache import make_kv_cache

transformers = pytest.importorskip("transformers")

V = 300
_GEMMA = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
          "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2,
          "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
_QWEN3 = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "max_position_embeddings": 512}
VARIANTS = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_GEMMA, "query_pre_attn_scalar": 16}),
    # q scale differs from head_dim^-0.5, global rope scaled, final logits soft-capped, untied
    "gemma3_scaled": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        **_GEMMA, "query_pre_attn_scalar": 24, "final_logit_softcapping": 3.0, "tie_word_embeddings": False,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_QWEN3, "tie_word_embeddings": True}),
    "qwen3_untied": ("Qwen3Config", "Qwen3ForCausalLM", {**_QWEN3, "tie_word_embeddings": False}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write(name: str, path: Path, seed: int) -> Path:
    config_cls, model_cls, fields = VARIANTS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**fields)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # HF initialises norms to identity: give every norm weight its own values
        for key, param in model.named_parameters():
            if "norm" in key:
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if "gemma" in name else 1.0))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: _write(name, root / name, i) for i, name in enumerate(VARIANTS)}


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {name: modelkin.load(path, device="cpu", dtype="float32") for name, path in tiny_dirs.items()}


def _reference(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name, tiny_dirs, models):
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(7))  # 40 > window 8
    ours = models[name].logits(ids)
    with torch.inference_mode():
        ref = _reference(tiny_dirs[name])(ids).logits
    assert ours.shape == ref.shape == (2, 40, V)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.std() > 0.1


def test_variants_exercise_what_they_claim(models):
    gemma = models["gemma3"].module
    assert gemma.lm_head.weight is gemma.model.embed_tokens.weight
    ids = [list(range(3, 40))]
    windowed = models["gemma3"].logits(ids)
    gemma.model.window = 10_000
    try:
        assert not torch.allclose(models["gemma3"].logits(ids)[0, 10:], windowed[0, 10:])
    finally:
        gemma.model.window = 8
    scaled = models["gemma3_scaled"].module
    assert scaled.lm_head.weight is not scaled.model.embed_tokens.weight
    assert models["gemma3_scaled"].logits(ids).abs().max() <= 3.0  # soft-capped
    assert models["qwen3"].module.model.layers[0].self_attn.q_norm is not None


@pytest.mark.parametrize("name", ["gemma3", "gemma3_scaled", "qwen3"])
def test_prefill_then_decode_equals_full_forward(name, models):
    model = models[name]
    ids = torch.randint(3, V, (1, 30), generator=torch.Generator().manual_seed(3))
    full = model.logits(ids)[0]
    cache = make_kv_cache(model.module, batch_size=1, max_len=31)
    with torch.inference_mode():
        steps = [prefill(model.module, ids[:, :6], None, cache)]
        steps += [decode_step(model.module, ids[:, t], cache) for t in range(6, 30)]
    stepped = torch.stack([s[0] for s in steps]).float()
    assert (stepped - full[5:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["gemma3", "qwen3"])
def test_batch_of_ragged_prompts_equals_each_alone(name, models):
    model = models[name]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, V, (n,), generator=gen).tolist() for n in (5, 17, 11)]
    batch = model.generate_batch(prompts, max_new_tokens=12)
    alone = [model.generate(p, max_new_tokens=12) for p in prompts]
    for b, a in zip(batch, alone):
        assert b.tokens == a.tokens
        assert max(abs(x - y) for x, y in zip(b.logprobs, a.logprobs)) <= 1e-4
    ragged = model.logits(prompts)
    for i, p in enumerate(prompts):
        assert (ragged[i, : len(p)] - model.logits([p])[0]).abs().max().item() <= 1e-4


def _copy(src: Path, dst: Path, config: dict | None = None, drop: str | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if drop is None or drop not in k}, dst / "model.safetensors")
    base = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(base) if callable(config) else base))
    return dst


def test_multimodal_checkpoint_runs_its_language_model(tiny_dirs, models, tmp_path):
    from safetensors.torch import load_file, save_file

    text = tiny_dirs["gemma3"]
    folder = tmp_path / "mm"
    folder.mkdir()
    tensors = {"model.language_model." + k[len("model."):]: v
               for k, v in load_file(text / "model.safetensors").items()}
    tensors["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((text / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": config, "vision_config": {"model_type": "siglip_vision_model"}}))
    with pytest.warns(UserWarning, match="only the language model runs"):
        mm = modelkin.load(folder, device="cpu", dtype="float32")
    ids = [list(range(3, 30))]
    assert torch.equal(mm.logits(ids), models["gemma3"].logits(ids))
    del tensors["model.vision_tower.vision_model.embeddings.patch_embedding.weight"]
    only_vision = {"model.vision_tower.x.weight": torch.zeros(2)}
    save_file(only_vision, folder / "model.safetensors")
    with pytest.raises(ConfigError, match="no language-model weights"):
        modelkin.load(folder, device="cpu")


@pytest.mark.parametrize("edit, match", [
    (lambda c: {**c, "layer_types": c["layer_types"][:3]}, "'layer_types'"),
    (lambda c: {**c, "layer_types": ["sliding_attention", "chunked", "full_attention", "full_attention"]},
     "'layer_types'"),
    (lambda c: {**c, "sliding_window": 0}, "'sliding_window'"),
    (lambda c: {**c, "sliding_window": None}, "'sliding_window'"),
    (lambda c: {**c, "hidden_activation": "relu"}, "hidden_activation"),
    (lambda c: {**c, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    (lambda c: {**c, "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},
     "text_config"),
])
def test_bad_gemma3_config_is_one_line_config_error(edit, match, tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["gemma3"], tmp_path / "bad", edit)
    with pytest.raises(ConfigError, match=match) as err:
        modelkin.load(path, device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, family", [("gemma3", "Gemma-3"), ("qwen3", "Qwen3")])
def test_missing_qk_norm_is_named(name, family, tiny_dirs, tmp_path):
    path = _copy(tiny_dirs[name], tmp_path / "bad", drop="layers.1.self_attn.k_norm")
    with pytest.raises(ConfigError, match=f"{family} .*k_norm.*model.layers.1.self_attn.k_norm.weight"):
        modelkin.load(path, device="cpu")
