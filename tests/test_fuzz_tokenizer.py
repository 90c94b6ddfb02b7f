"""Fuzzing tokenizer files: tokenizer.json trees and bytes, tokenizer.model bytes, tokenizer_config.json
and special_tokens_map.json fields, chat templates (random jinja assembled from fragments)."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelkin.errors import ModelkinError
from tests.fuzz.exercise import exercise_tokenizer
from tests.fuzz.harness import fresh, fuzz_settings, run_case, scratch_dir
from tests.fuzz.strategies import byte_mutations, json_values

KINDS = ("bpe", "sentencepiece", "pangu")
TOKEN_TEXTS = ["<s>", "</s>", "<unk>", "<|im_end|>", "[unused10]", "", "no such token", "a", "\u2581"]
TEMPLATE_PARTS = [
    "{{ bos_token }}", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    "{% if add_generation_prompt %}assistant:{% endif %}", "{{ messages[0].content | trim }}",
    "{{ raise_exception('bad role') }}", "{{ messages | tojson }}", "{{ nothing.at.all }}", "{{ messages[99] }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{{ strftime_now('%Y') }}", "{% generation %}x{% endgeneration %}", "{{ 1 / 0 }}", "{{", "{% if %}",
    "{% endfor %}", "{{ dict(a=1) | tojson }}", "{{ range(3) | list }}", "{% include 'other.jinja' %}",
    "{% import 'os' as os %}", "{% extends 'base' %}", "{{ ''.__class__ }}", "{{ messages.pop() }}",
    "{{ eos_token ~ unk_token }}", "{{ tools | length }}", "{% macro f(x) %}{{ x }}{% endmacro %}{{ f(1) }}",
    "{{ 'x' * 3 }}", "{{ cycler }}", "{{ self }}", "{{ lipsum(1) }}", "plain text \u4e2d",
]
templates = st.lists(st.sampled_from(TEMPLATE_PARTS), min_size=1, max_size=4).map("".join)
CONFIG_KEYS = ["bos_token", "eos_token", "unk_token", "pad_token", "added_tokens_decoder", "legacy", "add_bos_token",
               "add_eos_token", "tokenizer_class", "chat_template", "additional_special_tokens",
               "extra_special_tokens", "add_prefix_space", "clean_up_tokenization_spaces"]
config_values = st.one_of(
    json_values, st.sampled_from(TOKEN_TEXTS), templates, st.just("LlamaTokenizerFast"),
    st.dictionaries(st.sampled_from(["0", "3", "-1", "x", "99999"]), json_values | st.sampled_from(TOKEN_TEXTS)),
    st.lists(st.fixed_dictionaries({"name": st.sampled_from(["default", "tool_use", "x"]), "template": templates}),
             max_size=2),
)


@pytest.fixture(scope="module")
def bases():
    from modelkin.tokenizer import write_tiny_tokenizer

    with scratch_dir("tokenizer") as path:
        for kind in KINDS:
            write_tiny_tokenizer(path / kind, kind)
        yield path


def _pick_path(draw, tree):
    """A random (parent, key) inside a JSON tree, or None for the root."""
    parent, key = None, None
    node = tree
    for _ in range(draw(st.integers(0, 5))):
        if isinstance(node, dict) and node:
            k = draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            k = draw(st.integers(0, len(node) - 1))
        else:
            break
        parent, key, node = node, k, node[k]
    return parent, key


def _loads(text):
    try:
        return json.loads(text)
    except ValueError:
        return {}


@st.composite
def edits(draw, case):
    """Apply 1-2 edits to the tokenizer files in ``case`` (a copy of a base)."""
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["json_tree", "json_bytes", "sp_bytes", "config", "config", "special_map",
                                     "jinja", "garbage"]))
        if kind in ("json_tree", "json_bytes") and (case / "tokenizer.json").is_file():
            text = (case / "tokenizer.json").read_bytes().decode("utf-8", "replace")
            if kind == "json_bytes":
                (case / "tokenizer.json").write_bytes(draw(byte_mutations(text.encode(), focus=4096)))
                continue
            tree = _loads(text)
            parent, key = _pick_path(draw, tree)
            if parent is None:
                tree = draw(json_values)
            elif isinstance(parent, dict) and draw(st.booleans()):
                del parent[key]
            else:
                parent[key] = draw(json_values)
            (case / "tokenizer.json").write_text(json.dumps(tree))
        elif kind == "sp_bytes" and (case / "tokenizer.model").is_file():
            raw = (case / "tokenizer.model").read_bytes()
            (case / "tokenizer.model").write_bytes(draw(byte_mutations(raw, focus=2048)))
        elif kind in ("config", "special_map"):
            name = "tokenizer_config.json" if kind == "config" else "special_tokens_map.json"
            config = _loads((case / name).read_bytes().decode("utf-8", "replace")) if (case / name).is_file() else {}
            config = config if isinstance(config, dict) else {}
            for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), min_size=1, max_size=3)):
                config[key] = draw(config_values)
            (case / name).write_text(json.dumps(config))
        elif kind == "jinja":
            (case / "chat_template.jinja").write_text(draw(templates))
        else:
            name = draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                         "tokenizer.model", "chat_template.jinja"]))
            (case / name).write_bytes(draw(st.sampled_from([b"", b"\xff\xfe\x00", b"null", b"[]", b"{", b"\x80\x02."])))


@fuzz_settings(300)
@given(data=st.data(), kind=st.sampled_from(KINDS))
def test_tokenizer_files(bases, data, kind):
    case = bases / "case"
    fresh(case)
    shutil.rmtree(case)
    shutil.copytree(bases / kind, case)
    data.draw(edits(case))
    run_case("tokenizer", lambda: exercise_tokenizer(case))


def test_base_tokenizers_work(bases):
    for kind in KINDS:
        out = run_case("tokenizer", lambda k=kind: exercise_tokenizer(bases / k))
        assert not isinstance(out, ModelkinError) and out["tokenizer"] is not None, out
        assert out["tokenizer"].decode(out["ids"], skip_special_tokens=True).strip()


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_negative_added_token_id_is_refused(bases, kind):
    """Found by a 60k-case fuzz run: added_tokens_decoder {"-1": "<s>"} made encode() emit id -1."""
    case = bases / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(bases / kind, case)
    config = json.loads((case / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"-1": {"content": "<s>", "special": True}}
    (case / "tokenizer_config.json").write_text(json.dumps(config))
    out = run_case("tokenizer", lambda: exercise_tokenizer(case))
    assert isinstance(out, ModelkinError) and "key '-1' is not a token id" in str(out), out
