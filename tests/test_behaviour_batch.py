"""The shared-prefill behaviour path (Model.prefill_decode, compare's run_outputs): its logits, greedy
continuations and MoE routing equal the one-prompt-at-a-time paths; sampled rows do not depend on
batching."""

from __future__ import annotations

import pytest
import torch

import modelkin
from modelkin.compare.behaviour.outputs import run_outputs
from modelkin.compare.behaviour.prompts import Prompt
from modelkin.compare.settings import BehaviourSettings
from modelkin.runtime.continuations import Continuation
from modelkin.runtime.sampling import inverse_cdf
from modelkin.synth.tiny import make_tiny

# ragged lengths: 1, 2, 5, 9 and 14 tokens
PROMPTS = [[5], [7, 300], [11, 12, 13, 14, 15], list(range(40, 49)), list(range(100, 114))]


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen3_moe"])
def model(request, tmp_path_factory):
    overrides = {"sliding_window": 4} if request.param == "gemma3" else None  # windows shorter than prompts
    path = make_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=3, overrides=overrides)
    return modelkin.load(path, device="cpu")


def greedy_rows(n: int, tokens: int) -> list[Continuation]:
    return [Continuation(prompt=i, max_new_tokens=tokens) for i in range(n)]


def test_greedy_rows_equal_generate_token_for_token(model):
    got = model.prefill_decode(PROMPTS, greedy_rows(len(PROMPTS), 12))
    for prompt, ids in zip(PROMPTS, got):
        assert ids == model.generate(prompt, max_new_tokens=12).tokens


def test_greedy_rows_stop_at_eos_like_generate(model):
    full = model.generate(PROMPTS[2], max_new_tokens=8).tokens
    eos = full[3]
    model.eos_token_ids.add(eos)
    try:
        got = model.prefill_decode(PROMPTS, greedy_rows(len(PROMPTS), 8))
        want = [model.generate(p, max_new_tokens=8).tokens for p in PROMPTS]
    finally:
        model.eos_token_ids.discard(eos)
    assert got == want
    assert got[2] == full[: full.index(eos) + 1]


def test_prefill_logits_equal_model_logits(model):
    seen = {}
    model.prefill_decode(PROMPTS, [], on_logits=lambda i, lg: seen.__setitem__(i, lg.log_softmax(-1)))
    assert sorted(seen) == list(range(len(PROMPTS)))
    for i, prompt in enumerate(PROMPTS):
        want = model.logits([prompt])[0].log_softmax(-1)
        assert seen[i].shape == want.shape
        torch.testing.assert_close(seen[i], want, atol=2e-5, rtol=1e-5)


def test_small_budgets_split_batches_with_the_same_results(model):
    u = torch.rand(6, 10, generator=torch.Generator().manual_seed(0))
    rows = greedy_rows(len(PROMPTS), 10) + [
        Continuation(prompt=p, max_new_tokens=6 + p, temperature=0.8, uniforms=u[k]) for k, p in
        enumerate([1, 1, 1, 4, 4, 0])]
    big = model.prefill_decode(PROMPTS, rows)
    small = model.prefill_decode(PROMPTS, rows, logits_budget=1, cache_budget=1)  # one prompt / row a batch
    assert big == small
    assert [len(r) for r in big[len(PROMPTS):]] == [7, 7, 7, 10, 10, 6]  # no EOS drawn here
    assert big[5] != big[6] or big[5] != big[7]  # distinct uniforms, distinct samples


