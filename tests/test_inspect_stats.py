"""inspect.stats: one-pass moments vs a float64 numpy reference, on tensors and on every format."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelkin.inspect import inspect_checkpoint
from modelkin.inspect.stats import AccumulationPolicy, Moments, tensor_stats
from tests.ckpt_factory import write_safetensors_checkpoint, write_torch_checkpoint

REL = 1e-6


def reference(x: np.ndarray) -> dict:
    """Float64 numpy statistics, written independently of modelkin (moments over finite values)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    f = x[np.isfinite(x)]
    n = f.size
    out = {"count": n, "nan_count": int(np.isnan(x).sum()), "inf_count": int(np.isinf(x).sum()),
           "zero_count": int((x == 0).sum())}
    if n == 0:
        return out
    mean = f.mean()
    d = f - mean
    var = (d * d).mean()
    out.update(mean=mean, std_population=math.sqrt(var), rms=math.sqrt((f * f).mean()),
               l2_norm=math.sqrt((f * f).sum()), min=f.min(), max=f.max(), absmax=np.abs(f).max())
    if n > 1:
        out["std_sample"] = math.sqrt((d * d).sum() / (n - 1))
    if var > 0:
        out["skewness"] = (d ** 3).mean() / var ** 1.5
        out["kurtosis_excess"] = (d ** 4).mean() / var ** 2 - 3.0
    return out


def assert_matches(got: dict, x: np.ndarray, *, rel: float = REL, where: str = "") -> None:
    ref = reference(x)
    scale = ref.get("std_population", 0.0)
    for key, want in ref.items():
        have = got[key]
        if key.endswith("count"):
            assert have == want, (where, key, have, want)
            continue
        # quantities that can be ~0 (mean, skewness) are compared against their natural scale
        floor = {"mean": scale, "skewness": 1.0, "kurtosis_excess": 1.0}.get(key, 0.0)
        assert abs(have - want) <= rel * max(abs(want), floor), (where, key, have, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_moments_match_numpy_with_nonfinite_and_zeros(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(300, 701, generator=g) * 0.02 + 0.5).to(dtype)
    flat = x.view(-1)
    flat[3], flat[10], flat[77], flat[500] = float("nan"), float("inf"), float("-inf"), 0.0
    flat[501] = -0.0
    got = tensor_stats(x, AccumulationPolicy(torch.float64, 1 << 14))  # many chunks
    assert (got["nan_count"], got["inf_count"]) == (1, 2)
    assert_matches(got, x.double().numpy(), where=str(dtype))


def test_integer_and_bool_tensors():
    x = torch.arange(-50, 1000, dtype=torch.int64)
    assert_matches(tensor_stats(x), x.numpy())
    b = torch.tensor([True, False, True, True])
    got = tensor_stats(b)
    assert got["mean"] == 0.75 and got["zero_count"] == 1


def test_fp32_accumulation_policy_is_accurate_enough():
    """The NPU policy (fp32 chunk sums, fp64 merge) still agrees to ~1e-5."""
    x = (torch.randn(2_000_003, generator=torch.Generator().manual_seed(2)) * 0.02 + 1.0)
    assert_matches(tensor_stats(x, AccumulationPolicy(torch.float32, 1 << 20)), x.double().numpy(),
                   rel=2e-5)


def test_large_offset_keeps_precision():
    x = torch.randn(100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1e-3 + 1e4
    assert_matches(tensor_stats(x, AccumulationPolicy(torch.float64, 4096)), x.numpy(), rel=1e-7)


def test_chan_merge_is_independent_of_chunking():
    x = torch.randn(10_007, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) ** 3
    a = tensor_stats(x, AccumulationPolicy(torch.float64, 7))
    b = tensor_stats(x, AccumulationPolicy(torch.float64, 1 << 20))
    for key in ("mean", "std_population", "skewness", "kurtosis_excess"):
        assert a[key] == pytest.approx(b[key], rel=1e-11)
    m = Moments.from_shifted_sums(3, 0.0, 6.0, 14.0, 36.0, 98.0)  # values 1, 2, 3
    assert (m.n, m.mean, m.m2, m.m3, m.m4) == (3, 2.0, 2.0, 0.0, 2.0)


def test_degenerate_tensors_do_not_crash():
    empty = tensor_stats(torch.empty(0))
    assert empty["count"] == 0 and math.isnan(empty["mean"]) and empty["l2_norm"] == 0.0
    one = tensor_stats(torch.tensor([2.5]))
    assert one["mean"] == 2.5 and one["std_population"] == 0.0 and math.isnan(one["std_sample"])
    assert math.isnan(one["skewness"])
    nan = tensor_stats(torch.full((5,), float("nan")))
    assert nan["nan_count"] == 5 and nan["count"] == 0 and math.isnan(nan["max"])
    const = tensor_stats(torch.ones(1000, dtype=torch.bfloat16))
    assert const["std_population"] == 0.0 and math.isnan(const["kurtosis_excess"])


# ---- every format, through inspect_checkpoint -------------------------------------------------

def _mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": (torch.randn(32, 32, generator=g) * 0.02).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(32, generator=g).to(torch.float16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(48, 32, generator=g) * 0.05,
        "model.layers.0.input_layernorm.weight": 1.0 + 0.01 * torch.randn(32, generator=g),
        "model.norm.weight": torch.ones(32, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
    }
    sd["model.layers.0.mlp.up_proj.weight"][0, :5] = 0.0
    return sd


def _check_result(result, arrays: dict[str, np.ndarray]) -> None:
    got = result.by_name()
    assert set(got) == set(arrays)
    for name, array in arrays.items():
        assert_matches(got[name].stats, array, where=name)


def test_sharded_safetensors_bf16_parity(tmp_path):
    sd = _mixed_state()
    write_safetensors_checkpoint(tmp_path, sd, {"model_type": "llama"}, shards=3)
    from safetensors.torch import load_file

    ref = {}
    for shard in sorted(tmp_path.glob("*.safetensors")):
        ref.update({k: v.double().numpy() for k, v in load_file(shard).items()})
    res = inspect_checkpoint(tmp_path, device="cpu", cache=False)
    _check_result(res, ref)
    assert res.totals["bytes_read"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert res.by_name()["model.embed_tokens.weight"].dtype == "BF16"


def test_torch_bin_bf16_parity(tmp_path):
    sd = _mixed_state(1)
    write_torch_checkpoint(tmp_path, sd, {"model_type": "llama"})
    loaded = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    _check_result(inspect_checkpoint(tmp_path, device="cpu", cache=False),
                  {k: v.double().numpy() for k, v in loaded.items()})


def test_onnx_with_external_data_parity(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    arrays = {"model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float32),
              "onnx::MatMul_7": (rng.standard_normal((16, 40)) * 0.1).astype(np.float32),
              "model.norm.weight": rng.standard_normal(16).astype(np.float16)}
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40])
    node = helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["y"], name="/model/layers.0/mlp/up_proj/MatMul")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=inits))
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size > 0
    res = inspect_checkpoint(tmp_path / "model.onnx", device="cpu", cache=False)
    _check_result(res, {k: v.astype(np.float64) for k, v in arrays.items()})
    assert res.by_name()["onnx::MatMul_7"].role == "up"  # recovered from the graph
    assert res.by_name()["onnx::MatMul_7"].layer == 0


