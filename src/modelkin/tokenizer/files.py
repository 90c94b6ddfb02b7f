"""Tokenizers from a Hugging Face directory: tokenizer.json (tokenizers) or tokenizer.model (sentencepiece).

Reads tokenizer_config.json, special_tokens_map.json and chat_template.jinja the way transformers 5
does: chat_template.jinja beats the config's template, tokenizer.json beats tokenizer.model, and with
tokenizer.json its own post-processor decides BOS/EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelkin.errors import TokenizerError
from modelkin.tokenizer.base import TokenizerParts
from modelkin.tokenizer.fast import FastBackend
from modelkin.tokenizer.sp import SentencePieceBackend, load_processor

_NAMED = ("bos", "eos", "unk", "pad")
_LLAMA_CLASSES = frozenset({"LlamaTokenizer", "LlamaTokenizerFast"})


def hf_tokenizer_parts(folder: Path) -> TokenizerParts | None:
    """The tokenizer in ``folder``, or None when it holds neither tokenizer.json nor tokenizer.model."""
    json_file, sp_file = folder / "tokenizer.json", folder / "tokenizer.model"
    if not json_file.is_file() and not sp_file.is_file():
        return None
    config = read_json(folder / "tokenizer_config.json") or {}
    special_map = read_json(folder / "special_tokens_map.json") or {}
    tokens = {}
    for name in _NAMED:
        text = token_text(config.get(f"{name}_token", special_map.get(f"{name}_token")))
        if text:
            tokens[name] = text
    if json_file.is_file():
        backend = _fast_backend(json_file, config)
        source = str(json_file)
    else:
        backend = _sentencepiece_backend(sp_file, config, special_map, tokens)
        source = str(sp_file)
    templates, template_source = _chat_templates(folder, config)
    return TokenizerParts(
        backend=backend,
        source=source,
        tokens=tokens,
        chat_templates=templates,
        chat_template_source=template_source,
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when there is no such file; TokenizerError when it is unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(
            f"{path}: unreadable JSON ({err})", hint="restore the file from the original checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise TokenizerError(
            f"{path}: expected a JSON object, found {type(data).__name__}",
            hint="restore the file from the original checkpoint",
        )
    return data


def token_text(value: Any) -> str | None:
    """A special token as tokenizer_config spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _fast_backend(path: Path, config: dict[str, Any]) -> FastBackend:
    from tokenizers import AddedToken, Tokenizer

    try:
        tk = Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception with serde's message
        raise TokenizerError(
            f"{path}: not a readable tokenizers file ({str(err).splitlines()[0] if str(err) else err!r})",
            hint="restore tokenizer.json from the original checkpoint",
        ) from None
    known = {t.content for t in tk.get_added_tokens_decoder().values()}
    missing = [t for _, t in sorted(_added_tokens(config, path).items()) if t["content"] not in known]
    for t in missing:  # transformers adds tokens that tokenizer_config lists but tokenizer.json lacks
        token = AddedToken(
            t["content"],
            single_word=bool(t.get("single_word")),
            lstrip=bool(t.get("lstrip")),
            rstrip=bool(t.get("rstrip")),
            normalized=bool(t.get("normalized", False)),
            special=bool(t.get("special", True)),
        )
        (tk.add_special_tokens if token.special else tk.add_tokens)([token])
    # only SentencePiece-style vocabularies: some byte-level BPE tokenizers also name LlamaTokenizerFast
    if str(config.get("tokenizer_class")) in _LLAMA_CLASSES and getattr(tk.model, "byte_fallback", False):
        _llama_pipeline(tk, config)
    return FastBackend(tk, clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)))


def _llama_pipeline(tk: Any, config: dict[str, Any]) -> None:
    """Rebuild the text pipeline the way transformers 5's LlamaTokenizer does, whatever tokenizer.json says.

    transformers keeps only the vocabulary, merges and post-processor of the file; the prefix space then
    goes on the first text run only unless tokenizer_config says ``legacy: true``.
    """
    from tokenizers import decoders, pre_tokenizers

    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(
        steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else [])
    )


def _sentencepiece_backend(
    path: Path, config: dict[str, Any], special_map: dict[str, Any], tokens: dict[str, str]
) -> SentencePieceBackend:
    processor = load_processor(path)
    entries = _added_tokens(config, path)
    added = {t["content"]: i for i, t in entries.items()}
    special_ids = {i for i, t in entries.items() if t.get("special", True)}
    for text in [*tokens.values(), *_extra_special(config), *_extra_special(special_map)]:
        i = processor.piece_to_id(text)
        if text not in added and processor.id_to_piece(i) == text:
            added[text] = i  # special tokens always stay whole, as in transformers' slow tokenizers
            special_ids.add(i)
    legacy = config.get("legacy")
    return SentencePieceBackend(
        processor,
        path,
        added=added,
        special_ids=special_ids,
        bos_id=added.get(tokens.get("bos", "")),
        eos_id=added.get(tokens.get("eos", "")),
        add_bos=bool(config.get("add_bos_token", True)),
        add_eos=bool(config.get("add_eos_token", False)),
        legacy=True if legacy is None else bool(legacy),
        lstrip=[t["content"] for t in entries.values() if t.get("lstrip")],
        rstrip=[t["content"] for t in entries.values() if t.get("rstrip")],
    )


def _extra_special(config: dict[str, Any]) -> list[str]:
    out = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key) or []
        if not isinstance(value, (list, dict)):  # a damaged config: nothing usable here
            continue
        for t in value.values() if isinstance(value, dict) else value:
            text = token_text(t)
            if text:
                out.append(text)
    return out


def _added_tokens(config: dict[str, Any], path: Path) -> dict[int, dict[str, Any]]:
    entries = config.get("added_tokens_decoder") or {}
    if not isinstance(entries, dict):
        raise TokenizerError(
            f"{path.parent / 'tokenizer_config.json'}: added_tokens_decoder is a {type(entries).__name__}, "
            "not an object",
            hint="restore the file from the original checkpoint",
        )
    out = {}
    for key, value in entries.items():
        try:
            i = int(key)
            if i < 0:
                raise ValueError(key)
        except ValueError:
            raise TokenizerError(
                f"{path.parent / 'tokenizer_config.json'}: added_tokens_decoder key {key!r} is not "
                "a token id",
                hint="restore the file from the original checkpoint",
            ) from None
        text = token_text(value)
        if text:
            out[i] = value if isinstance(value, dict) else {"content": text}
    return out


def _chat_templates(folder: Path, config: dict[str, Any]) -> tuple[str | dict[str, str] | None, str]:
    templates: dict[str, str] = {}
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        templates["default"] = _read_text(jinja)
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = _read_text(file)
    if templates:
        return templates, str(jinja if jinja.is_file() else extra_dir)
    value = config.get("chat_template")
    where = str(folder / "tokenizer_config.json")
    if isinstance(value, str):
        return value, where
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {
            t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t
        }
        return named or None, where
    return None, where


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(
            f"{path}: unreadable ({err})", hint="restore the file from the original checkpoint"
        ) from None
