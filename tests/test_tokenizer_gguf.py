"""GGUF vocabularies: SmolLM2's byte-level BPE against transformers, and a llama (SentencePiece) GGUF
against sentencepiece itself."""

from __future__ import annotations

import io

import pytest

from modelkin.errors import TokenizerError
from modelkin.tokenizer import Tokenizer, load_tokenizer
from modelkin.tokenizer.gguf_vocab import gguf_tokenizer_parts

STRINGS = [
    "Hello world",
    "Hello, world!",
    "hello WORLD Hello",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you're right; it's what we'd've done, isn't it?",
    "  two leading spaces",
    "trailing spaces   ",
    "   ",
    " ",
    "",
    "a  b   c    d",
    "tab\tseparated\tvalues",
    "line one\nline two",
    "para\n\npara\n\n\n",
    "\r\nwindows line\r\n",
    " \n \n",
    "naïve café résumé façade",
    "Zürich, São Paulo, Kraków",
    "ÅÄÖ åäö ß ẞ",
    "Ελληνικά κείμενα",
    "Привет, мир!",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "こんにちは世界",
    "你好，世界！",
    "机器学习模型需要大量的数据。",
    "中文English混合text",
    "한국어 텍스트",
    "😀",
    "👍🏽 thumbs",
    "👨‍👩‍👧‍👦 family",
    "emoji😀in😀words",
    "🇫🇷🇯🇵 flags",
    "1",
    "12",
    "123456789",
    "3.14159 and 2.71828",
    "1,000,000 dollars",
    "in 2024, 50% of 1024",
    "0x1F 0b1010 1e-5",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "SELECT * FROM t WHERE id = 42;",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    '<div class="x">&amp;</div>',
    "path/to/file.py:12:5",
    "snake_case camelCase PascalCase kebab-case",
    "!!!???...,,,;;;",
    "--- *** ___ ===",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "<|im_start|>assistant\n",
    "text<|endoftext|>more",
    "<|im_end|><|im_end|>",
    "<repo_name>x<file_sep>y",
    "<|im_start|  not special",
    "\u00a0nbsp\u2009thin",
    "zero\u200bwidth",
    "combining e\u0301 vs é",
    "ﬁ ligature ＡＢＣ fullwidth",
    "\x00\x01 control",
    "~`^|\\",
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    from modelkin.checkpoint import open_checkpoint

    with open_checkpoint(smollm2_gguf) as source:
        return load_tokenizer(source, smollm2_gguf)


def test_smollm2_matches_transformers_on_varied_strings(smol, smollm2_hf_tokenizer):
    assert len(STRINGS) >= 50
    for text in STRINGS:
        expected = smollm2_hf_tokenizer(text)["input_ids"]
        assert smol.encode(text) == expected, text
        assert smollm2_hf_tokenizer.encode(text) == expected
        assert smol.encode(text, add_special_tokens=False) == expected  # SmolLM2 adds no BOS
        assert smol.decode(expected) == text, text
        assert smol.decode(expected) == smollm2_hf_tokenizer.decode(expected)


def test_smollm2_special_tokens(smol, smollm2_hf_tokenizer):
    assert smol.vocab_size == 49152 == len(smollm2_hf_tokenizer)
    assert smol.bos_token_id == 1 and smol.pad_token_id == 2
    assert 2 in smol.eos_token_ids
    assert smol.special_ids >= set(range(17))
    assert smol.encode("<|im_start|>") == [1]
    assert smol.id_to_token(1) == "<|im_start|>"
    assert smol.id_to_token(504) == smollm2_hf_tokenizer.convert_ids_to_tokens(504)
    pieces = smol.pieces()
    assert len(pieces) == 49152 and pieces[1] == "<|im_start|>"
    assert pieces == smollm2_hf_tokenizer.convert_ids_to_tokens(list(range(49152)))
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert smol.decode(ids, skip_special_tokens=True) == smollm2_hf_tokenizer.decode(
        ids, skip_special_tokens=True
    )
    assert smol.decode(ids, skip_special_tokens=True) == "user\nHi"


CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Bonjour, ça va ?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 数学."},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(smol, smollm2_hf_tokenizer, add_generation_prompt):
    assert smol.has_chat_template
    for messages in CONVERSATIONS:
        ours = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = smollm2_hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours == theirs
        assert smol.encode(ours) == smollm2_hf_tokenizer(theirs)["input_ids"]
        assert smol.encode_chat(messages, add_generation_prompt=add_generation_prompt) == (
            smollm2_hf_tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, return_dict=False
            )
        )
    rendered = smol.apply_chat_template(CONVERSATIONS[0])
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")


def _sp_gguf_meta():
    """Metadata of a llama-type GGUF vocabulary converted from a freshly trained sentencepiece BPE model."""
    import sentencepiece as spm

    from modelkin.tokenizer.tiny import CORPUS

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        vocab_size=600,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["<think>"],
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()

    def kind(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if sp.id_to_piece(i) == "<think>" else 1

    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
    }
    return sp, meta


def test_llama_gguf_vocab_matches_sentencepiece():
    sp, meta = _sp_gguf_meta()
    tok = Tokenizer(gguf_tokenizer_parts(meta, "tiny.gguf"))
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2}
    for text in STRINGS:
        if any(s in text for s in ("<|", "<repo")):
            continue
        assert tok.encode(text) == [1, *sp.encode(text)], text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text)), text
    # a user-defined token stays whole; text after it gets its own space prefix, as in llama.cpp
    assert tok.encode("a<think>b", add_special_tokens=False) == [
        *sp.encode("a"),
        sp.piece_to_id("<think>"),
        *sp.encode("b"),
    ]
    assert tok.decode(tok.encode("a<think>b")) == "<s>a<think>b"


def test_gguf_vocab_errors():
    _, meta = _sp_gguf_meta()
    with pytest.raises(TokenizerError, match="token_type has 3 entries"):
        gguf_tokenizer_parts({**meta, "tokenizer.ggml.token_type": [1, 1, 1]}, "bad.gguf")
    with pytest.raises(TokenizerError, match="bad.gguf: tokenizer.ggml.eos_token_id = 99999 is outside"):
        gguf_tokenizer_parts({**meta, "tokenizer.ggml.eos_token_id": 99999}, "bad.gguf")
    with pytest.raises(TokenizerError, match="'rwkv' is not supported"):
        gguf_tokenizer_parts({**meta, "tokenizer.ggml.model": "rwkv"}, "bad.gguf")
    bpe = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b"],
        "tokenizer.ggml.merges": ["a c"],
    }
    with pytest.raises(TokenizerError, match="merge 'a c' does not join two vocabulary tokens"):
        gguf_tokenizer_parts(bpe, "bad.gguf")
    assert gguf_tokenizer_parts({"general.architecture": "llama"}, "novocab.gguf") is None
