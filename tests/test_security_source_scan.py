"""No code-execution path exists in the package: an AST scan of src/modelkin for trust_remote_code,
exec/eval, unrestricted unpicklers, torch.load without weights_only=True, shells and unsandboxed jinja."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "modelkin"
FORBIDDEN_CALLS = {
    "exec", "eval", "compile", "__import__",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
    "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load",
    "marshal.loads", "shelve.open", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
    "os.system", "os.popen", "os.execv", "os.execvp", "os.spawnv", "subprocess.getoutput",
    "jinja2.Environment", "jinja2.Template", "Environment", "Template",
}
FORBIDDEN_IMPORTS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "jinja2.Environment", "jinja2.Template",
                     "torch.load", "dill", "cloudpickle", "marshal", "shelve"}


def _sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, f"found only {len(files)} package files under {PACKAGE}"
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan(tree: ast.AST) -> list[str]:
    """Every forbidden construct in one module, as 'line: what'."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", None) or ""
            for alias in node.names:
                name = f"{module}.{alias.name}" if module else alias.name
                if name in FORBIDDEN_IMPORTS or alias.name in FORBIDDEN_IMPORTS:
                    found.append(f"{node.lineno}: import {name}")
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not _is_false(node.value):
            found.append(f"{node.value.lineno}: trust_remote_code={ast.unparse(node.value)}")
        if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and not _is_false(node.value):
            found.append(f"{node.value.lineno}: allow_pickle={ast.unparse(node.value)}")
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(f"{node.lineno}: {name}(...)")
            if name == "torch.load" or name.endswith(".torch.load"):
                weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not _is_true(weights_only):
                    found.append(f"{node.lineno}: torch.load without weights_only=True")
            if name.startswith("subprocess.") and any(k.arg == "shell" and not _is_false(k.value)
                                                       for k in node.keywords):
                found.append(f"{node.lineno}: {name}(shell=...)")
    return found


def _is_false(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in (False, None)


def test_package_has_no_code_execution_path():
    problems = []
    for path in _sources():
        for hit in scan(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            problems.append(f"{path.relative_to(PACKAGE.parent)}:{hit}")
    assert not problems, "forbidden constructs:\n" + "\n".join(problems)


def test_torch_load_exists_only_with_weights_only():
    """The one torch.load in the package (the .bin reader) passes weights_only=True."""
    calls = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _dotted(node.func) == "torch.load":
                calls.append((path.name, {k.arg: ast.unparse(k.value) for k in node.keywords}))
    assert calls, "expected the PyTorch reader to call torch.load"
    assert all(kw.get("weights_only") == "True" for _, kw in calls), calls


def test_templates_use_the_immutable_sandbox():
    text = (PACKAGE / "tokenizer" / "chat.py").read_text()
    assert "ImmutableSandboxedEnvironment" in text
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from modelkin.tokenizer.chat import _environment

    assert isinstance(_environment(), ImmutableSandboxedEnvironment)


@pytest.mark.parametrize("snippet,expected", [
    ("AutoModel.from_pretrained(p, trust_remote_code=True)", "trust_remote_code=True"),
    ("import torch\ntorch.load(f)", "torch.load without weights_only=True"),
    ("torch.load(f, weights_only=False)", "torch.load without weights_only=True"),
    ("pickle.loads(b)", "pickle.loads(...)"),
    ("from pickle import load", "import pickle.load"),
    ("eval(x)", "eval(...)"),
    ("exec(x)", "exec(...)"),
    ("subprocess.run(c, shell=True)", "subprocess.run(shell=...)"),
    ("np.load(f, allow_pickle=True)", "allow_pickle=True"),
    ("jinja2.Environment().from_string(t)", "jinja2.Environment(...)"),
])
def test_the_scan_catches_what_it_looks_for(snippet, expected):
    assert any(expected in hit for hit in scan(ast.parse(snippet))), scan(ast.parse(snippet))


def test_the_scan_allows_the_safe_forms():
    safe = "torch.load(f, weights_only=True, mmap=True)\nx.eval()\nmodel.eval()\nast.literal_eval(s)"
    assert scan(ast.parse(safe)) == []
