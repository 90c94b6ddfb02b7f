"""Tiny random Llama / Qwen2 / openPangu-Embedded checkpoints (written by make-tiny) against
transformers, plus KV-cache, batching, dtype and bad-input behaviour of the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import modelkin
from modelkin.errors import (
    ConfigError,
    InputError,
    NumericalError,
    TokenizerError,
    UnsupportedArchitectureError,
)
from modelkin.runtime.generate import decode_step, prefill
from modelkin.runtime.kv_cache import make_kv_cache
from modelkin.synth.tiny import make_tiny

transformers = pytest.importorskip("transformers")

VARIANTS = {
    # name: (tiny arch, config overrides)
    "llama": ("llama", {}),  # llama3 rope scaling
    "llama_linear_rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mistral": (
        "llama",
        {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "rope_scaling": None,
            "sliding_window": None,
        },
    ),
    "mistral_window": (
        "llama",
        {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "rope_scaling": None,
            "sliding_window": 16,
        },
    ),
    "qwen2": ("qwen2", {}),  # tied embeddings
    "qwen2_untied_yarn": (
        "qwen2",
        {
            "tie_word_embeddings": False,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        },
    ),
    "pangu_embedded": ("pangu_embedded", {}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny models gain nothing from a second, and on a busy machine every
    OpenMP team waits for its descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        name: make_tiny(arch, root / name, seed=i, overrides=over)
        for i, (name, (arch, over)) in enumerate(VARIANTS.items())
    }


def hf_reference(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' own implementation of the checkpoint (Llama with biases for openPangu)."""
    config = json.loads((path / "config.json").read_text())
    if config["model_type"] == "PanguEmbedded":
        # openPangu-Embedded is Llama with q/k/v/o biases: transformers' attention_bias covers all four
        from safetensors.torch import load_file

        fields = {
            k: v for k, v in config.items() if k not in ("auto_map", "bias", "model_type", "architectures")
        }
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**fields, attention_bias=config["bias"])
        )
        state = {k: v for k, v in load_file(path / "model.safetensors").items() if "inv_freq" not in k}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"} - set(state), (missing, unexpected)
        return model.to(dtype).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def models(tiny_dirs) -> dict[str, modelkin.runtime.api.Model]:
    return {name: modelkin.load(path, device="cpu", dtype="float32") for name, path in tiny_dirs.items()}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name, tiny_dirs, models):
    ids = torch.randint(0, 512, (2, 90), generator=torch.Generator().manual_seed(7))
    ours = models[name].logits(ids)
    with torch.inference_mode():
        ref = hf_reference(tiny_dirs[name])(ids).logits
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (2, 90, 512)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.std() > 0.5  # logits far from uniform: the comparison means something


def test_variants_exercise_what_they_claim(models):
    from modelkin.runtime.layers import rope_inv_freq

    llama = models["llama"].module
    default, _ = rope_inv_freq(16, 500000.0, None, 512)
    assert not torch.allclose(llama.model.rotary_emb.inv_freq, default)  # llama3 scaling changed it
    assert models["qwen2"].module.lm_head.weight is models["qwen2"].module.model.embed_tokens.weight
    q2 = models["qwen2_untied_yarn"].module
    assert q2.lm_head.weight is not q2.model.embed_tokens.weight
    assert q2.model.rotary_emb.attention_scaling > 1.0
    attn = models["pangu_embedded"].module.model.layers[0].self_attn
    assert attn.o_proj.bias is not None and attn.q_proj.bias is not None
    assert models["qwen2"].module.model.layers[0].self_attn.o_proj.bias is None
    windowed = models["mistral_window"]
    ids = [list(range(3, 60))]
    full_view = windowed.logits(ids)
    windowed.module.sliding_window = None
    try:
        assert not torch.allclose(windowed.logits(ids)[0, 20:], full_view[0, 20:])  # the window matters
    finally:
        windowed.module.sliding_window = 16


@pytest.mark.parametrize("name", ["llama", "qwen2", "pangu_embedded", "mistral_window"])
def test_prefill_then_decode_equals_full_forward(name, models):
    model = models[name]
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    full = model.logits(ids)[0]
    cache = make_kv_cache(model.module, batch_size=1, max_len=25)
    with torch.inference_mode():
        steps = [prefill(model.module, ids[:, :10], None, cache)]
        steps += [decode_step(model.module, ids[:, t], cache) for t in range(10, 24)]
    stepped = torch.stack([s[0] for s in steps]).float()  # positions 9..23
    assert stepped.shape == (15, 512)
    assert (stepped - full[9:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["llama", "pangu_embedded"])
def test_batch_of_ragged_prompts_equals_each_alone(name, models):
    model = models[name]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 11)]
    batch = model.generate_batch(prompts, max_new_tokens=12)
    alone = [model.generate(p, max_new_tokens=12) for p in prompts]
    for b, a in zip(batch, alone):
        assert b.tokens == a.tokens
        assert max(abs(x - y) for x, y in zip(b.logprobs, a.logprobs)) <= 1e-4
    ragged = model.logits(prompts)  # right-padded
    for i, p in enumerate(prompts):
        single = model.logits([p])[0]
        assert (ragged[i, : len(p)] - single).abs().max().item() <= 1e-4


