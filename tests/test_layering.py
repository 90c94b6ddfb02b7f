"""Dependency direction (design.md): runtime never imports inspect/compare; checkpoint/backends stay low; no cycles."""

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
    allowed = {"backends/npu.py", "runtime/moe/npu_ops.py", "_torch_env.py"}
    for path in ROOT.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        if rel in allowed:
            continue
        assert "import torch_npu" not in path.read_text(), rel


def _module_graph() -> dict[str, set[str]]:
    """modelkin module -> the modelkin modules it imports, at module level or inside functions."""
    mods: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from pkg import submodule` depends on the submodule (the package is imported anyway)
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            else:
                continue
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    """No two modules import each other, directly or through others, counting function-local imports."""
    cycles = _cycles(_module_graph())
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_on_known_graphs():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert not _cycles({"a": {"b"}, "b": set()})


def test_module_graph_counts_function_local_imports():
    # modelkin.export imports its submodules only inside __getattr__ (lazily)
    assert {"modelkin.export.onnx", "modelkin.export.ort_engine"} <= _module_graph()["modelkin.export"]
