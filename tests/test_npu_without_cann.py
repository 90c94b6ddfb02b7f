"""The real Ascend failure mode: torch-npu installed, no CANN toolkit.

Builds a virtualenv that sees the running interpreter's packages (torch, modelkin: whether this suite runs
in a system Python or inside a virtualenv) and adds the real torch-npu wheel paired to the installed torch. There, plain `import torch` fails (torch auto-loads the plugin, which
cannot find CANN's libraries); modelkin must still import, run on CPU, and explain the NPU's absence.
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch

from modelkin._torch_env import _base_version

pytestmark = pytest.mark.network_venv

TORCH_BASE = _base_version(torch.__version__)


def _cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "modelkin-tests"


def _parent_site_dirs() -> list[str]:
    """Where this interpreter finds its packages: a venv's own site-packages, or the system's."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


@pytest.fixture(scope="module")
def npu_python() -> str:
    if os.path.exists("/usr/local/Ascend"):
        pytest.skip("this machine has a CANN install; the test needs one without")
    parents = _parent_site_dirs()
    # One cached environment per parent environment and torch version: a venv's and the system's differ.
    key = hashlib.sha256("\n".join([sys.prefix, *parents]).encode()).hexdigest()[:12]
    env_dir = _cache_root() / f"npu-venv-torch{TORCH_BASE}-{key}"
    python = env_dir / "bin" / "python"
    marker = env_dir / ".torch-npu-installed"
    if not marker.exists():
        # Not system_site_packages: that would be the *base* interpreter's, which inside a venv has
        # neither torch nor modelkin. The parent's site dirs are added below instead (their .pth files
        # too, so an editable modelkin is found).
        venv.EnvBuilder(system_site_packages=False, with_pip=True, clear=True).create(env_dir)
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
             f"torch-npu=={TORCH_BASE}"], capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, f"could not install torch-npu=={TORCH_BASE}:\n{proc.stderr[-2000:]}"
        marker.write_text("ok")
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in parents]
    (Path(own) / "zz_modelkin_parent_env.pth").write_text("\n".join(lines) + "\n")
    return str(python)


def _run(python: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_DEVICE_BACKEND_AUTOLOAD", "MODELKIN_ALLOW_FALLBACK")}
    return subprocess.run([python, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_plain_torch_import_fails_there(npu_python):
    """Guards the test itself: the environment really reproduces the failure."""
    proc = _run(npu_python, "-c", "import torch")
    assert proc.returncode != 0
    assert "Failed to load the backend extension: torch_npu" in proc.stderr


def test_modelkin_imports_and_computes_on_cpu(npu_python):
    code = ("import modelkin, torch; from modelkin.backends import get_backend; "
            "b = get_backend('auto'); print(b.name, (torch.ones(2) * 3).sum().item())")
    proc = _run(npu_python, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cpu", "6.0"]


def test_doctor_names_missing_cann_piece(npu_python):
    proc = _run(npu_python, "-m", "modelkin", "doctor", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    npu = next(b for b in report["backends"] if b["name"] == "npu")
    assert npu["available"] is False
    assert "CANN" in npu["reason"] and "libascendcl.so" in npu["reason"] and "libhccl.so" in npu["reason"]
    assert "set_env.sh" in npu["reason"]
    assert npu["versions"]["torch_npu"] == TORCH_BASE
    assert report["torch"]["plugin_autoload_disabled"] is True
    assert report["selected"]["backend"] == "cpu"
    assert _run(npu_python, "-m", "modelkin", "doctor").returncode == 0


def test_doctor_device_npu_exit_codes(npu_python):
    proc = _run(npu_python, "-m", "modelkin", "doctor", "--device", "npu")
    assert proc.returncode == 2
    assert "device npu is unavailable" in proc.stderr and "libhccl.so" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run(npu_python, "-m", "modelkin", "doctor", "--device", "npu", "--allow-fallback", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    check = json.loads(proc.stdout)["device_check"]
    assert check["backend"] == "cpu" and check["usable"] is False
    assert "libascendcl.so" in check["fallback_reason"]
    assert "falling back to CPU" in proc.stderr


def test_version_mismatch_is_explained(npu_python, tmp_path):
    """A torch-npu that does not pair with torch is named as such (simulated via metadata)."""
    code = (
        "import importlib.metadata as m, modelkin._torch_env as t\n"
        "real = m.version\n"
        "m.version = lambda n: '2.12.0' if n in ('torch-npu', 'torch_npu') else real(n)\n"
        "print(t.npu_block_reason())\n"
    )
    proc = _run(npu_python, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "does not pair with torch" in proc.stdout and f"torch-npu=={TORCH_BASE}" in proc.stdout