def test_smollm2_gguf_parity(smollm2_gguf):
    """SmolLM2's real Q4_1/Q8_0/F32 tensors (dequantised by the reader) vs numpy in float64."""
    from modelkin.checkpoint import open_checkpoint
    from modelkin.inspect.scan import ScanOptions, scan

    select = r"layers\.(0|17)\.|^model\.norm"
    with open_checkpoint(smollm2_gguf) as src:
        res = scan(src, "cpu", ScanOptions(select=select, cache=False))
        got = res.by_name()
        assert len(got) == 19 and {t.dtype for t in res.tensors} >= {"Q4_1", "F32"}
        for name, t in got.items():
            assert_matches(t.stats, src.get_tensor(name).double().numpy(), where=name)


# ---- bit-pattern counting (the CPU path for 8- and 16-bit tensors) --------------------------------

COUNTING = AccumulationPolicy(torch.float64, 1 << 14, histogram=True)
SUMMING = AccumulationPolicy(torch.float64, 1 << 14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2,
                                   torch.int16, torch.int8, torch.uint8])
def test_counted_statistics_are_exact(dtype):
    """Counting bit patterns gives the float64 reference to rounding (1e-12), NaN/±Inf/±0 included,
    across several 1M-element counting chunks."""
    g = torch.Generator().manual_seed(11)
    if dtype.is_floating_point:
        x = (torch.randn(3 * (1 << 20) + 5, generator=g) * 0.3 + 0.1).to(dtype)
    else:
        x = (torch.randn(3 * (1 << 20) + 5, generator=g) * 40 + 60).clamp(0, 120).to(dtype)
    flat = x.view(-1)
    if dtype.is_floating_point:
        specials = [0.0, -0.0] + [float("nan")] * (dtype != torch.float8_e4m3fn)
        specials += [float("inf"), float("-inf")] if dtype in (torch.bfloat16, torch.float16, torch.float8_e5m2) else []
        for i, v in enumerate(specials):
            flat[7 + 1000 * i] = v
    got = tensor_stats(x, COUNTING)
    assert got == tensor_stats(x)  # the CPU default counts these dtypes
    assert_matches(got, x.to(torch.float32).double().numpy(), rel=1e-12, where=str(dtype))


def test_counting_agrees_with_power_sums():
    x = (torch.randn(1_000_003, generator=torch.Generator().manual_seed(12)) * 0.02 + 0.01).to(torch.bfloat16)
    counted, summed = tensor_stats(x, COUNTING), tensor_stats(x, SUMMING)
    for key, value in summed.items():
        assert counted[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_one_accumulator_fed_several_dtypes():
    """Counts are folded into the moments whenever the dtype changes, so mixed feeds stay exact."""
    from modelkin.inspect.stats import StatsAccumulator

    g = torch.Generator().manual_seed(13)
    parts = [(torch.randn(5000, generator=g) + 1).to(torch.bfloat16), torch.randn(3000, generator=g) * 2,
             (torch.randn(4000, generator=g) - 1).to(torch.float16), torch.tensor([float("nan"), 0.0])]
    acc = StatsAccumulator(COUNTING)
    for p in parts:
        acc.update(p)
    whole = np.concatenate([p.double().numpy() for p in parts])
    assert_matches(acc.result(), whole, rel=1e-12)
    acc.reset()
    acc.update(parts[0])
    assert_matches(acc.result(), parts[0].double().numpy(), rel=1e-12)  # reset drops pending counts
