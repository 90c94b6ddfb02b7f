"""`modelkin.inspect` must never shadow the standard library's `inspect`."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import modelkin

CODE = "import modelkin, modelkin.inspect, inspect; print(inspect.__file__); print(modelkin.inspect.__name__)"


def _check(cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    inspect_file, name = proc.stdout.split()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(inspect_file).resolve().is_relative_to(stdlib)
    assert name == "modelkin.inspect"


def test_inspect_is_stdlib_from_repo_root():
    _check(Path(modelkin.__file__).parents[2])


def test_inspect_is_stdlib_from_inside_the_package():
    _check(Path(modelkin.__file__).parent)


def test_no_main_blocks_or_sys_path_edits():
    root = Path(modelkin.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert 'if __name__ == "__main__"' not in text, path
        assert "sys.path.insert" not in text and "sys.path.append" not in text, path