def test_bf16_matches_transformers_bf16(tiny_dirs):
    model = modelkin.load(tiny_dirs["qwen2_untied_yarn"], device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.module.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    ours = model.logits(ids)
    with torch.inference_mode():
        ref = hf_reference(tiny_dirs["qwen2_untied_yarn"], torch.bfloat16)(ids).logits.float()
        ref32 = hf_reference(tiny_dirs["qwen2_untied_yarn"])(ids).logits
    assert (ours - ref).abs().max().item() <= 0.1 * ref.abs().max().item()
    assert (ours.argmax(-1) == ref32.argmax(-1)).float().mean() >= 0.9
    assert len(model.generate(ids[0].tolist(), max_new_tokens=5).tokens) == 5


def test_sampling_is_seeded_and_stops(models):
    model = models["qwen2"]
    a = model.generate("Hello world", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    b = model.generate("Hello world", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    c = model.generate("Hello world", max_new_tokens=16, temperature=1.0, top_k=50, min_p=0.01, seed=12)
    assert a.tokens == b.tokens and a.text == b.text and a.tokens != c.tokens
    greedy = model.generate("Hello world", max_new_tokens=16)
    assert greedy.finish_reason == "length" and len(greedy.tokens) == 16
    stop = greedy.text[3:5]
    stopped = model.generate("Hello world", max_new_tokens=16, stop=["never there", stop])
    assert stopped.finish_reason == "stop" and stopped.text == greedy.text[: greedy.text.find(stop)]
    assert len(stopped.tokens) < 16
    eos = greedy.tokens[4]
    model.eos_token_ids.add(eos)
    try:
        ended = model.generate("Hello world", max_new_tokens=16)
    finally:
        model.eos_token_ids.discard(eos)
    assert ended.finish_reason == "stop" and ended.tokens == greedy.tokens[: greedy.tokens.index(eos) + 1]


def test_score_counts_bytes_and_bos(models):
    text = "Zürich, 你好 and more"
    llama = models["llama"]  # SentencePiece: adds BOS, so every text token is scored
    res = llama.score(text)
    ids = llama.tokenizer.encode(text)
    assert ids[0] == llama.tokenizer.bos_token_id and res.tokens == ids[1:]
    assert res.n_bytes == len(text.encode()) and res.nll == pytest.approx(-sum(res.logprobs))
    assert res.bits_per_byte == pytest.approx(res.nll / 0.6931471805599453 / res.n_bytes)
    logits = llama.logits([ids])[0].log_softmax(-1)
    assert res.logprobs[2] == pytest.approx(logits[2, ids[3]].item(), abs=1e-5)
    qwen = models["qwen2"]  # byte-level BPE without BOS: the first token is context only
    assert qwen.score(text).tokens == qwen.tokenizer.encode(text)[1:]


def test_unsupported_model_type(tmp_path):
    path = make_tiny("llama", tmp_path / "m", tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="unsupported model_type 'gpt_neox'") as err:
        modelkin.load(path, device="cpu")
    assert "llama" in str(err.value) and "qwen2" in str(err.value) and "\n" not in str(err.value)


def test_config_disagreeing_with_tensors(tmp_path):
    path = make_tiny("llama", tmp_path / "m", tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    with pytest.raises(ConfigError) as err:
        modelkin.load(path, device="cpu")
    message = str(err.value)
    assert (
        "model.layers.0.mlp.down_proj.weight expected shape [64, 192] (config.json), found [64, 160]"
        in message
    )
    assert message.index("layers.0.mlp.down_proj") < message.index("layers.0.mlp.gate_proj")  # sorted
    (path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ConfigError, match=r"missing tensors: model\.layers\.0\.self_attn\.k_proj\.bias"):
        modelkin.load(path, device="cpu")


def test_prompt_longer_than_context(models):
    model = models["llama"]
    with pytest.raises(InputError, match="600 tokens is longer than the model's context of 512"):
        model.generate([5] * 600, max_new_tokens=4)
    with pytest.raises(InputError, match="longer than the model's context"):
        model.logits([[5] * 513])
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.logits([[5, 512]])
    result = model.generate([5] * 510, max_new_tokens=10)  # clipped to the context
    assert len(result.tokens) == 2 and result.finish_reason == "length"


def test_no_tokenizer_and_nan_weights(tmp_path):
    path = make_tiny("llama", tmp_path / "m", tokenizer=False)
    model = modelkin.load(path, device="cpu", progress=True)  # the progress bar path loads the same
    assert model.tokenizer is None and model.logits([[1, 2, 3]]).shape == (1, 3, 512)
    assert len(model.generate([1, 2, 3], max_new_tokens=3).tokens) == 3
    with pytest.raises(TokenizerError, match="has no tokenizer files"):
        model.generate("hello")
    with pytest.raises(TokenizerError, match="has no tokenizer files"):
        model.score("hello")
    model.module.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN/Inf logits at generation step 0"):
        model.generate([1, 2, 3], max_new_tokens=3)


def test_loading_skips_meta_initialisers_that_import_the_compiler(tmp_path):
    """Models are built on the meta device; nn.Embedding's random init there would import torch._dynamo and
    sympy (~900 modules). A fresh process loads and runs a tiny Llama and a tiny Gemma-3 without them, and an
    embedding built off the meta device is still randomly initialised."""
    import subprocess
    import sys

    from modelkin.runtime.layers import embedding

    paths = [make_tiny(arch, tmp_path / arch, seed=1) for arch in ("llama", "gemma3")]
    code = ("import sys, modelkin\n"
            f"for p in {[str(p) for p in paths]!r}:\n"
            "    m = modelkin.load(p, device='cpu')\n"
            "    m.generate([1, 2, 3], max_new_tokens=2)\n"
            "print(sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    e = embedding(100, 8)
    assert e.weight.device.type == "cpu" and 0.5 < float(e.weight.detach().std()) < 1.5
