"""Dependency direction (design.md): runtime never imports inspect/compare; checkpoint/backends stay low."""

from __future__ import annotations

import ast
from pathlib import Path

import modelkin

ROOT = Path(modelkin.__file__).parent
FORBIDDEN = {
    "backends": (
        "runtime", "inspect", "compare", "export", "checkpoint", "tokenizer", "synth", "cli", "commands"
    ),
    "checkpoint": ("runtime", "inspect", "compare", "export", "tokenizer", "synth", "cli", "commands"),
    "tokenizer": ("runtime", "inspect", "compare", "export", "synth", "cli", "commands"),
    "runtime": ("inspect", "compare", "export", "synth", "cli", "commands"),
    "synth": ("inspect", "compare", "export", "cli", "commands"),
    "inspect": ("compare", "export", "synth", "cli", "commands"),
    "compare": ("export", "cli", "commands"),
    "export": ("inspect", "compare", "cli", "commands"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n.split(".")[1] for n in names if n.startswith("modelkin.") and n.count(".") >= 1}


def test_dependency_direction():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in (ROOT / package).rglob("*.py"):
            for dep in _imports(path) & set(forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports modelkin.{dep}")
    assert not bad, "\n".join(bad)


def test_torch_npu_imported_only_in_npu_files():
    allowed = {"backends/npu.py", "runtime/npu_ops.py", "_torch_env.py"}
    for path in ROOT.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        if rel in allowed:
            continue
        assert "import torch_npu" not in path.read_text(), rel