def test_sampled_batches_are_sized_at_the_sample_dtype(model, monkeypatch):
    """A bfloat16 cache row costs half a float32 one, so twice as many sampled rows share a batch."""
    import modelkin.runtime.continuations as continuations

    args = model.module.args
    if model.module.model.embed_tokens.weight.dtype != torch.float32 or getattr(args, "layer_types", None):
        pytest.skip("needs a float32 model with one cache shape for every layer")
    seen: list[tuple[torch.dtype, int]] = []
    real = continuations.decode_rows

    def spy(decoder, cache, logits, rows, **kw):
        seen.append((decoder.model.embed_tokens.weight.dtype, len(rows)))
        return real(decoder, cache, logits, rows, **kw)

    monkeypatch.setattr(continuations, "decode_rows", spy)
    u = torch.rand(8, 4, generator=torch.Generator().manual_seed(1))
    rows = [Continuation(prompt=2, max_new_tokens=4, temperature=0.9, uniforms=u[k]) for k in range(8)]
    slot_floats = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim
    budget = 2 * (len(PROMPTS[2]) + 4) * slot_floats * 4  # two float32 rows
    full = model.prefill_decode(PROMPTS, rows, cache_budget=budget)
    assert seen == [(torch.float32, 2)] * 4
    seen.clear()
    half = model.prefill_decode(PROMPTS, rows, cache_budget=budget, sample_dtype=torch.bfloat16)
    assert seen == [(torch.bfloat16, 4)] * 2
    assert [len(r) for r in half] == [len(r) for r in full] == [4] * 8


def test_sampled_rows_follow_the_model_distribution(model):
    probs = model.logits([PROMPTS[3]])[0, -1].softmax(-1)
    n = 4000
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(1))
    rows = [Continuation(prompt=0, max_new_tokens=1, temperature=1.0, uniforms=u[k]) for k in range(n)]
    got = torch.tensor([r[0] for r in model.prefill_decode([PROMPTS[3]], rows)])
    freq = torch.bincount(got, minlength=probs.numel()).float() / n
    assert (freq - probs).abs().max() < 4 * (probs.max() / n) ** 0.5 + 1e-3


def test_moe_routing_counts_prompt_tokens_as_one_prompt_at_a_time(model):
    tele = model.routing_telemetry
    if tele is None:
        pytest.skip("dense model")
    want: dict[int, list[int]] = {}
    for prompt in PROMPTS:  # the old accounting: model.logits of each prompt alone, every token real
        tele.reset()
        with tele.recording(model.module):
            model.logits([prompt])
        for layer in tele.to_json()["layers"]:
            counts = want.setdefault(layer["layer"], [0] * len(layer["expert_counts"]))
            want[layer["layer"]] = [a + b for a, b in zip(counts, layer["expert_counts"])]
    model.prefill_decode(PROMPTS, greedy_rows(len(PROMPTS), 6))  # decoding must not be counted
    layers = model.routing()["layers"]
    assert {layer["layer"]: layer["expert_counts"] for layer in layers} == want
    assert all(layer["num_tokens"] == sum(map(len, PROMPTS)) for layer in layers)


def test_run_outputs_greedy_text_and_samples(model):
    prompts = [Prompt(id=f"p{i}", category="user", prompt=t) for i, t in
               enumerate(["Hello there", "a", "The quick brown fox jumps over"])]
    settings = BehaviourSettings(max_prompts=3, greedy_tokens=5, mmd_prompts=2, mmd_samples=3, mmd_tokens=4)
    out = run_outputs(model, prompts, settings, seed=7)
    again = run_outputs(model, prompts, settings, seed=7)
    for ids, text, p in zip(out.greedy_ids, out.greedy_text, prompts):
        ref = model.generate(p.prompt, max_new_tokens=5)
        assert (ids, text) == (ref.tokens, ref.text)
    assert len(out.sample_ids) == 2 and all(len(s) == 3 for s in out.sample_ids)
    assert out.sample_ids == again.sample_ids and out.sample_text == again.sample_text
    assert run_outputs(model, prompts, settings, seed=8).sample_ids != out.sample_ids
    for i, ids in enumerate(out.prompt_ids):
        ref = model.logits([ids])[0].log_softmax(-1)
        want = ref.to(torch.float16).float()
        torch.testing.assert_close(out.logprobs[i].float(), want, atol=2e-3, rtol=1e-3)
    for m in model.module.modules():  # a prepacked MoE copy is rebuilt, not copied, for bfloat16
        if hasattr(m, "prepack_cpu"):
            m.prepack_cpu()
    bf16_settings = BehaviourSettings(**{**settings.to_json(), "sample_dtype": "bfloat16"})
    bf16 = run_outputs(model, prompts, bf16_settings, seed=7)
    assert bf16.greedy_ids == out.greedy_ids and [len(s) for s in bf16.sample_ids] == [3, 3]
    assert bf16.sample_dtype == "bfloat16"
    fresh = modelkin.load(model.path, device="cpu")  # consumed: converted in place, no second copy
    cast = run_outputs(fresh, prompts, bf16_settings, seed=7, consume=True)
    assert (cast.greedy_ids, cast.sample_ids, cast.sample_text) == (bf16.greedy_ids, bf16.sample_ids,
                                                                    bf16.sample_text)
    assert {p.dtype for p in fresh.module.parameters() if p.is_floating_point()} == {torch.bfloat16}
    full = run_outputs(model, prompts, BehaviourSettings(**{**settings.to_json(), "sample_dtype": "model"}), seed=7)
    assert full.sample_dtype == "float32" and full.greedy_ids == out.greedy_ids


