"""The seed case's sparse-file machinery at a reduced layout (real tensor names, small widths, 4 layers):
each method reads only what it needs, unread tensors (holes) are never read, repeats come from the memo."""

from __future__ import annotations

import math

import pytest

from bench import seed_case
from modelkin.checkpoint.safetensors_reader import SafetensorsSource

OPTIONS = {"std_curve": {"n_surrogates": 100}, "invariants": {"n_permutations": 9},
           "spectral": {"n_permutations": 19}}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    pangu, qwen, layouts = seed_case.build(root, layers=4, small=True)
    return pangu, qwen, layouts


def _nbytes(layout, names):
    shapes = dict(layout.tensors)
    return sum(2 * math.prod(shapes[n]) for n in names)


def test_sparse_pair_reads_only_what_each_method_needs(case, monkeypatch):
    pangu, qwen, layouts = case
    rows_read = []
    original = SafetensorsSource._read_rows

    def spy(self, name, unique):
        rows_read.append((self.path.name, name, unique.tolist()))
        return original(self, name, unique)

    monkeypatch.setattr(SafetensorsSource, "_read_rows", spy)
    out = seed_case.run(pangu, qwen, options=OPTIONS, echo=lambda _: None)
    assert out["verdict"] == "related"
    assert out["methods"]["upcycle"]["p"] < 0.005 and out["methods"]["pcs"]["score"] > 0.99
    for tag, side in (("pangu", "a"), ("qwen", "b")):
        layout = layouts[tag]
        holes = set(dict(layout.tensors)) - set(layout.data)
        reads = out["reads"][tag]
        assert not holes & set(reads), f"{tag}: holes read: {sorted(holes & set(reads))[:3]}"
        assert all(count == 1 for count in reads.values())  # every tensor read once for all methods
        # the embedding only through its data rows
        lo, hi = layout.data["model.embed_tokens.weight"]
        mine = [ids for path, name, ids in rows_read if path == tag and name == "model.embed_tokens.weight"]
        assert mine and all(lo <= i < hi for ids in mine for i in ids)
        methods = out["methods"]
        n = layout.config["num_hidden_layers"]
        attention = [f"model.layers.{i}.self_attn.{r}_proj.weight" for i in range(n) for r in "qkvo"]
        assert methods["std_curve"][f"bytes_{side}"] == _nbytes(layout, attention)
        assert methods["spectral"][f"bytes_{side}"] == 0  # served by the memo
        small = [k for k, s in layout.tensors if len(s) == 1]  # norms and biases
        assert methods["pcs"][f"bytes_{side}"] <= _nbytes(layout, small)
        assert out["stats"][tag]["bytes_read"] == sum(methods[m][f"bytes_{side}"] for m in methods)
    assert out["peak_anon"] < 4e9
