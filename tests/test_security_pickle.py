"""No code execution from checkpoints: a pickle whose __reduce__ creates a marker file is refused by
every entry point (open_checkpoint, modelkin.load, `modelkin inspect`), and the marker never appears.

A positive control proves each payload is live: unpickled without weights_only, it creates the marker.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

import modelkin
from modelkin.checkpoint import open_checkpoint
from modelkin.errors import CheckpointError
from tests.conftest import run_cli


class _TouchMarker:
    """Unpickling this calls os.system (or builtins.open) to create a marker file."""

    def __init__(self, marker: str, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        return open, (self.marker, "w")


def _payload_bytes(marker, how, layout):
    state = {"model.embed_tokens.weight": torch.zeros(2, 2), "evil": _TouchMarker(str(marker), how)}
    if layout == "raw-pickle":
        return pickle.dumps(state, protocol=2)
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=layout == "torch-zip")
    return buf.getvalue()


LAYOUTS = ["torch-zip", "torch-legacy", "raw-pickle"]
HOWS = ["system", "open"]


def _write(tmp_path, how, layout, name="pytorch_model.bin"):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    marker = tmp_path / "PWNED"
    (model / name).write_bytes(_payload_bytes(marker, how, layout))
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return model, marker


def test_payloads_are_live_without_weights_only(tmp_path):
    """Positive control: a plain unpickler runs every payload (one subprocess, so this test stays clean)."""
    cases = []
    for layout in LAYOUTS:
        for how in HOWS:
            case = tmp_path / f"{layout}-{how}"
            case.mkdir()
            model, marker = _write(case, how, layout)
            cases.append((str(model / "pytorch_model.bin"), layout, marker))
    script = (
        "import pickle, sys, torch\n"
        "for p, layout in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    if layout == 'raw-pickle':\n"
        "        pickle.load(open(p, 'rb'))\n"
        "    else:\n"
        "        torch.load(p, weights_only=False)\n"
    )
    args = [x for path, layout, _ in cases for x in (path, layout)]
    subprocess.run([sys.executable, "-c", script, *args], capture_output=True, timeout=300, check=False)
    assert all(marker.exists() for _, _, marker in cases)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("how", HOWS)
def test_open_checkpoint_refuses_and_never_runs_the_payload(tmp_path, how, layout):
    model, marker = _write(tmp_path, how, layout)
    for target in (model, model / "pytorch_model.bin"):
        with pytest.raises(CheckpointError) as err:
            open_checkpoint(target)
        message = str(err.value)
        assert "\n" not in message
        assert "weights-only loader refused it" in message or "not a readable PyTorch checkpoint" in message
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_other_suffixes_are_refused_too(tmp_path, suffix):
    model, marker = _write(tmp_path, "system", "torch-zip", name=f"weights{suffix}")
    with pytest.raises(CheckpointError, match="weights-only loader refused it"):
        open_checkpoint(model / f"weights{suffix}")
    assert not marker.exists()


def test_malicious_shard_in_an_index_is_refused(tmp_path):
    model, marker = _write(tmp_path, "system", "torch-zip", name="pytorch_model-00002-of-00002.bin")
    torch.save({"model.norm.weight": torch.ones(2)}, model / "pytorch_model-00001-of-00002.bin")
    index = {"weight_map": {"model.norm.weight": "pytorch_model-00001-of-00002.bin",
                            "model.embed_tokens.weight": "pytorch_model-00002-of-00002.bin"}}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weights-only loader refused it"):
        open_checkpoint(model)
    assert not marker.exists()


def test_modelkin_load_refuses(tmp_path):
    model, marker = _write(tmp_path, "system", "torch-zip")
    with pytest.raises(CheckpointError, match="refused"):
        modelkin.load(model, device="cpu")
    assert not marker.exists()


def test_cli_inspect_refuses_with_one_line_and_exit_2(tmp_path):
    model, marker = _write(tmp_path, "system", "torch-zip")
    out = tmp_path / "out.json"
    proc = run_cli("inspect", model, "--json", out, "--no-cache", "--device", "cpu", timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelkin: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not out.exists()


def test_zip_with_a_pickle_that_imports_a_module_is_refused(tmp_path):
    """A hand-made torch zip whose data.pkl names a global outside the allowlist (no torch.save involved)."""
    path = tmp_path / "pytorch_model.bin"
    marker = tmp_path / "PWNED"
    evil = pickle.dumps({"w": _TouchMarker(str(marker), "system")}, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", evil)
        z.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError):
        open_checkpoint(path)
    assert not marker.exists()
