"""Tokenizers rebuilt from a GGUF file's embedded vocabulary (llama.cpp's ``tokenizer.ggml.*`` keys).

``gpt2``: byte-level BPE from tokens + merges, split first by the regexes llama.cpp uses for the
file's ``tokenizer.ggml.pre`` type. ``llama``: SentencePiece-style BPE whose merges follow the token
scores (llama.cpp's SPM tokenizer), with ``<0xNN>`` byte fallback and a space prefix per text run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from modelkin.errors import TokenizerError
from modelkin.tokenizer.base import TokenizerParts
from modelkin.tokenizer.fast import FastBackend
from modelkin.tokenizer.sp import SpecialSplitter

# llama.cpp token types (gguf TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Regexes applied one after the other, each splitting every piece the previous one produced.
# Names and regex sets follow llama.cpp's llm_tokenizer_bpe; `ignore_merges` for the llama3 family.
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"), (_GPT2,)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), (r"\p{N}", _GPT2)
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3", "pixtral"), (_LLAMA3,)
    ),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan"), (_QWEN2,)),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
}
_IGNORE_MERGES = frozenset({"llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3", "pixtral"})


def gguf_tokenizer_parts(meta: Mapping[str, Any], where: str) -> TokenizerParts | None:
    """The tokenizer a GGUF file describes, or None when it carries no vocabulary."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind in (None, "none") or not tokens:
        return None
    tokens = [str(t) for t in tokens]
    names = {
        "bos": "bos_token_id",
        "eos": "eos_token_id",
        "unk": "unknown_token_id",
        "pad": "padding_token_id",
    }
    ids = {name: _token_id(meta, key, len(tokens), where) for name, key in names.items()}
    ids = {k: v for k, v in ids.items() if v is not None}
    backend = _backend(meta, str(kind), tokens, ids, where)
    backend.special_ids |= set(ids.values())
    extra = {_token_id(meta, k, len(tokens), where) for k in ("eot_token_id", "eom_token_id")} - {None}
    return TokenizerParts(
        backend=backend,
        source=f"{where} (GGUF vocabulary)",
        ids=ids,
        extra_eos_ids=extra,
        tokens={k: tokens[v] for k, v in ids.items()},
        chat_templates=_chat_templates(meta),
        chat_template_source=f"{where} (tokenizer.chat_template)",
    )


