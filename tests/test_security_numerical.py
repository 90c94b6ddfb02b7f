"""Numerical faults in a checkpoint: NaN/Inf weights are counted by inspect and survive fingerprinting
(reported, not crashing); generation that meets NaN/Inf logits stops with a NumericalError (exit 2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelkin
from modelkin.errors import NumericalError
from tests.conftest import run_cli

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "tie_word_embeddings": False}
Q1 = "model.layers.1.self_attn.q_proj.weight"
UP2 = "model.layers.2.mlp.up_proj.weight"


def _edit(path, **edits):
    tensors = load_file(path / "model.safetensors")
    for name, fn in edits.items():
        fn(tensors[name.replace("__", ".")])
    save_file(tensors, path / "model.safetensors", {"format": "pt"})
    return path


def _poison_q1(w):
    w.view(-1)[:5] = math.nan
    w.view(-1)[10:12] = math.inf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from modelkin.synth.tiny import make_tiny

    root = tmp_path_factory.mktemp("numerical")
    clean = make_tiny("qwen2", root / "clean", overrides=SMALL, seed=0)
    bad_weights = _edit(make_tiny("qwen2", root / "bad_weights", overrides=SMALL, seed=0),
                        **{Q1.replace(".", "__"): _poison_q1,
                           UP2.replace(".", "__"): lambda w: w.view(-1).__setitem__(0, -math.inf)})
    nan_head = _edit(make_tiny("qwen2", root / "nan_head", overrides=SMALL, seed=0),
                     lm_head__weight=lambda w: w.fill_(math.nan))
    inf_head = _edit(make_tiny("qwen2", root / "inf_head", overrides=SMALL, seed=0),
                     lm_head__weight=lambda w: w[7].fill_(math.inf))
    return {"clean": clean, "bad_weights": bad_weights, "nan_head": nan_head, "inf_head": inf_head}


def test_inspect_counts_nan_and_inf(models):
    result = modelkin.inspect_checkpoint(models["bad_weights"], device="cpu", cache=False)
    stats = {t.name: t.stats for t in result.tensors}
    assert (stats[Q1]["nan_count"], stats[Q1]["inf_count"]) == (5, 2)
    assert (stats[UP2]["nan_count"], stats[UP2]["inf_count"]) == (0, 1)
    assert sum(s["nan_count"] + s["inf_count"] for s in stats.values()) == 8
    clean_w = load_file(models["bad_weights"] / "model.safetensors")[Q1]
    finite = clean_w[torch.isfinite(clean_w)].double()
    assert stats[Q1]["count"] == finite.numel()  # moments over the finite values, exactly
    assert stats[Q1]["mean"] == pytest.approx(finite.mean().item(), rel=1e-9, abs=1e-12)
    assert stats[Q1]["std_population"] == pytest.approx(finite.std(correction=0).item(), rel=1e-9)


def test_inspect_cli_json_reports_counts_and_stays_valid_json(models, tmp_path):
    out = tmp_path / "out.json"
    proc = run_cli("inspect", models["bad_weights"], "--json", out, "--no-cache", "--device", "cpu", "--no-table")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())  # strict JSON: NaN statistics are written as null
    row = next(t for t in data["tensors"] if t["name"] == Q1)
    assert (row["nan_count"], row["inf_count"]) == (5, 2)
    assert row["std_population"] is not None and math.isfinite(row["std_population"])


def test_fingerprint_with_nan_weights_reports_instead_of_crashing(models):
    report = modelkin.fingerprint(models["clean"], models["bad_weights"], methods="std_curve,spectral",
                                  device="cpu")
    spectral = report.methods["spectral"]
    assert spectral.call == "skipped" and "non-finite" in json.dumps(report.to_json(), default=str)
    assert report.methods["std_curve"].call != "skipped"  # torch.std over NaN: a NaN score, reported


@pytest.mark.parametrize("which", ["nan_head", "inf_head"])
def test_generation_stops_with_numerical_error(models, which):
    model = modelkin.load(models[which], device="cpu")
    with pytest.raises(NumericalError, match="NaN/Inf logits at generation step 0") as err:
        model.generate("hello", max_new_tokens=4)
    assert "\n" not in str(err.value)
    with pytest.raises(NumericalError):
        model.generate([1, 2, 3], max_new_tokens=2, temperature=0.8, seed=1)


def test_cli_run_with_nan_logits_exits_2_with_one_line(models):
    proc = run_cli("run", models["nan_head"], "--prompt", "hello", "--max-new-tokens", "4", "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "NaN/Inf logits" in lines[0] and "Traceback" not in proc.stderr


def test_clean_model_generates(models):
    assert len(modelkin.load(models["clean"], device="cpu").generate("hello", max_new_tokens=3).tokens) == 3
