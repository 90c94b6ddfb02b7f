"""Backend layer: device specs, dtype policy, fallback rules, protocol surface."""

from __future__ import annotations

import pytest
import torch

from modelkin.backends import fallback_allowed, get_backend, probe_all
from modelkin.errors import DeviceError, InputError


def test_cpu_backend_surface():
    b = get_backend("cpu")
    assert b.name == "cpu" and b.device == torch.device("cpu")
    assert b.resolve_dtype("auto") == torch.float32
    assert b.resolve_dtype("bf16") == torch.bfloat16
    assert b.resolve_dtype(torch.float16) == torch.float16
    mem = b.memory_info()
    assert mem["total"] > 0 and 0 < mem["free"] <= mem["total"] and mem["peak"] > 0
    assert b.ort_providers() == ["CPUExecutionProvider"]
    assert b.dist_backend == "gloo"
    b.manual_seed(3)
    x = torch.rand(3)
    b.manual_seed(3)
    assert torch.equal(x, torch.rand(3))
    b.synchronize()


def test_auto_prefers_available_in_npu_cuda_cpu_order():
    statuses = {s.name: s for s in probe_all()}
    assert set(statuses) == {"cpu", "cuda", "npu"}
    expected = next(n for n in ("npu", "cuda", "cpu") if statuses[n].available)
    assert get_backend("auto").name == expected
    for s in statuses.values():
        assert s.available or s.reason, f"{s.name} unavailable without a reason"


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "npu:-1", "auto:0", "cpu0", ""])
def test_malformed_specs_are_input_errors(spec):
    if spec == "":
        assert get_backend(spec).name in ("cpu", "cuda", "npu")  # empty means auto
        return
    with pytest.raises(InputError, match="invalid device"):
        get_backend(spec)


def test_unknown_dtype_is_input_error():
    with pytest.raises(InputError, match=r"unknown dtype 'float8'.*fix: use auto"):
        get_backend("cpu").resolve_dtype("float8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_error_and_fallback(monkeypatch):
    monkeypatch.delenv("MODELKIN_ALLOW_FALLBACK", raising=False)
    with pytest.raises(DeviceError) as info:
        get_backend("cuda:0")
    msg = str(info.value)
    assert "cuda:0 is unavailable" in msg and "no CUDA support" in msg and "--allow-fallback" in msg
    assert "\n" not in msg
    with pytest.warns(UserWarning, match="falling back to CPU"):
        b = get_backend("cuda:0", allow_fallback=True)
    assert b.name == "cpu" and "cuda:0 unavailable" in b.fallback_reason
    monkeypatch.setenv("MODELKIN_ALLOW_FALLBACK", "1")
    with pytest.warns(UserWarning):
        assert get_backend("npu").name == "cpu"
    # an explicit flag beats the environment
    with pytest.raises(DeviceError):
        get_backend("npu", allow_fallback=False)


def test_fallback_env_parsing(monkeypatch):
    for value, expected in [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("", False)]:
        monkeypatch.setenv("MODELKIN_ALLOW_FALLBACK", value)
        assert fallback_allowed() is expected
    assert fallback_allowed(True) is True


def test_cpu_index_out_of_range_for_cuda_like_spec():
    # cpu takes no index semantics beyond 0; a cpu:N spec still resolves to the one CPU device
    assert get_backend("cpu:0").device == torch.device("cpu")
