"""inspect.roles: every tensor of every supported layout gets a (layer, role, expert)."""

from __future__ import annotations

import pytest

from modelkin.errors import InputError
from modelkin.inspect.roles import (
    ATTENTION_ROLES,
    UNKNOWN,
    NameRole,
    classify,
    onnx_aliases,
    selector,
    unknown_names,
)
from tests.inspect_layouts import ARCHS, layout_names


@pytest.mark.parametrize("arch", ARCHS)
def test_documented_layouts_have_no_unknown_names(arch):
    names = layout_names(arch, layers=3, experts=4)
    assert unknown_names(names) == []
    roles = [classify(n) for n in names]
    assert {r.layer for r in roles} == {None, 0, 1, 2}
    assert sum(r.role == "q" for r in roles) == 3


@pytest.mark.parametrize("name, expected", [
    ("model.layers.3.block_sparse_moe.experts.5.w1.weight", NameRole(3, "expert_gate", 5)),
    ("model.layers.3.block_sparse_moe.experts.5.w3.weight", NameRole(3, "expert_up", 5)),
    ("model.layers.3.block_sparse_moe.experts.5.w2.weight", NameRole(3, "expert_down", 5)),
    ("model.layers.3.block_sparse_moe.gate.weight", NameRole(3, "router")),
    ("model.layers.1.mlp.experts.12.down_proj.weight", NameRole(1, "expert_down", 12)),
    ("model.layers.1.mlp.gate.weight", NameRole(1, "router")),
    ("model.layers.1.mlp.shared_expert_gate.weight", NameRole(1, "shared_router")),
    ("model.layers.1.mlp.shared_expert.up_proj.weight", NameRole(1, "shared_up")),
    ("model.layers.0.mlp.router_scale", NameRole(0, "router_scale")),
    ("model.layers.0.self_attn.o_proj.bias", NameRole(0, "o_bias")),
    ("model.layers.0.self_attn.k_proj.bias", NameRole(0, "k_bias")),
    ("model.layers.2.self_attn.q_norm.weight", NameRole(2, "q_norm")),
    ("model.layers.2.self_attn.k_norm.weight", NameRole(2, "k_norm")),
    ("model.layers.2.self_attn.rotary_emb.inv_freq", NameRole(2, "rotary_inv_freq")),
    ("model.layers.2.input_layernorm.weight", NameRole(2, "attn_norm")),
    ("model.layers.2.post_attention_layernorm.weight", NameRole(2, "mlp_norm")),
    ("model.layers.4.mlp.experts.gate_up_proj", NameRole(4, "expert_gate_up")),
    ("model.embed_tokens.weight", NameRole(None, "embed")),
    ("model.norm.weight", NameRole(None, "final_norm")),
    ("lm_head.weight", NameRole(None, "lm_head")),
    # raw GGUF names (a reader may pass unknown ones through)
    ("blk.7.attn_output.weight", NameRole(7, "o")),
    ("blk.7.ffn_down_exps.weight", NameRole(7, "expert_down")),
    ("blk.7.ffn_gate_inp.weight", NameRole(7, "router")),
    ("token_embd.weight", NameRole(None, "embed")),
    ("output_norm.weight", NameRole(None, "final_norm")),
    # ONNX initialisers as torch's exporter names them
    ("/model/layers.0/self_attn/q_proj/weight", NameRole(0, "q")),
    ("onnx::MatMul_123", NameRole(None, UNKNOWN)),
    ("model.layers.0.mlp.experts.3.foo.weight", NameRole(0, UNKNOWN, 3)),
])
def test_classify(name, expected):
    assert classify(name) == expected


def test_smollm2_gguf_names_all_have_roles(smollm2_gguf):
    from modelkin.checkpoint import open_checkpoint

    with open_checkpoint(smollm2_gguf) as src:
        names = src.keys()
    assert len(names) == 272 and unknown_names(names) == []
    assert {classify(n).layer for n in names} == {None, *range(30)}


def _tiny_archs() -> list[str]:
    try:
        from modelkin.synth.tiny import TINY
    except ImportError:
        return []
    return sorted(TINY)


@pytest.mark.parametrize("arch", _tiny_archs() or ["(none registered)"])
def test_make_tiny_checkpoints_have_no_unknown_names(tmp_path, arch):
    tiny = pytest.importorskip("modelkin.synth.tiny")
    from modelkin.checkpoint import open_checkpoint
    from modelkin.errors import ModelkinError

    if arch not in tiny.TINY:
        pytest.skip("no make-tiny architectures registered yet")
    try:
        out = tiny.make_tiny(arch, tmp_path / arch, tokenizer=False)
    except ModelkinError as err:  # the writer's own bug, tested by its own suite
        pytest.skip(f"make-tiny {arch} does not write a checkpoint yet: {err}")
    with open_checkpoint(out) as src:
        assert unknown_names(src.keys()) == []


def _onnx_graph(tmp_path, dynamo: bool):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "val_2" if dynamo else "onnx::MatMul_31")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("MatMul", ["x", w.name], ["y"],
                            name="node_MatMul_1" if dynamo else "/model/layers.3/self_attn/v_proj/MatMul")
    if dynamo:
        entry = node.metadata_props.add()
        entry.key = "pkg.torch.onnx.name_scopes"
        entry.value = "['', 'model', 'model.layers.3', 'model.layers.3.self_attn', " \
                      "'model.layers.3.self_attn.v_proj', 'linear']"
    path = tmp_path / f"m{int(dynamo)}.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=[w])), path)
    return path, w.name


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_anonymous_initialisers_get_roles_from_the_graph(tmp_path, dynamo):
    path, name = _onnx_graph(tmp_path, dynamo)
    alias = onnx_aliases(str(path))
    assert alias == {name: "model.layers.3.self_attn.v_proj.weight"}
    assert classify(alias[name]) == NameRole(3, "v")


def test_selectors():
    names = layout_names("pangu_moe", layers=1, experts=2)
    pick = lambda sel: [n for n in names if selector(sel)(n, classify(n))]
    attention = pick("attention")
    assert len(attention) == 8 and all(classify(n).role in ATTENTION_ROLES for n in attention)
    assert all("experts." in n for n in pick("experts")) and len(pick("experts")) == 6
    mlp = pick("mlp")
    assert "model.layers.0.mlp.router_scale" in mlp and "model.layers.0.mlp.gate.weight" in mlp
    assert not any("experts." in n for n in mlp)
    assert len(pick("attention,experts")) == 14
    assert pick("all") == names
    assert pick(r"norm") == [n for n in names if "norm" in n]
    with pytest.raises(InputError, match="neither a group nor a valid regular expression"):
        selector("layers.(")
