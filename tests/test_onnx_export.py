"""ONNX export of tiny dense and MoE checkpoints (Llama, Pangu Pro MoE with MoGE routing, Qwen3-MoE):
onnxruntime against the torch engine, graph layout, the export as a checkpoint, errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import modelkin
from modelkin.errors import CheckpointError, DeviceError, InputError
from modelkin.export import ort_engine
from modelkin.export.onnx import export_onnx
from modelkin.export.verify import compare_engines
from modelkin.runtime.kv_cache import positions_from_mask
from modelkin.synth.tiny import make_tiny

ARCHS = ("llama", "pangu_moe", "qwen3_moe")
PROMPT = "the quick brown fox jumps over the lazy dog and keeps on running far away"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(checkpoint, export) per architecture, exported once for the module."""
    root = tmp_path_factory.mktemp("onnx_tiny")
    out = {}
    for arch in ARCHS:
        ckpt = make_tiny(arch, root / arch, seed=3)
        export_onnx(ckpt, root / f"{arch}-onnx")
        out[arch] = (ckpt, root / f"{arch}-onnx")
    return out


@pytest.fixture(scope="module")
def engines(exported) -> dict[str, tuple[modelkin.runtime.api.Model, ort_engine.OrtModel]]:
    return {
        arch: (modelkin.load(ckpt, device="cpu", dtype="float32"), ort_engine.load(out, device="cpu"))
        for arch, (ckpt, out) in exported.items()
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_torch_for_prefill_and_16_decode_steps(arch, engines):
    torch_model, ort_model = engines[arch]
    ids = torch_model.tokenizer.encode(PROMPT)
    result = compare_engines(torch_model, ort_model, [ids, ids[:5]], steps=16)
    assert result["prefill_max_abs_diff"] < 1e-4, result
    assert result["decode_max_abs_diff"] < 1e-4, result
    assert result["max_abs_logit"] > 1.0  # logits far from zero: the bound means something
    assert len(result["tokens"][0]) == 16


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generations_are_token_identical(arch, engines):
    torch_model, ort_model = engines[arch]
    prompts = [PROMPT, "hello", "a b c"]
    got = ort_model.generate_batch(prompts, max_new_tokens=16)
    want = torch_model.generate_batch(prompts, max_new_tokens=16)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    one = ort_model.generate(PROMPT, max_new_tokens=8, temperature=0.8, seed=5)
    assert one.tokens == torch_model.generate(PROMPT, max_new_tokens=8, temperature=0.8, seed=5).tokens


def test_other_batch_sizes_and_prompts_longer_than_the_trace_sample(engines):
    torch_model, ort_model = engines["pangu_moe"]  # traced with batch 2, 3 new tokens, 4 past
    rng = np.random.default_rng(0)
    for batch, length in ((1, 1), (1, 60), (5, 23)):
        ids = rng.integers(0, torch_model.config.vocab_size, (batch, length)).tolist()
        diff = (ort_model.logits(ids) - torch_model.logits(ids)).abs().max().item()
        assert diff < 1e-4, (batch, length, diff)
    ragged = [list(range(3, 40)), [5, 6], list(range(10, 20))]
    result = compare_engines(torch_model, ort_model, ragged, steps=4)  # left-padded batch of 3
    assert result["max_abs_diff"] < 1e-4, result


def test_score_matches(engines):
    torch_model, ort_model = engines["qwen3_moe"]
    a, b = ort_model.score(PROMPT), torch_model.score(PROMPT)
    assert a.tokens == b.tokens
    assert a.nll == pytest.approx(b.nll, abs=1e-3)


def test_graph_inputs_outputs_and_shared_weights(exported):
    import onnx

    _, out = exported["llama"]
    manifest = json.loads((out / "manifest.json").read_text())
    n, kv, dh = manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]
    decode = {e["name"]: e for e in manifest["io"]["decode"]["inputs"]}
    assert list(decode)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert decode["input_ids"]["shape"] == ["batch", "seq"]
    assert decode["attention_mask"]["shape"] == ["batch", "total"]
    assert decode["past_key_values.1.value"]["shape"] == ["batch", kv, "past", dh]
    outputs = {e["name"]: e for e in manifest["io"]["decode"]["outputs"]}
    assert outputs["logits"]["shape"] == ["batch", "seq", manifest["vocab_size"]]
    assert outputs["logits"]["dtype"] == "float"
    assert outputs[f"present.{n - 1}.key"]["shape"] == ["batch", kv, "total", dh]
    prefill = [e["name"] for e in manifest["io"]["prefill"]["inputs"]]
    assert prefill == ["input_ids", "attention_mask", "position_ids"]
    assert [e["name"] for e in manifest["io"]["prefill"]["outputs"]] == list(outputs)
    assert sorted(p.name for p in out.glob("*.onnx*")) == ["decode.onnx", "model.onnx", "model.onnx.data"]
    for name in ("model.onnx", "decode.onnx"):
        graph = onnx.load(str(out / name), load_external_data=False).graph
        external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {
            "model.onnx.data"
        }
    assert (out / "config.json").is_file() and (out / "tokenizer.model").is_file()


