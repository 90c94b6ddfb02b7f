"""Weight fingerprints on small synthetic checkpoints: exact values against hand-written numpy, nulls, errors."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from modelkin.checkpoint import open_checkpoint
from modelkin.compare import fingerprint
from modelkin.compare import stats as sig
from modelkin.compare.fingerprints import heads, spectral, std_curve
from modelkin.compare.fingerprints.invariants import layer_terms
from modelkin.compare.fingerprints.result import MethodResult, call_for
from modelkin.compare.fingerprints.weights import ModelWeights
from modelkin.errors import InputError
from tests.ckpt_factory import tiny_llama_state, write_safetensors_checkpoint

CPU = torch.device("cpu")


def _std_state(stds: dict[str, list[float]], *, hidden: int = 8, seed: int = 0) -> tuple[dict, dict]:
    """A Llama-layout state whose q/k/v/o of layer i are stds[role][i] times a fixed pattern."""
    layers = len(stds["q"])
    sd, cfg = tiny_llama_state(layers=layers, hidden=hidden, heads=2, kv_heads=1, inter=12, vocab=16, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    for i in range(layers):
        for role in "qkvo":
            name = f"model.layers.{i}.self_attn.{role}_proj.weight"
            pattern = torch.randn(sd[name].shape, generator=g, dtype=torch.float64)
            pattern = (pattern - pattern.mean()) / pattern.std()
            sd[name] = (pattern * stds[role][i]).float()
    return sd, cfg


def _hand_std_curve(path_a, path_b) -> dict[str, float]:
    """HonestAGI's std curve written out in numpy: std, z-score, np.interp, Pearson r, mean, LeaFBench."""
    from safetensors.numpy import load_file

    ta, tb = load_file(str(path_a / "model.safetensors")), load_file(str(path_b / "model.safetensors"))

    def curve(t, role):
        n = len({k.split(".")[2] for k in t if k.startswith("model.layers.")})
        return np.array([np.std(t[f"model.layers.{i}.self_attn.{role}_proj.weight"].astype(np.float64), ddof=1)
                         for i in range(n)])

    out = {}
    for role in "qkvo":
        ca, cb = curve(ta, role), curve(tb, role)
        za, zb = (ca - ca.mean()) / ca.std(), (cb - cb.mean()) / cb.std()
        n = max(len(za), len(zb))
        za = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(za)), za)
        zb = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(zb)), zb)
        da, db = za - za.mean(), zb - zb.mean()
        out[role] = float((da * db).sum() / math.sqrt((da * da).sum() * (db * db).sum()))
    out["mean_r"] = float(np.mean([out[r] for r in "qkvo"]))
    out["leafbench"] = (out["mean_r"] + 1) / 2
    return out


@pytest.fixture(scope="module")
def std_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdcurve")
    a = {"q": [0.30, 0.25, 0.22, 0.21, 0.18], "k": [0.40, 0.30, 0.26, 0.25, 0.20],
         "v": [0.05, 0.12, 0.15, 0.16, 0.19], "o": [0.06, 0.14, 0.13, 0.15, 0.20]}
    b = {"q": [0.9, 0.7, 0.8, 0.6, 0.5, 0.55, 0.4], "k": [0.1, 0.3, 0.2, 0.25, 0.3, 0.2, 0.35],
         "v": [0.2, 0.2, 0.3, 0.35, 0.3, 0.5, 0.45], "o": [0.3, 0.1, 0.2, 0.4, 0.3, 0.2, 0.6]}
    pa = write_safetensors_checkpoint(root / "a", *_std_state(a, seed=1))
    pb = write_safetensors_checkpoint(root / "b", *_std_state(b, seed=2))
    return pa, pb


def test_std_curve_matches_hand_computation(std_pair):
    pa, pb = std_pair
    expected = _hand_std_curve(pa, pb)
    result = fingerprint(pa, pb, methods="std_curve", device="cpu")["std_curve"]
    for role in "qkvo":
        assert result.details["r"][role] == pytest.approx(expected[role], abs=1e-12)
    assert result.details["mean_r"] == pytest.approx(expected["mean_r"], abs=1e-12)
    assert result.score == result.details["mean_r"]
    assert result.details["leafbench_score"] == pytest.approx(expected["leafbench"], abs=1e-12)
    assert (result.details["layers_a"], result.details["layers_b"]) == (5, 7)
    # the curves in the report are the raw per-layer stds (torch.std, unbiased)
    assert result.details["curves"]["a"]["curves"]["q"] == pytest.approx([0.30, 0.25, 0.22, 0.21, 0.18], rel=1e-6)


