"""inspect.scan: --select reads only what it needs, resumable cache, CLI outputs, MoE summary, memory."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from modelkin.cli import main
from modelkin.inspect import inspect_checkpoint
from modelkin.inspect.roles import ATTENTION_ROLES, classify
from tests.ckpt_factory import write_safetensors_checkpoint
from tests.conftest import run_cli
from tests.inspect_layouts import pangu_moe_tensors


@pytest.fixture(scope="module")
def pangu(tmp_path_factory):
    sd, config = pangu_moe_tensors(layers=2, experts=8)
    sd["model.layers.0.mystery.weight"] = torch.ones(3)
    path = write_safetensors_checkpoint(tmp_path_factory.mktemp("pangu"), sd, config, shards=2)
    return path, sd


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_select_attention_reads_only_attention_tensors(pangu, tmp_path):
    path, sd = pangu
    out = tmp_path / "attn.json"
    assert main(["inspect", str(path), "--select", "attention", "--json", str(out), "--no-cache",
                 "--device", "cpu", "--no-table"]) == 0
    data = json.loads(out.read_text())
    wanted = {n for n in sd if classify(n).role in ATTENTION_ROLES}
    assert len(wanted) == 16  # q/k/v/o weights and biases of 2 layers
    assert {t["name"] for t in data["tensors"]} == wanted
    assert data["totals"]["bytes_read"] == sum(_nbytes(sd[n]) for n in wanted)
    for t in data["tensors"]:
        ref = sd[t["name"]].double()
        assert t["std_population"] == pytest.approx(ref.std(unbiased=False).item(), rel=1e-9)
        assert t["std_sample"] == pytest.approx(ref.std().item(), rel=1e-9)
        assert t["shape"] == list(sd[t["name"]].shape) and t["dtype"] == "BF16"
        assert {"kurtosis_excess", "skewness", "nan_count", "zero_fraction", "layer"} <= set(t)


def test_moe_summary_and_unknown_names(pangu):
    path, sd = pangu
    res = inspect_checkpoint(path, device="cpu", cache=False, progress=True)  # bar on stderr
    assert res.unknown == ["model.layers.0.mystery.weight"]
    assert res.by_name()["model.layers.0.mystery.weight"].role == "unknown"  # reported, not dropped
    moe = res.totals["moe"]
    total = sum(t.numel() for t in sd.values())
    experts = 2 * 8 * 3 * 8 * 32
    assert (moe["total_params"], moe["expert_params"], moe["num_experts"]) == (total, experts, 8)
    assert moe["active_params"] == total - experts + experts * 2 // 8
    spread = moe["expert_std_spread"]
    assert len(spread) == 6 and all(row["n_experts"] == 8 for row in spread)
    row = spread[0]
    stds = [res.by_name()[f"model.layers.{row['layer']}.mlp.experts.{e}.{row['role'][7:]}_proj.weight"].std
            for e in range(8)]
    assert row["std_min"] == min(stds) and row["std_max"] == max(stds)
    assert res.totals["bytes_read"] == sum(_nbytes(t) for t in sd.values())


def test_cli_outputs_json_csv_plot(pangu, tmp_path, capsys):
    path, _ = pangu
    csv_path, png = tmp_path / "s.csv", tmp_path / "s.png"
    assert main(["inspect", str(path), "--json", "-", "--csv", str(csv_path), "--plot", str(png),
                 "--no-cache", "--device", "cpu", "--select", "attention,mlp"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # the table went to stderr
    assert "layer" in captured.err and data["select"] == "attention,mlp"
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [r["name"] for r in rows] == [t["name"] for t in data["tensors"]]
    assert float(rows[0]["std_population"]) == data["tensors"][0]["std_population"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"bytes_read", "seconds", "gb_per_s", "device"} <= set(data["totals"])


def test_bad_select_is_a_one_line_user_error(pangu, capsys):
    assert main(["inspect", str(pangu[0]), "--select", "layers.(", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "neither a group nor a valid regular expression" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_killed_scan_resumes_and_rereads_only_the_rest(pangu, tmp_path, monkeypatch):
    path, sd = pangu
    cache_dir = tmp_path / "cache"
    env = {"MODELKIN_CACHE_DIR": str(cache_dir), "MODELKIN_TEST_STOP_AFTER": "20",
           "MODELKIN_CACHE_FLUSH_EVERY": "8"}
    killed = run_cli("inspect", path, "--device", "cpu", "--json", tmp_path / "never.json", env=env)
    assert killed.returncode == 75, killed.stderr  # died after 20 tensors, without cleanup
    assert not (tmp_path / "never.json").exists()
    (cache_file,) = (cache_dir / "inspect").glob("*.json")
    cached = set(json.loads(cache_file.read_text())["tensors"])
    assert len(cached) == 16  # flushed after 8 and 16 tensors; the last 4 were lost with the kill

    monkeypatch.setenv("MODELKIN_CACHE_DIR", str(cache_dir))
    resumed = inspect_checkpoint(path, device="cpu")
    assert resumed.totals["tensors_from_cache"] == 16
    assert resumed.totals["bytes_read"] == sum(_nbytes(t) for n, t in sd.items() if n not in cached)
    fresh = inspect_checkpoint(path, device="cpu", cache=False)
    assert [t.to_json() for t in resumed.tensors] == [t.to_json() for t in fresh.tensors]
    again = inspect_checkpoint(path, device="cpu")  # now complete: nothing is read
    assert again.totals["bytes_read"] == 0 and again.totals["tensors_from_cache"] == len(sd)


def test_peak_rss_stays_bounded(tmp_path):
    """~300 MB checkpoint, largest tensor 64 MB: peak RSS < 3 x 64 MB + 500 MB."""
    base = torch.randn(4096, 8192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    sd = {f"model.layers.{i}.mlp.up_proj.weight": base if i == 0 else base[:, i * 1000:][:, :4096] * i
          for i in range(5)}
    write_safetensors_checkpoint(tmp_path / "big", sd, {"model_type": "llama"}, shards=2)
    largest = max(_nbytes(t) for t in sd.values())
    total = sum(_nbytes(t) for t in sd.values())
    del sd
    code = textwrap.dedent(f"""
        import json, resource, sys
        import modelkin
        res = modelkin.inspect_checkpoint({str(tmp_path / 'big')!r}, device="cpu", cache=False)
        # VmHWM, not ru_maxrss: Linux carries the forking parent's (pytest's) peak into ru_maxrss
        peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(json.dumps({{"peak": peak, "bytes_read": res.totals["bytes_read"]}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bytes_read"] == total
    print(f"peak RSS {result['peak'] / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB")
    assert result["peak"] < 3 * largest + 500e6, result
