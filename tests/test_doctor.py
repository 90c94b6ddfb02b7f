"""`modelkin doctor`: JSON keys, exit codes, --device checks."""

from __future__ import annotations

import json

import pytest
import torch


def test_doctor_json_keys(cli):
    proc = cli("doctor", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["torch"]["version"] == torch.__version__
    names = [b["name"] for b in report["backends"]]
    assert names == ["cpu", "cuda", "npu"]
    for b in report["backends"]:
        assert set(b) >= {"name", "available", "reason", "devices"}
        assert b["available"] or b["reason"]
    cpu = report["backends"][0]
    assert cpu["available"] and cpu["devices"][0]["total_memory"] > 0
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert report["onnxruntime"]["version"]
    assert report["selected"]["backend"] in names


def test_doctor_json_file_and_table(cli, tmp_path):
    out = tmp_path / "d.json"
    proc = cli("doctor", "--json", out)
    assert proc.returncode == 0
    assert json.loads(out.read_text())["selected"]
    assert "auto selects" in proc.stdout and "npu" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_doctor_device_check_exit_codes(cli):
    proc = cli("doctor", "--device", "cuda", env={"MODELKIN_ALLOW_FALLBACK": ""})
    assert proc.returncode == 2
    assert proc.stderr.startswith("modelkin: error: device cuda is unavailable")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = cli("doctor", "--device", "cuda", "--allow-fallback", "--json", "-")
    assert proc.returncode == 0
    check = json.loads(proc.stdout)["device_check"]
    assert check["backend"] == "cpu" and check["usable"] is False and "CUDA" in check["fallback_reason"]
    proc = cli("doctor", "--device", "cpu", "--json", "-")
    assert json.loads(proc.stdout)["device_check"]["usable"] is True
    proc = cli("doctor", "--device", "tpu")
    assert proc.returncode == 2 and "invalid device 'tpu'" in proc.stderr
