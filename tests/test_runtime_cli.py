"""`modelkin make-tiny`, `run` and `score` on tiny checkpoints: files, JSON fields, one-line errors."""

from __future__ import annotations

import json

import pytest

from modelkin.cli import main


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "qwen2"
    assert main(["make-tiny", "qwen2", str(out), "--seed", "3"]) == 0
    return out


def test_make_tiny_writes_the_real_layout(tiny_qwen2, tmp_path, capsys):
    names = sorted(p.name for p in tiny_qwen2.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tiny_qwen2 / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert main(["make-tiny", "pangu_embedded", str(tmp_path / "p"), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "pangu_embedded" and "tokenizer.model" in report["files"]
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["model_type"] == "PanguEmbedded" and config["bias"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_run_streams_and_writes_json(tiny_qwen2, tmp_path, capsys):
    out = tmp_path / "run.json"
    code = main(
        [
            "run",
            str(tiny_qwen2),
            "--prompt",
            "Hello",
            "--chat",
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    report = json.loads(out.read_text())
    assert set(report) >= {"prompt_ids", "tokens", "text", "device", "dtype", "timings"}
    assert report["device"] == "cpu" and report["dtype"] == "float32" and len(report["tokens"]) <= 6
    assert report["text"] in printed.out and "tok/s" in printed.err
    assert "routing" not in report  # dense model: no MoE telemetry


def test_score_from_file(tiny_qwen2, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Tokenizers split text into pieces.", encoding="utf-8")
    assert main(["score", str(tiny_qwen2), "--file", str(text), "--json", "-"]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert result["n_bytes"] == 34 and len(result["logprobs"]) == len(result["tokens"])
    assert result["bits_per_byte"] > 0 and "bits per byte" in printed.err


def test_errors_are_one_line(tiny_qwen2, tmp_path, capsys):
    assert main(["score", str(tiny_qwen2), "--file", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modelkin: error: text file not found") and "\n" not in err
    assert main(["run", str(tiny_qwen2), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "top_p must be in [0, 1]" in capsys.readouterr().err