def test_std_curve_self_is_exactly_one(std_pair):
    pa, _ = std_pair
    result = fingerprint(pa, pa, methods="std_curve", device="cpu")["std_curve"]
    assert result.details["r"] == {"q": 1.0, "k": 1.0, "v": 1.0, "o": 1.0}
    assert result.details["mean_r"] == 1.0 and result.details["leafbench_score"] == 1.0
    assert result.null.startswith("H0:") and result.p_value is not None


def test_std_curve_nan_becomes_zero_and_constant_curves():
    flat = std_curve.StdCurves("flat", [0, 1, 2, 3], {r: [0.1] * 4 for r in "qkvo"})
    slope = std_curve.StdCurves("slope", [0, 1, 2, 3], {r: [0.1, 0.2, 0.3, 0.4] for r in "qkvo"})
    assert std_curve.correlate(flat, slope) == {r: 0.0 for r in "qkvo"}
    assert np.all(std_curve.normalise([0.1] * 4) == 0)


def test_null_library_roundtrip_and_zscore(std_pair, tmp_path):
    pa, pb = std_pair
    lib = [std_curve.StdCurves(f"m{i}", list(range(6)), {r: list(np.random.default_rng(i).random(6)) for r in "qkvo"})
           for i in range(12)]
    std_curve.save_curves(lib[:6], tmp_path / "one.json")
    std_curve.save_curves(lib[6:], tmp_path / "two.json")
    loaded = std_curve.load_library(tmp_path)
    assert [m.label for m in loaded] == [f"m{i}" for i in range(12)]
    plain = fingerprint(pa, pb, methods="std_curve", device="cpu")["std_curve"]
    a, b = (std_curve.StdCurves.from_json(plain.details["curves"][s]) for s in "ab")
    std_curve.save_curves([a], tmp_path / "three.json")  # A itself is in the library: left out of the null
    result = fingerprint(pa, pb, methods="std_curve", device="cpu", null_library=tmp_path)["std_curve"]
    library = result.details["library"]
    assert library["n"] == 24  # 12 models against A and against B; the copy of A is not an unrelated model
    null = [np.mean(list(std_curve.correlate(x, m).values())) for m in loaded for x in (a, b)]
    observed = result.details["mean_r"]
    assert library["null_mean"] == pytest.approx(np.mean(null))
    assert library["z"] == pytest.approx((observed - np.mean(null)) / np.std(null, ddof=1))
    assert library["p_value"] == pytest.approx((1 + sum(v >= observed for v in null)) / (1 + len(null)))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a std-curve library"):
        std_curve.load_library(tmp_path / "bad.json")