def test_inverse_cdf_matches_softmax_and_skips_impossible_ids():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0)) * 2
    logits[0, 500:600] = float("-inf")
    n = 100_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1))
    ids = inverse_cdf(logits.expand(n, -1), u, block=64)
    freq = torch.bincount(ids, minlength=1000).float() / n
    p = logits.softmax(-1)[0]
    assert ((freq - p).abs() <= 5 * (p / n).sqrt() + 2e-4).all()
    assert freq[500:600].sum() == 0
    edges = inverse_cdf(logits.expand(2, -1), torch.tensor([0.0, 1 - 2**-24]))
    assert torch.isfinite(logits[0, edges]).all()


def test_row_major_loading_gives_the_same_outputs_as_the_gemv_layout(tmp_path):
    """compare loads with gemv_layout=False (row-major wide weights, no column-major copy): its logits,
    greedy and sampled continuations equal those of the default layout, on a float32 CPU model."""
    path = make_tiny("llama", tmp_path / "llama", seed=5)
    settings = BehaviourSettings(max_prompts=3, greedy_tokens=6, mmd_prompts=2, mmd_samples=3, mmd_tokens=4,
                                 sample_dtype="model")
    prompts = [Prompt(id=f"p{i}", category="c", prompt=t)
               for i, t in enumerate(["hello there", "a b c d e f", "the end is near"])]
    outs = []
    for gemv in (True, False):
        m = modelkin.load(path, device="cpu", gemv_layout=gemv)
        gate = m.module.model.layers[0].mlp.gate_proj.weight
        assert gate.shape[0] > gate.shape[1] and gate.is_contiguous() is not gemv
        outs.append(run_outputs(m, prompts, settings, seed=1))
    col, row = outs
    for a, b in zip(col.logprobs, row.logprobs):
        assert torch.equal(a, b)
    assert col.greedy_ids == row.greedy_ids and col.sample_ids == row.sample_ids


def test_gathered_cache_holds_each_rows_slots_right_aligned_and_zero_padding():
    from modelkin.runtime.kv_cache import KVCache, gather_rows

    g = torch.Generator().manual_seed(0)
    src = KVCache(num_layers=2, batch_size=2, num_kv_heads=1, head_dim=3, max_len=5, dtype=torch.float32,
                  device="cpu")
    for layer in range(2):
        src.keys[layer].copy_(torch.randn(2, 1, 5, 3, generator=g))
        src.values[layer].copy_(torch.randn(2, 1, 5, 3, generator=g))
    src.valid_BS[0, 1:] = True  # row 0: 4 real tokens, row 1: 2 (left padding)
    src.valid_BS[1, 3:] = True
    src.next_pos_B[:] = torch.tensor([4, 2])
    src.length = 5
    out = gather_rows([(src, 1, 2), (src, 0, 1)], extra=3)
    assert out.batch_size == 3 and out.length == 4 and out.max_len == 7 and out.has_padding
    for layer in range(2):
        for cache_t, src_t in ((out.keys[layer], src.keys[layer]), (out.values[layer], src.values[layer])):
            assert torch.equal(cache_t[:2, :, 2:4], src_t[1, :, 3:5].expand(2, -1, -1, -1))
            assert torch.equal(cache_t[2, :, :4], src_t[0, :, 1:5])
            assert not cache_t[:2, :, :2].any()  # the padding is zeros: 0 x value stays 0 under the mask
    assert out.valid_BS[:, :4].tolist() == [[False, False, True, True]] * 2 + [[True] * 4]
    assert out.next_pos_B.tolist() == [2, 2, 4]
