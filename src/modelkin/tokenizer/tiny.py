"""Small real tokenizers for make-tiny checkpoints, trained in memory on a built-in multilingual corpus.

'bpe': byte-level BPE (Qwen2-style splitting) as tokenizer.json + tokenizer_config.json with a ChatML
template. 'sentencepiece' (Llama-style) and 'pangu' (Pangu-style config, [unused9]/[unused10] chat
markers): a SentencePiece BPE tokenizer.model + tokenizer_config.json + special_tokens_map.json.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from modelkin.errors import InputError
from modelkin.utils import atomic_write_bytes, atomic_write_text

_ENGLISH = """The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces.
Language models predict the next token from the tokens before it; a small vocabulary keeps tests fast.
Mixture-of-experts layers route each token to a few experts chosen by a router with a softmax.
On Monday, 3 engineers measured 1024 tokens per second at 2.5 GHz - not bad for 17 watts!
Café, naïve, résumé, façade, jalapeño, Zürich, São Paulo, Kraków: accents are text too."""
_CHINESE = """今天天气很好，我们一起去公园散步。机器学习模型需要大量的数据来训练。
盘古大模型是一个混合专家模型，每个专家组选择一个专家。你好，世界！请问你叫什么名字？
中文分词和英文不同，没有空格来分隔词语。我们在昇腾处理器上运行推理，速度很快。"""
_CODE = '''def add(a: int, b: int) -> int:
    """Return the sum of a and b."""
    return a + b

for i in range(10):
    if i % 2 == 0:
        print(f"even {i}")
    else:
        print("odd", i)

class Model(nn.Module):
    def forward(self, x):
        return self.proj(torch.relu(x)) * 0.5
{"name": "modelkin", "version": [0, 1, 0], "ok": true}'''
CORPUS = f"{_ENGLISH}\n{_CHINESE}\n{_CODE}"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SP_META = ("<unk>", "<s>", "</s>", "<pad>")
SP_USER = ("[unused9]", "[unused10]", "[unused11]", "[unused12]", "[unused16]", "[unused17]")


def write_tiny_tokenizer(outdir: str | Path, kind: str = "bpe", vocab_size: int = 512) -> None:
    """Train a small tokenizer and write its files into ``outdir`` (created if needed).

    Args:
        kind: 'bpe' (at least 260 tokens), 'sentencepiece' or 'pangu' (at least 160; byte fallback
            from 450 up).
        vocab_size: the largest id + 1 the tokenizer may produce; keep the model's vocab_size >= it.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        _write_bpe(outdir, vocab_size)
    elif kind in ("sentencepiece", "pangu"):
        _write_sentencepiece(outdir, vocab_size, pangu=kind == "pangu")
    else:
        raise InputError(
            f"unknown tiny tokenizer kind {kind!r}", hint="use 'bpe', 'sentencepiece' or 'pangu'"
        )


def _write_bpe(outdir: Path, vocab_size: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 256 + len(BPE_SPECIALS) + 1:
        raise InputError(f"a byte-level BPE tokenizer needs vocab_size >= 260, got {vocab_size}")
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
    )
    tk.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added(t) for i, t in enumerate(BPE_SPECIALS)},
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    atomic_write_text(outdir / "tokenizer.json", tk.to_str(pretty=True))
    atomic_write_text(outdir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


# Llama-like SentencePiece training: no normalisation, spaces kept, digits split, ids 0-3 for meta pieces.
_SP_OPTIONS: dict[str, Any] = {
    "model_type": "bpe",
    "character_coverage": 1.0,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    **{f"{name}_id": i for i, name in enumerate(("unk", "bos", "eos", "pad"))},
    **{f"{name}_piece": piece for name, piece in zip(("unk", "bos", "eos", "pad"), SP_META)},
    "user_defined_symbols": list(SP_USER),
    "hard_vocab_limit": False,
    "num_threads": 1,
    "minloglevel": 2,
    "max_sentencepiece_length": 16,
}


def _write_sentencepiece(outdir: Path, vocab_size: int, *, pangu: bool) -> None:
    import sentencepiece as spm

    if vocab_size < 160:
        raise InputError(f"a tiny SentencePiece tokenizer needs vocab_size >= 160, got {vocab_size}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        byte_fallback=vocab_size >= 450,  # 256 byte pieces need room beside the corpus' characters
        **_SP_OPTIONS,
    )
    eos, pad = ("[unused10]", "<unk>") if pangu else ("</s>", "<pad>")
    # the trainer numbers meta pieces first, then user-defined symbols
    specials = dict(enumerate((*SP_META, *SP_USER)))
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added(t) for i, t in specials.items()},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "legacy": True,
        "model_max_length": 4096,
        "pad_token": pad,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "PanguTokenizer" if pangu else "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    named = (("bos", "<s>"), ("eos", eos), ("pad", pad), ("unk", "<unk>"))
    special_map = {f"{k}_token": _added(v, special=None) for k, v in named}
    atomic_write_bytes(outdir / "tokenizer.model", model.getvalue())
    atomic_write_text(outdir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    atomic_write_text(
        outdir / "special_tokens_map.json", json.dumps(special_map, indent=2, ensure_ascii=False)
    )


def _added(content: str, special: bool | None = True) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    if special is not None:
        entry["special"] = special
    return entry