def test_significance_helpers():
    assert sig.permutation_p(3.0, [1, 2, 3, 4]) == pytest.approx(3 / 5)
    assert sig.permutation_p(0.0, [1, 2, 3], greater=False) == pytest.approx(1 / 4)
    # Holm: sorted p 0.01, 0.02, 0.04 with m = 3 -> 0.03, 0.04, 0.04 (monotone), input order kept
    assert sig.holm_bonferroni([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    chi2 = -2 * np.log([0.01, 0.2]).sum()
    from scipy.stats import chi2 as chi2_dist

    assert sig.fisher_combine([0.01, 0.2]) == pytest.approx(chi2_dist.sf(chi2, 4))
    assert sig.zscore(2.0, [0.0, 1.0, 2.0]) == pytest.approx(1.0)
    assert [call_for(p) for p in (0.001, 0.02, 0.5, None)] == ["related", "inconclusive", "unrelated",
                                                               "inconclusive"]


def test_surrogates_keep_spectrum_and_values():
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.standard_normal((3, 30)), axis=1)
    plain = sig.phase_surrogates(x, 4, np.random.default_rng(1), mirror=False)
    assert plain.shape == (4, 3, 30)
    assert np.allclose(np.abs(np.fft.rfft(plain, axis=-1)), np.abs(np.fft.rfft(x, axis=-1))[None])
    # the same phases for every curve: cross-spectra (hence cross-correlations) are kept too
    cross = np.fft.rfft(plain[:, 0]) * np.conj(np.fft.rfft(plain[:, 1]))
    assert np.allclose(cross, (np.fft.rfft(x[0]) * np.conj(np.fft.rfft(x[1])))[None])
    assert sig.phase_surrogates(x, 2, np.random.default_rng(1)).shape == (2, 3, 30)
    aaft = sig.aaft_surrogates(x, 5, np.random.default_rng(2))
    assert np.allclose(np.sort(aaft, axis=-1), np.sort(x, axis=-1)[None])  # same values, new order
    assert not np.allclose(aaft[0], x)


def test_align_cost_matches_brute_force():
    rng = np.random.default_rng(3)
    d, gap = rng.random((3, 5)), 0.15
    best = math.inf
    for cols in itertools.combinations(range(5), 3):
        gaps = sum(1 for x, y in zip((-1,) + cols, cols + (5,)) if y - x > 1)
        best = min(best, sum(d[i, j] for i, j in enumerate(cols)) + gap * gaps)
    assert spectral.align_cost(d, gap) == pytest.approx(best / 3)
    path = spectral.align_path(d, gap)
    cols = tuple(j for _, j in path)
    gaps = sum(1 for x, y in zip((-1,) + cols, cols + (5,)) if y - x > 1)
    assert sum(d[i, j] for i, j in path) + gap * gaps == pytest.approx(best)
    square = rng.random((4, 4))
    assert spectral.align_path(square, gap) == [(i, i) for i in range(4)]


def test_product_singular_values_gqa_and_invariance():
    g = torch.Generator().manual_seed(0)
    heads_n, kv, hd, d = 4, 2, 3, 10
    wq, wk = torch.randn(heads_n * hd, d, generator=g), torch.randn(kv * hd, d, generator=g)
    explicit = sum(wq[h * hd:(h + 1) * hd].T.double() @ wk[(h // 2) * hd:(h // 2 + 1) * hd].double()
                   for h in range(heads_n))
    ours = heads.product_singular_values(heads.group_sum_q(wq, heads_n, kv), wk)
    ref = torch.linalg.svdvals(explicit)[: ours.numel()]
    assert torch.allclose(ours.double(), ref, rtol=1e-6, atol=1e-9)
    # swap the two kv groups (with their query heads), swap query heads inside a group, rescale q/k per group
    q4 = wq.reshape(kv, 2, hd, d)[[1, 0]][:, [1, 0]] * torch.tensor([2.0, 0.5])[:, None, None, None]
    k2 = wk.reshape(kv, hd, d)[[1, 0]] / torch.tensor([2.0, 0.5])[:, None, None]
    moved = heads.product_singular_values(heads.group_sum_q(q4.reshape(-1, d), heads_n, kv), k2.reshape(-1, d))
    assert torch.allclose(moved, ours, rtol=1e-5)


def test_invariant_terms_survive_unit_permutation(tmp_path):
    sd, cfg = tiny_llama_state(layers=2, hidden=16, heads=4, kv_heads=2, inter=24, vocab=40, seed=5)
    perm, c = torch.randperm(24), torch.linspace(0.5, 2.0, 24)
    moved = dict(sd)
    p = "model.layers.1.mlp."
    moved[p + "gate_proj.weight"] = sd[p + "gate_proj.weight"][perm]
    moved[p + "up_proj.weight"] = sd[p + "up_proj.weight"][perm] * c[:, None]
    moved[p + "down_proj.weight"] = sd[p + "down_proj.weight"][:, perm] / c[None, :]
    q = "model.layers.1.self_attn."
    moved[q + "q_proj.weight"] = sd[q + "q_proj.weight"].reshape(2, 2, 4, 16)[[1, 0]].reshape(16, 16) * 3.0
    moved[q + "k_proj.weight"] = sd[q + "k_proj.weight"].reshape(2, 4, 16)[[1, 0]].reshape(8, 16) / 3.0
    moved[q + "v_proj.weight"] = sd[q + "v_proj.weight"].reshape(2, 4, 16)[[1, 0]].reshape(8, 16)
    moved[q + "o_proj.weight"] = sd[q + "o_proj.weight"].reshape(16, 2, 2, 4)[:, [1, 0]].reshape(16, 16)
    pa = write_safetensors_checkpoint(tmp_path / "a", sd, cfg)
    pb = write_safetensors_checkpoint(tmp_path / "b", moved, cfg)
    with open_checkpoint(pa) as sa, open_checkpoint(pb) as sb:
        wa, wb = ModelWeights(sa, CPU), ModelWeights(sb, CPU)
        x = wa.get(None, "embed")
        for ta, tb in zip(layer_terms(wa, 1, x), layer_terms(wb, 1, x)):
            assert torch.allclose(ta, tb, atol=1e-4)


def test_methods_report_skips_and_unknown_names(std_pair, tmp_path):
    pa, pb = std_pair
    report = fingerprint(pa, pb, methods=["permtest", "upcycle"], device="cpu")
    assert report["permtest"].call == "skipped" and "different depths" in report["permtest"].skipped
    assert report["upcycle"].call == "skipped" and "one MoE" in report["upcycle"].skipped
    assert report.verdict == "inconclusive"
    data = report.to_json()
    assert data["methods"]["permtest"]["skipped"] and data["methods"]["permtest"]["p_value"] is None
    with pytest.raises(InputError, match="unknown fingerprint method"):
        fingerprint(pa, pb, methods="std_curve,honesty", device="cpu")


def test_report_holm_and_verdict():
    from modelkin.compare.fingerprints.result import FingerprintReport

    methods = {n: MethodResult(name=n, score=0.0, p_value=p, null_kind="exact").decide()
               for n, p in (("x", 0.004), ("y", 0.3), ("z", 0.02))}
    report = FingerprintReport(a="A", b="B", device="cpu", seed=0, methods=methods).finish()
    assert report.p_holm == pytest.approx({"x": 0.012, "y": 0.3, "z": 0.04})
    assert report.verdict == "inconclusive"  # 0.004 does not survive Holm at 0.01; not every p >= 0.05
    methods["x"].p_value = 0.001
    assert report.finish().verdict == "related"
    methods["x"].null_kind = "descriptive"  # a synthetic null never decides, and leaves Holm's family
    assert report.finish().verdict == "inconclusive" and set(report.p_holm) == {"y", "z"}


def test_cli_fingerprint_json_plot_curves_and_library(std_pair, tmp_path, capsys):
    from modelkin.cli import main

    pa, pb = std_pair
    curves, plot = tmp_path / "curves.json", tmp_path / "std.png"
    code = main(["fingerprint", str(pa), str(pb), "--methods", "std_curve,pcs,permtest", "--device", "cpu",
                 "--json", "-", "--save-curves", str(curves), "--plot", str(plot)])
    assert code == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    std = data["methods"]["std_curve"]
    for key in ("score", "p_value", "null", "r", "mean_r", "leafbench_score", "layers_a", "layers_b", "curves"):
        assert key in std
    assert set(std["r"]) == {"q", "k", "v", "o"} and std["call"] == "descriptive"
    assert std["null_kind"] == "descriptive" and data["methods"]["pcs"]["null_kind"] == "exact"
    assert data["methods"]["permtest"]["call"] == "skipped" and "different depths" in data["methods"]["permtest"]["skipped"]
    assert "verdict" in captured.err and "std_curve" in captured.err  # the table goes to stderr with --json -
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [m.label for m in std_curve.load_library(curves)] == ["a", "b"]
    assert main(["fingerprint", str(pa), str(pb), "--methods", "std_curve", "--device", "cpu",
                 "--null-library", str(curves), "--json", str(tmp_path / "r.json")]) == 0
    lib = json.loads((tmp_path / "r.json").read_text())["methods"]["std_curve"]["library"]
    assert lib["n"] == 0  # the library holds exactly A and B: both are left out of the null
    capsys.readouterr()
    assert main(["fingerprint", str(pa), str(pb), "--methods", "spectral,honesty"]) == 2
    assert "unknown fingerprint method(s): honesty" in capsys.readouterr().err
    assert main(["fingerprint", str(pa), str(pb), "--methods", "pcs", "--plot", str(plot)]) == 2
    assert "need the std_curve method" in capsys.readouterr().err