def _backend(
    meta: Mapping[str, Any], kind: str, tokens: list[str], ids: dict[str, int], where: str
) -> FastBackend | SpmBackend:
    types = _int_list(meta.get("tokenizer.ggml.token_type"), len(tokens), "token_type", where, default=NORMAL)
    flags = {
        "bos_id": ids.get("bos"),
        "eos_id": ids.get("eos"),
        "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    if kind == "gpt2":
        return FastBackend(_byte_level_tokenizer(meta, tokens, types, where), **flags)
    if kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise TokenizerError(
                f"{where}: GGUF 'llama' vocabulary without one score per token",
                hint="re-convert the model with llama.cpp's convert_hf_to_gguf.py",
            )
        space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        return SpmBackend(
            tokens, [float(x) for x in scores], types, unk_id=ids.get("unk"), add_space_prefix=space, **flags
        )
    raise TokenizerError(
        f"{where}: GGUF tokenizer model {kind!r} is not supported",
        hint="modelkin reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies",
    )


def _chat_templates(meta: Mapping[str, Any]) -> dict[str, str] | None:
    templates = {}
    if meta.get("tokenizer.chat_template"):
        templates["default"] = str(meta["tokenizer.chat_template"])
    for name in meta.get("tokenizer.chat_templates") or []:
        text = meta.get(f"tokenizer.chat_template.{name}")
        if text:
            templates[str(name)] = str(text)
    return templates or None


def _token_id(meta: Mapping[str, Any], key: str, n: int, where: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n:
        if value in (-1, 0xFFFFFFFF):  # llama.cpp writes -1 for "no such token"
            return None
        raise TokenizerError(
            f"{where}: tokenizer.ggml.{key} = {value} is outside the vocabulary of {n} tokens",
            hint="the GGUF metadata is inconsistent; re-convert the model",
        )
    return value


def _int_list(values: Sequence[Any] | None, n: int, key: str, where: str, *, default: int) -> list[int]:
    if values is None:
        return [default] * n
    if len(values) != n:
        raise TokenizerError(
            f"{where}: tokenizer.ggml.{key} has {len(values)} entries for {n} tokens",
            hint="the GGUF metadata is inconsistent; re-convert the model",
        )
    return [int(v) for v in values]


def _byte_level_tokenizer(meta: Mapping[str, Any], tokens: list[str], types: list[int], where: str) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (NORMAL, BYTE, UNUSED) and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    merges = [_split_merge(str(m), vocab, where) for m in meta.get("tokenizer.ggml.merges") or []]
    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    if pre not in _PRE_SPLITS:
        warnings.warn(
            f"{where}: unknown GGUF pre-tokenizer {pre!r}; splitting text with llama.cpp's default "
            "rules, so tokens may differ from the original tokenizer",
            stacklevel=3,
        )
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
    splits = [
        pre_tokenizers.Split(Regex(r), behavior="isolated")
        for r in _PRE_SPLITS.get(pre, _PRE_SPLITS["default"])
    ]
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types)
        if k in (CONTROL, UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED
    ]
    tk.add_special_tokens(special)
    tk.add_tokens(user)
    return tk


def _split_merge(merge: str, vocab: Mapping[str, int], where: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if sep and left in vocab and right in vocab:
        return left, right
    for k, ch in enumerate(merge):  # a token that itself holds a space: find the split that names two tokens
        if ch == " " and merge[:k] in vocab and merge[k + 1 :] in vocab:
            return merge[:k], merge[k + 1 :]
    raise TokenizerError(
        f"{where}: GGUF merge {merge!r} does not join two vocabulary tokens",
        hint="the GGUF vocabulary is corrupt; re-convert the model",
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class SpmBackend:
    """llama.cpp's SPM tokenizer: pairs merge by the score of the token they form; unknown bytes fall back."""

    def __init__(
        self,
        tokens: list[str],
        scores: list[float],
        types: list[int],
        *,
        bos_id: int | None,
        eos_id: int | None,
        unk_id: int | None,
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
    ):
        from tokenizers import models

        self.tokens, self.types = tokens, types
        vocab: dict[str, int] = {}
        for i, token in enumerate(tokens):
            vocab.setdefault(token, i)
        merges = []
        for i, (token, kind) in enumerate(zip(tokens, types)):
            if kind == NORMAL:
                merges.extend(
                    (-scores[i], i, token[:k], token[k:])
                    for k in range(1, len(token))
                    if token[:k] in vocab and token[k:] in vocab
                )
        merges.sort(key=lambda m: (m[0], m[1]))
        unk = tokens[unk_id] if unk_id is not None else None
        self.model = models.BPE(
            vocab=vocab,
            merges=[(a, b) for _, _, a, b in merges],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
        whole = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, UNKNOWN, USER_DEFINED)}
        self.splitter = SpecialSplitter(whole)
        self.special_ids = {i for i, k in enumerate(types) if k in (CONTROL, UNKNOWN)}
        self.vocab, self.vocab_size = vocab, len(tokens)
        self.bos_id, self.eos_id, self.add_bos, self.add_eos = bos_id, eos_id, add_bos, add_eos
        self.add_space_prefix = add_space_prefix

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        prev_special = True  # llama.cpp prefixes a space at the start and after every special token
        for part in self.splitter.split(text):
            if isinstance(part, int):
                ids.append(part)
                prev_special = True
                continue
            escaped = part.replace(" ", "\u2581")
            if self.add_space_prefix and prev_special:
                escaped = "\u2581" + escaped
            ids.extend(t.id for t in self.model.tokenize(escaped))
            prev_special = False
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        run = bytearray()

        def flush() -> None:
            text = run.decode("utf-8", errors="replace")
            out.append(text[1:] if self.add_space_prefix and text.startswith(" ") else text)
            run.clear()

        for i in ids:
            kind, token = self.types[i], self.tokens[i]
            if kind in (CONTROL, UNKNOWN, USER_DEFINED):
                flush()
                if not (skip_special_tokens and i in self.special_ids):
                    out.append(token)
                continue
            if kind == BYTE and len(token) == 6 and token.startswith("<0x"):
                run.append(int(token[3:5], 16))
            else:
                run.extend(token.replace("\u2581", " ").encode("utf-8"))
        flush()
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)
