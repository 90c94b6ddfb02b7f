"""Tokenizers from HF directories (tokenizer.json, tokenizer.model) against transformers, Pangu's
format, EOS gathering, tiny tokenizers and the errors for broken files."""

from __future__ import annotations

import json
import time

import pytest

from modelkin.errors import InputError, TokenizerError
from modelkin.tokenizer import load_tokenizer, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The quick brown fox, 1234 times!",
    "naïve café 😀",
    "你好，世界！机器学习",
    "def f(x):\n\treturn x",
    "a\n\nb",
    "tabs\tand  double  spaces",
    "",
    "x",
    "[unused9]系统：你好[unused10][unused9]助手：",
    "x<s>y [unused9]z",
    "end</s>",
    "<pad><unk>",
    "Ünïcödé ß",
    "3.14 + 2.71 = 5.85",
    "[unused10][unused10]",
    "<s>already bos",
]
LEADING = ["  two leading", " Hello  world", "a [unused9] b", "</s> end", "   "]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    for kind in ("bpe", "sentencepiece", "pangu"):
        write_tiny_tokenizer(root / kind, kind, vocab_size=512)
    return root


def _slow_pangu(folder):
    """transformers' slow tokenizer machinery around sentencepiece, as Pangu's own PanguTokenizer works."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class SlowPangu(SentencePieceBackend):
        def build_inputs_with_special_tokens(self, ids, other=None):
            return [self.bos_token_id, *ids]

    return SlowPangu.from_pretrained(str(folder))


def test_tiny_bpe_matches_transformers(tiny):
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny / "bpe"))
    tok = load_tokenizer(None, tiny / "bpe")
    assert tok.vocab_size == len(ref) <= 512
    for text in TEXTS + LEADING + ["<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b"]:
        ids = ref(text)["input_ids"]
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == ref.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (None, {2}, 0)
    assert tok.special_ids == {0, 1, 2}
    assert tok.id_to_token(tok.encode(" the")[0]) == ref.convert_ids_to_tokens(tok.encode(" the"))[0]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tiny_bpe_chat_template_matches_transformers(tiny, add_generation_prompt):
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny / "bpe"))
    tok = load_tokenizer(None, tiny / "bpe")
    for messages in (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "再见"},
        ],
    ):
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ours == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def test_tokenizer_json_with_bos_post_processor_matches_transformers(tiny, tmp_path):
    """A Llama-style tokenizer.json (Metaspace, byte fallback, BOS from the post-processor)."""
    transformers.LlamaTokenizer.from_pretrained(str(tiny / "sentencepiece")).save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(None, tmp_path)
    assert tok.source.endswith("tokenizer.json")
    for text in TEXTS + LEADING:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        ids = ref(text)["input_ids"]
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.bos_token_id == 1 and tok.encode("x")[0] == 1
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}], chat_template=template)
    assert ids == ref.apply_chat_template(
        [{"role": "user", "content": "hi"}], chat_template=template, return_dict=False
    )
    assert ids.count(1) == 1


def test_sentencepiece_matches_transformers_slow_tokenizer(tiny):
    for kind in ("sentencepiece", "pangu"):
        ref = _slow_pangu(tiny / kind)
        fast = transformers.LlamaTokenizer.from_pretrained(str(tiny / kind))
        tok = load_tokenizer(None, tiny / kind)
        assert tok.source.endswith("tokenizer.model")
        for text in TEXTS + LEADING:
            ids = ref.encode(text)
            assert tok.encode(text) == ids, (kind, text)
            assert tok.encode(text, add_special_tokens=False) == ids[1:]
            if (
                text not in LEADING
            ):  # the converted fast tokenizer adds no space prefix to text starting with one
                assert fast.encode(text) == ids, (kind, text)
            assert tok.decode(ids) == "<s>" + text
            assert tok.decode(ids[1:]) == text


def test_sentencepiece_non_legacy_matches_transformers(tiny, tmp_path):
    folder = tmp_path / "nl"
    write_tiny_tokenizer(folder, "sentencepiece", vocab_size=512)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    ref = transformers.LlamaTokenizer.from_pretrained(str(folder))
    tok = load_tokenizer(None, folder)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # without legacy, text right after a special token gets no space prefix
    assert tok.encode("<s>y", add_special_tokens=False) != load_tokenizer(
        None, tiny / "sentencepiece"
    ).encode("<s>y", add_special_tokens=False)


def test_pangu_chat_format_and_special_ids(tiny, tmp_path):
    folder = tmp_path / "pangu"
    write_tiny_tokenizer(folder, "pangu", vocab_size=512)
    assert load_tokenizer(None, folder).has_chat_template is False  # no config.json: not known to be Pangu
    (folder / "config.json").write_text(
        json.dumps({"model_type": "PanguProMoE", "eos_token_id": 5, "pad_token_id": 0, "bos_token_id": 1})
    )
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2]}))
    tok = load_tokenizer(None, folder)
    assert tok.has_chat_template
    messages = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好"}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == "[unused9]系统：你是一个助手。[unused10][unused9]用户：你好[unused10][unused9]助手："
    assert tok.apply_chat_template(messages[1:], add_generation_prompt=False) == (
        "[unused9]系统：[unused10][unused9]用户：你好[unused10]"
    )
    ids = tok.encode(prompt)
    assert ids[:2] == [1, tok.token_to_id("[unused9]")] and ids == _slow_pangu(folder).encode(prompt)
    assert tok.bos_token_id == 1 and tok.pad_token_id == 0
    assert tok.eos_token_ids == {5, 2} and tok.id_to_token(5) == "[unused10]"
    assert tok.pieces() == [tok.id_to_token(i) or "" for i in range(tok.vocab_size)]
    assert {0, 1, 2, 3, 4, 5} <= tok.special_ids
    assert tok.encode_chat(messages) == ids  # BOS from the tokenizer, once
    assert tok.decode(ids, skip_special_tokens=True) == "系统：你是一个助手。用户：你好助手："
    with pytest.raises(TokenizerError, match="Pangu chat format has no role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_write_tiny_tokenizer_is_fast_and_checks_arguments(tmp_path):
    for kind in ("bpe", "sentencepiece", "pangu"):
        start = time.perf_counter()
        write_tiny_tokenizer(tmp_path / kind, kind, vocab_size=1000)
        assert time.perf_counter() - start < 2.0
        assert 300 <= load_tokenizer(None, tmp_path / kind).vocab_size <= 1000
    assert sorted(p.name for p in (tmp_path / "pangu").iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in (tmp_path / "bpe").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    write_tiny_tokenizer(tmp_path / "small", "pangu", vocab_size=300)  # no byte fallback below 450
    assert load_tokenizer(None, tmp_path / "small").vocab_size <= 300
    with pytest.raises(InputError, match="unknown tiny tokenizer kind 'wordpiece'"):
        write_tiny_tokenizer(tmp_path / "x", "wordpiece")
    with pytest.raises(InputError, match="vocab_size >= 260"):
        write_tiny_tokenizer(tmp_path / "x", "bpe", vocab_size=100)


def test_missing_and_broken_tokenizer_files(tiny, tmp_path):
    assert load_tokenizer(None, tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert load_tokenizer(None, tmp_path / "model.safetensors") is None
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a readable tokenizers file"):
        load_tokenizer(None, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: not a readable sentencepiece model") as err:
        load_tokenizer(None, tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "tokenizer.model").write_bytes((tiny / "pangu" / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: unreadable JSON"):
        load_tokenizer(None, tmp_path)


def test_bad_ids_and_inputs(tiny):
    tok = load_tokenizer(None, tiny / "bpe")
    with pytest.raises(InputError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
        tok.decode([1, 512])
    with pytest.raises(InputError, match="must be a str"):
        tok.encode(b"bytes")
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor(tok.encode("hi there"))) == "hi there"
