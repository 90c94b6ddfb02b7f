"""Writing a tokenizer as HF files: the GGUF byte-level BPE writer keeps ids, BOS/EOS, every EOS and every
chat template (for modelkin and transformers alike); the file copy takes named chat templates along."""

from __future__ import annotations

import json

import pytest

from modelkin.errors import TokenizerError
from modelkin.tokenizer import Tokenizer, copy_tokenizer_files, load_tokenizer, write_tiny_tokenizer
from modelkin.tokenizer.gguf_vocab import gguf_tokenizer_parts
from modelkin.tokenizer.tiny import CHATML_TEMPLATE
from modelkin.tokenizer.write import write_gguf_tokenizer

TEXTS = ["Hello world", "你好，世界！", "<|im_start|>user\nhi<|im_end|>", "  spaces\n\nand lines ", ""]
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def bpe_meta(tmp_path_factory):
    """GGUF metadata of a gpt2-kind vocabulary (the tiny byte-level BPE): adds BOS and EOS, has an eot id."""
    folder = tmp_path_factory.mktemp("bpe")
    write_tiny_tokenizer(folder, "bpe", vocab_size=400)
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if i < 3 else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model["merges"]],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.eot_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True,
        "tokenizer.chat_template": CHATML_TEMPLATE,
        "tokenizer.chat_templates": ["tool_use"],
        "tokenizer.chat_template.tool_use": "TOOLS {{ messages[0]['content'] }}",
    }


def test_gguf_vocab_written_as_tokenizer_json_keeps_ids_eos_and_templates(bpe_meta, tmp_path):
    written = write_gguf_tokenizer(bpe_meta, "tiny.gguf", tmp_path)
    assert written == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    ours = load_tokenizer(None, tmp_path)
    ref = Tokenizer(gguf_tokenizer_parts(bpe_meta, "tiny.gguf"))
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text)[0] == 1 and ours.encode(text)[-1] == 0  # BOS and EOS, as the flags say
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))
    assert ours.eos_token_ids == ref.eos_token_ids == {0, 2}
    assert ours.apply_chat_template(USER) == ref.apply_chat_template(USER)
    assert ours.apply_chat_template(USER, chat_template="tool_use") == "TOOLS hi"


def test_written_gguf_tokenizer_reads_the_same_in_transformers(bpe_meta, tmp_path):
    transformers = pytest.importorskip("transformers")
    write_gguf_tokenizer(bpe_meta, "tiny.gguf", tmp_path)
    ours, hf = load_tokenizer(None, tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert hf(text)["input_ids"] == ours.encode(text), text
    rendered = hf.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert rendered == ours.apply_chat_template(USER)


def test_gguf_writer_refuses_what_has_no_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="carries no tokenizer vocabulary"):
        write_gguf_tokenizer({"general.architecture": "llama"}, "novocab.gguf", tmp_path)
    spm = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "\u2581a"],
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0],
        "tokenizer.ggml.token_type": [2, 3, 3, 1],
    }
    with pytest.raises(TokenizerError, match="only byte-level BPE"):
        write_gguf_tokenizer(spm, "spm.gguf", tmp_path)
    assert not any(tmp_path.iterdir())


def test_copy_takes_every_tokenizer_file_and_named_templates(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_tiny_tokenizer(src, "sentencepiece", vocab_size=200)
    (src / "generation_config.json").write_text('{"eos_token_id": [2, 5]}')
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "rag.jinja").write_text("RAG {{ messages[0]['content'] }}")
    (src / "config.json").write_text("{}")
    out.mkdir()
    copied = copy_tokenizer_files(src, out)
    assert copied == ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json", "additional_chat_templates/rag.jinja"]
    assert not (out / "config.json").exists()
    tok = load_tokenizer(None, out)
    assert tok.eos_token_ids == {2, 5}
    assert tok.apply_chat_template(USER, chat_template="rag") == "RAG hi"