def test_prefill_graph_runs_on_its_own(exported, engines):
    _, out = exported["qwen3_moe"]
    torch_model, _ = engines["qwen3_moe"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.tensor([torch_model.tokenizer.encode(PROMPT)] * 3)
    mask = torch.ones_like(ids)
    logits, *present = session.run(
        None,
        {
            "input_ids": ids.numpy(),
            "attention_mask": mask.numpy(),
            "position_ids": positions_from_mask(mask).numpy(),
        },
    )
    assert np.abs(logits - torch_model.logits(ids).numpy()).max() < 1e-4
    assert present[0].shape == (
        3,
        torch_model.config.num_key_value_heads,
        ids.shape[1],
        torch_model.config.head_dim,
    )


@pytest.mark.parametrize("arch", ("llama", "pangu_moe"))
def test_export_is_a_checkpoint_with_canonical_names(arch, exported, engines):
    from modelkin.checkpoint import open_checkpoint

    _, out = exported[arch]
    torch_model, _ = engines[arch]
    params = dict(torch_model.module.named_parameters())
    with open_checkpoint(out / "model.onnx") as src:
        assert src.format == "onnx"
        assert set(src.keys()) == set(params)  # HF names, nothing anonymous, no wrapper prefix
        for name in ("model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
            assert torch.equal(src.get_tensor(name), params[name].detach())
    reloaded = modelkin.load(out / "model.onnx", device="cpu")  # the torch engine reads it back
    ids = [torch_model.tokenizer.encode(PROMPT)]
    assert torch.equal(reloaded.logits(ids), torch_model.logits(ids))


def test_inspect_reads_the_export(exported, cli):
    _, out = exported["pangu_moe"]
    proc = cli("inspect", out / "model.onnx", "--no-table", "--no-cache", "--json", "-", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    roles = {t["name"]: t["role"] for t in report["tensors"]}
    assert report["unknown_roles"] == []
    assert roles["model.layers.0.mlp.router_scale"] == "router_scale"
    assert roles["model.layers.1.mlp.experts.gate_up_proj"] == "expert_gate_up"


def test_cli_run_with_onnxruntime_and_missing_providers(exported, engines, cli):
    _, out = exported["llama"]
    torch_model, _ = engines["llama"]
    proc = cli(
        "run",
        out,
        "--engine",
        "onnxruntime",
        "--prompt",
        "hello",
        "--max-new-tokens",
        "6",
        "--json",
        "-",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"] == torch_model.generate("hello", max_new_tokens=6).tokens
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        proc = cli("run", out, "--engine", "onnxruntime", "--prompt", "hi", "--device", "cuda")
        assert proc.returncode == 2
        assert "no CUDAExecutionProvider" in proc.stderr and "onnxruntime-gpu" in proc.stderr
        assert "Traceback" not in proc.stderr
        proc = cli(
            "run",
            out,
            "--engine",
            "onnxruntime",
            "--prompt",
            "hi",
            "--device",
            "npu",
            "--allow-fallback",
            "--max-new-tokens",
            "2",
        )
        assert proc.returncode == 0, proc.stderr
        assert "no CANNExecutionProvider" in proc.stderr and "falling back" in proc.stderr


def test_float16_runs_and_bfloat16_explains(exported, tmp_path):
    ckpt, _ = exported["llama"]
    export_onnx(ckpt, tmp_path / "fp16", dtype="float16")
    fp16 = ort_engine.load(tmp_path / "fp16", device="cpu")
    reference = modelkin.load(ckpt, device="cpu", dtype="float32")
    ids = [reference.tokenizer.encode(PROMPT)]
    assert fp16.dtype == torch.float16
    assert (fp16.logits(ids) - reference.logits(ids)).abs().max().item() < 0.05
    assert fp16.generate(PROMPT, max_new_tokens=4).tokens  # the KV cache runs in float16
    with pytest.warns(UserWarning, match="bfloat16"):
        export_onnx(ckpt, tmp_path / "bf16", dtype="bfloat16")
    with pytest.raises(DeviceError, match="bfloat16.*CPUExecutionProvider"):
        ort_engine.load(tmp_path / "bf16", device="cpu")
    with pytest.raises(InputError, match="exported in float16"):
        ort_engine.load(tmp_path / "fp16", device="cpu", dtype="float32")


def test_export_errors_and_atomicity(exported, tmp_path, monkeypatch):
    ckpt, _ = exported["llama"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        export_onnx(ckpt, busy)
    with pytest.raises(InputError, match="opset"):
        export_onnx(ckpt, tmp_path / "x", opset=9)
    with pytest.raises(InputError, match="dtype"):
        export_onnx(ckpt, tmp_path / "x", dtype="int8")
    with pytest.raises(CheckpointError, match="not a modelkin ONNX export"):
        ort_engine.load(ckpt)

    import modelkin.export.onnx as onnx_mod

    def broken(*args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(onnx_mod, "trace", broken)
    with pytest.raises(RuntimeError, match="tracing failed"):
        export_onnx(ckpt, tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no partial OUTDIR, no temp dir


def test_provider_resolution(monkeypatch):
    from modelkin.export.providers import resolve_providers

    monkeypatch.delenv("MODELKIN_ALLOW_FALLBACK", raising=False)
    have = ort.get_available_providers()
    assert resolve_providers("cpu").providers == ["CPUExecutionProvider"]
    with pytest.raises(InputError, match="invalid device"):
        resolve_providers("tpu")
    for device, provider, package in (
        ("cuda:1", "CUDAExecutionProvider", "onnxruntime-gpu"),
        ("npu", "CANNExecutionProvider", "onnxruntime-cann"),
    ):
        if provider in have:
            choice = resolve_providers(device)
            assert choice.providers[0] == provider and choice.providers[-1] == "CPUExecutionProvider"
            continue
        with pytest.raises(DeviceError, match=provider) as err:
            resolve_providers(device)
        assert package in str(err.value)
        with pytest.warns(UserWarning, match="falling back"):
            choice = resolve_providers(device, allow_fallback=True)
        assert choice.providers == ["CPUExecutionProvider"] and choice.fallback_reason
        monkeypatch.setenv("MODELKIN_ALLOW_FALLBACK", "1")
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert resolve_providers(device).device == "cpu"
        monkeypatch.delenv("MODELKIN_ALLOW_FALLBACK")
