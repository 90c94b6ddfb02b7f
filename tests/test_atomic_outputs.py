"""Atomic outputs: a killed `modelkin inspect --json/--csv/--plot` leaves the previous files intact and no
partial file, a rerun completes; and every file the package writes goes through modelkin.utils' atomic
helpers (an AST audit of src/modelkin)."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ckpt_factory import tiny_llama_state, write_safetensors_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "modelkin"
OLD = {"json": '{"previous": true}\n', "csv": "previous,csv\n", "png": "previous png"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """56 matrices of 384x384: with --spectral the scan takes seconds, long enough to be killed."""
    state, config = tiny_llama_state(layers=8, hidden=384, heads=4, kv_heads=4, inter=384, vocab=64)
    return write_safetensors_checkpoint(tmp_path_factory.mktemp("atomic") / "model", state, config)


def _outputs(directory: Path, *, existing: tuple[str, ...] = ("json", "csv", "png")) -> dict[str, Path]:
    paths = {"json": directory / "out.json", "csv": directory / "out.csv", "png": directory / "out.png"}
    for kind in existing:
        paths[kind].write_text(OLD[kind])
    return paths


def _inspect_args(model: Path, out: dict[str, Path], *extra: str) -> list[str]:
    return ["inspect", str(model), "--json", str(out["json"]), "--csv", str(out["csv"]), "--plot",
            str(out["png"]), "--device", "cpu", "--no-table", *extra]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "MODELKIN_CACHE_DIR": str(cache), "MODELKIN_CACHE_FLUSH_EVERY": "1"}


def test_sigkill_mid_scan_leaves_previous_outputs_and_a_rerun_completes(checkpoint, tmp_path):
    out = _outputs(tmp_path, existing=("json",))  # a previous out.json; no CSV or PNG yet
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "modelkin", *_inspect_args(checkpoint, out, "--spectral")],
                            env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(cache.glob("inspect/*.json")):  # the resumable cache holds the first tensor: mid-scan
        assert proc.poll() is None, f"inspect ended before it could be killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "inspect never started scanning"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert out["json"].read_text() == OLD["json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out.json"]  # no partial or temporary file
    done_before = len(json.loads(next(cache.glob("inspect/*.json")).read_text())["tensors"])
    assert 0 < done_before < 56 + 19

    rerun = subprocess.run([sys.executable, "-m", "modelkin", *_inspect_args(checkpoint, out, "--spectral")],
                           env=_env(cache), capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(out["json"].read_text())
    assert result["totals"]["tensors"] == len(result["tensors"]) == 8 * 9 + 3
    assert result["totals"]["tensors_from_cache"] >= done_before  # resumed, not restarted
    assert out["csv"].read_text().count("\n") == 8 * 9 + 3 + 1
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out.csv", "out.json", "out.png"]


KILL_ON_FSYNC = """
import os, signal, sys
import modelkin.utils
real_fsync = os.fsync
def fsync_then_die(fd):  # the new file is written but not yet renamed over the old one
    real_fsync(fd)
    os.kill(os.getpid(), signal.SIGKILL)
