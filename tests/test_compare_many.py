"""One suspect against several candidates: `compare_many` and `modelkin compare A B C` / `--against DIR`."""

from __future__ import annotations

import json

import pytest

from modelkin.compare.api import compare
from modelkin.compare.many import compare_many, models_in
from modelkin.compare.settings import BehaviourSettings
from modelkin.errors import CheckpointError, InputError
from modelkin.synth.tiny import make_tiny

TINY = BehaviourSettings(max_prompts=3, greedy_tokens=4, mmd_prompts=2, mmd_samples=3, mmd_tokens=4,
                         permutations=200)
METHODS = ("std_curve", "pcs", "permtest")
OPTIONS = {"permtest": {"n_permutations": 49}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    return {"a": make_tiny("llama", root / "a", seed=0),
            "against": root / "against",
            "b": make_tiny("llama", root / "against" / "b", seed=1),
            "c": make_tiny("llama", root / "against" / "c", seed=2)}


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("timings", "seconds", "io")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_suspect_read_once_and_reports_equal_single_compares(tiny, tmp_path):
    seen = []
    found = compare_many(tiny["a"], [tiny["b"], tiny["c"]], device="cpu", settings=TINY, methods=METHODS,
                         fingerprint_options=OPTIONS, out_dir=tmp_path / "out",
                         on_report=lambda name, report, s: seen.append(name))
    assert seen == ["b", "c"] and not found.failures
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["a-vs-b.html", "a-vs-b.json", "a-vs-c.html", "a-vs-c.json", "index.html", "index.json"]
    suspect = found.counters["suspect"]
    assert (suspect["loads"], suspect["checkpoint_opens"]) == (1, 2)  # one load for behaviour, one open for weights
    assert (suspect["outputs_computed"], suspect["outputs_reused"]) == (1, 1)
    assert suspect["tensors_read"] > 0 and suspect["bytes_read"] > 0
    for name in ("b", "c"):
        c = found.counters["candidates"][name]
        assert (c["loads"], c["checkpoint_opens"], c["outputs_computed"]) == (1, 2, 1)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [r["name"] for r in index["comparisons"]] == ["b", "c"]
    assert index["counters"]["suspect"]["loads"] == 1
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<a href='a-vs-b.html'>" in page and "What each model cost" in page
    for name in ("b", "c"):
        single = compare(tiny["a"], tiny[name], device="cpu", settings=TINY, methods=METHODS,
                         fingerprint_options=OPTIONS)
        written = json.loads((tmp_path / "out" / f"a-vs-{name}.json").read_text())
        assert _without_timings(written) == _without_timings(json.loads(json.dumps(single.to_json())))


def test_cli_against_dir_and_bad_input(tiny, tmp_path, cli):
    r = cli("compare", tiny["a"], "--against", tiny["against"], "--out", tmp_path / "out", "--device", "cpu",
            "--methods", "std_curve", "--no-behaviour", "--quiet", "--json", tmp_path / "index.json")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "index.json").read_text())
    assert [row["name"] for row in data["comparisons"]] == ["b", "c"]
    assert data["counters"]["suspect"]["checkpoint_opens"] == 1 and data["counters"]["suspect"]["loads"] == 0
    assert (tmp_path / "out" / "a-vs-c.html").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (["compare", tiny["a"], tiny["b"], empty], ["compare", tiny["a"], tiny["b"], tmp_path / "missing"],
                ["compare", tiny["a"], "--against", empty]):
        r = cli(*bad, "--out", tmp_path / "bad", "--device", "cpu", "--no-behaviour")
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2
        assert not (tmp_path / "bad").exists()


def test_bad_candidates_fail_before_any_work(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        compare_many(tiny["a"], [tiny["b"], tmp_path / "nope"], device="cpu", out_dir=tmp_path / "out")
    with pytest.raises(InputError, match="no candidate models"):
        compare_many(tiny["a"], [], device="cpu")
    with pytest.raises(InputError, match="holds no models"):
        models_in(tmp_path)
    assert models_in(tiny["against"]) == [tiny["b"], tiny["c"]]
    assert not (tmp_path / "out").exists()