modelkin.utils.os.fsync = fsync_then_die
from modelkin.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_write_keeps_the_previous_json(checkpoint, tmp_path):
    out = tmp_path / "out.json"
    out.write_text(OLD["json"])
    args = ["inspect", str(checkpoint), "--json", str(out), "--device", "cpu", "--no-table", "--no-cache"]
    killed = subprocess.run([sys.executable, "-c", KILL_ON_FSYNC, *args], capture_output=True, timeout=600,
                            check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert out.read_text() == OLD["json"]
    leftovers = [p for p in tmp_path.iterdir() if p.name != "out.json"]
    # SIGKILL allows no cleanup: the complete new file may remain under a hidden temporary name
    assert all(p.name.startswith(".out.json.") and p.name.endswith(".tmp") for p in leftovers), leftovers
    for p in leftovers:
        assert json.loads(p.read_text())["totals"]["tensors"] == 75

    rerun = subprocess.run([sys.executable, "-m", "modelkin", *args], capture_output=True, text=True, timeout=600,
                           check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(out.read_text())["totals"]["tensors"] == 75


# ---- audit: every write in the package is atomic -------------------------------------------------

WRITE_ATTRS = {"write_text", "write_bytes", "savefig", "save", "copyfile", "copy2", "rename", "save_file", "dump"}
WRITE_CALLS = {"save_file", "torch.save", "onnx.save", "shutil.copyfile", "shutil.copy", "shutil.copy2",
               "np.save", "numpy.save", "json.dump", "os.rename"}
# Functions that write directly because every caller hands them the temporary path of an atomic_path
# block (checked by reading the callers), or that do not write a user-visible output at all.
ALLOWED = {
    "utils.py:atomic_write_bytes": "the atomic helper itself",
    "export/onnx.py:_write_graphs": "writes into the atomic_path(outdir) temporary directory",
    "export/assets.py:_write_json": "called by write_assets only",
    "export/onnx_files.py:externalize": "data file inside the atomic_path(outdir) temporary directory",
    "export/manifest.py:save": "called with the atomic_path(outdir) temporary directory",
    "synth/lora.py:lora_finetune": "train.save is synth.variants.write_hf_checkpoint (atomic_path(outdir))",
    "synth/upcycle.py:flush": "_ShardWriter lives in the atomic_path(outdir) temporary directory",
    "synth/upcycle.py:close": "_ShardWriter lives in the atomic_path(outdir) temporary directory",
    "tokenizer/write.py:copy_tokenizer_files": "synth and export/assets pass an atomic_path temporary directory",
    "tokenizer/write.py:write_gguf_tokenizer": "synth passes the atomic_path(outdir) temporary directory",
    "tokenizer/write.py:_write_json": "called by write_gguf_tokenizer only",
    "inspect/plot.py:figure_png": "savefig into an in-memory buffer",
    "commands/run.py:run": "opens os.devnull",
}


def _write_calls(func: ast.AST) -> list[tuple[int, str]]:
    """Write calls in ``func`` that are not lexically inside a `with atomic_path(...)` block."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, protected: bool) -> None:
        if isinstance(node, ast.With):
            protected = protected or any(
                isinstance(item.context_expr, ast.Call) and _name(item.context_expr.func).endswith("atomic_path")
                for item in node.items)
        if isinstance(node, ast.Call) and not protected:
            name = _name(node.func)
            attr = name.rsplit(".", 1)[-1]
            if name in WRITE_CALLS or (isinstance(node.func, ast.Attribute) and attr in WRITE_ATTRS):
                found.append((node.lineno, name))
            elif attr == "open" and _mode(node) and any(c in _mode(node) for c in "wax+"):
                found.append((node.lineno, f"{name}(mode={_mode(node)!r})"))
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, protected)

    for child in ast.iter_child_nodes(func):
        visit(child, False)
    return found


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _mode(call: ast.Call) -> str | None:
    args = [a for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
    if isinstance(mode, ast.Constant):
        return mode.value
    positional = call.args[1:] if _name(call.func) == "open" else call.args
    return next((a.value for a in positional if a in args), None)


def test_every_write_in_the_package_is_atomic():
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                calls = _write_calls(node)
                if calls and f"{rel}:{node.name}" not in ALLOWED:
                    unexplained += [f"{rel}:{line} in {node.name}: {call}" for line, call in calls]
    assert not unexplained, (
        "direct writes outside modelkin.utils.atomic_* / atomic_path (write to a temporary path and rename, "
        "or list the function in ALLOWED with the reason):\n" + "\n".join(unexplained))


def test_the_audit_sees_direct_writes():
    tree = ast.parse("def f(p, fig):\n    p.write_text('x')\n    fig.savefig(p)\n    open(p, 'w')\n"
                     "    with atomic_path(p) as tmp:\n        tmp.write_text('ok')\n")
    assert [name for _, name in _write_calls(tree.body[0])] == ["p.write_text", "fig.savefig", "open(mode='w')"]
