"""The Tokenizer class and ``load_tokenizer(source, path)``: one surface over tokenizer.json, tokenizer.model
and GGUF vocabularies; ids match transformers' for the same files, EOS ids gather every EOS declared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from modelkin.errors import InputError, TokenizerError
from modelkin.tokenizer.base import TokenizerParts
from modelkin.tokenizer.chat import (
    GEMMA_CHAT_TEMPLATE,
    GEMMA_END_OF_TURN,
    PANGU_CHAT_TEMPLATE,
    ChatTemplate,
    is_gemma3_config,
    is_pangu_config,
)

__all__ = ["Tokenizer", "load_tokenizer"]


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one checkpoint.

    Build it with ``load_tokenizer``. Attributes: ``bos_token_id``, ``eos_token_ids`` (every id that
    ends generation), ``pad_token_id``, ``vocab_size``, ``special_ids``, ``has_chat_template``.
    """

    def __init__(
        self,
        parts: TokenizerParts,
        *,
        config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ):
        self._backend = parts.backend
        self.source = parts.source
        self.vocab_size: int = int(parts.backend.vocab_size)
        ids = {name: self._resolve(parts, name) for name in ("bos", "eos", "unk", "pad")}
        self.bos_token_id: int | None = ids["bos"]
        self.unk_token_id: int | None = ids["unk"]
        self.pad_token_id: int | None = ids["pad"]
        for cfg in (config or {}, generation_config or {}):
            if self.pad_token_id is None:
                self.pad_token_id = next(iter(self._valid_ids(cfg.get("pad_token_id"))), None)
        eos = {ids["eos"]} - {None} | set(parts.extra_eos_ids)
        for cfg in (config or {}, generation_config or {}):
            eos |= self._valid_ids(cfg.get("eos_token_id"))
        self.eos_token_ids: set[int] = eos
        self.eos_token_id: int | None = ids["eos"] if ids["eos"] is not None else min(eos, default=None)
        self.special_ids: set[int] = set(parts.backend.special_ids) | {
            i for i in ids.values() if i is not None
        }
        self.template_variables = {
            f"{name}_token": self.id_to_token(i) for name, i in ids.items() if i is not None
        }
        self.template_variables.update({f"{k}_token": v for k, v in parts.tokens.items()})
        templates, where = parts.chat_templates, parts.chat_template_source
        if templates is None and is_pangu_config(config):
            templates, where = PANGU_CHAT_TEMPLATE, "modelkin's built-in Pangu chat format"
        if is_gemma3_config(config):  # Gemma's turns end with <end_of_turn>, not EOS
            self.eos_token_ids |= {i for i in [self.token_to_id(GEMMA_END_OF_TURN)] if i is not None}
            if templates is None:
                templates, where = GEMMA_CHAT_TEMPLATE, "modelkin's built-in Gemma-3 chat format"
        self._chat = ChatTemplate(templates, source=where) if templates else None

    def _resolve(self, parts: TokenizerParts, name: str) -> int | None:
        if name in parts.ids:
            return parts.ids[name]
        text = parts.tokens.get(name)
        return self._backend.token_to_id(text) if text else None

    def _valid_ids(self, value: Any) -> set[int]:
        values = value if isinstance(value, (list, tuple, set)) else [value]
        return {int(v) for v in values if isinstance(v, int) and 0 <= int(v) < self.vocab_size}

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special token strings in it become their ids; BOS/EOS as configured."""
        if not isinstance(text, str):
            raise InputError(f"tokenizer input must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list of ints or a 1-D tensor); special tokens kept unless skipped."""
        return self._backend.decode(self._check_ids(ids), skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry of id ``i`` as the tokenizer spells it (e.g. 'Ġthe', '▁the', '<0x0A>')."""
        return self._backend.id_to_token(self._check_ids([i])[0])

    def pieces(self) -> list[str]:
        """Every vocabulary entry by id (``id_to_token`` of 0 .. vocab_size - 1; "" for an id the backend
        cannot name, e.g. a hole in the vocabulary)."""
        backend, out = self._backend, []
        for i in range(self.vocab_size):
            try:
                out.append(backend.id_to_token(i) or "")
            except Exception:  # noqa: BLE001 - backends raise their own types for unnamed ids
                out.append("")
        return out

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None."""
        return self._backend.token_to_id(token)

    def _check_ids(self, ids: Any) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise InputError(f"token ids must be a sequence of ints, got {type(ids).__name__}") from None
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}) of {self.source}"
            )
        return out

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render a conversation with the checkpoint's chat template (sandboxed jinja).

        Args:
            messages: [{"role": "system"|"user"|"assistant"|..., "content": str}, ...].
            add_generation_prompt: end with the header that starts the assistant's reply.
            **extra: template variables (tools=..., enable_thinking=...); ``chat_template`` picks a named
                template or passes a template string.

        Raises:
            TokenizerError: no chat template, or the template fails or touches unsafe attributes.
        """
        choice = extra.pop("chat_template", None)
        chat = self._chat
        if choice is not None and (chat is None or choice not in chat.templates):
            chat, choice = ChatTemplate(str(choice), source="the chat_template argument"), None
        if chat is None:
            raise TokenizerError(
                f"{self.source} has no chat template",
                hint="use a plain prompt (no --chat), or pass chat_template=...",
            )
        return chat.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            variables=self.template_variables,
            template_name=choice,
            **extra,
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Token ids of a rendered conversation: BOS once (when the tokenizer adds one), never EOS.

        Templates that write the BOS token themselves (Llama) keep theirs; for those that do not (Pangu,
        whose tokenizer adds BOS) it is prepended, as ``tokenizer(apply_chat_template(...))`` would.
        """
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), False)
        bos = self.bos_token_id
        if bos is not None and self.encode("", True)[:1] == [bos] and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids


def load_tokenizer(source: Any, path: str | Path) -> Tokenizer | None:
    """The tokenizer of a checkpoint, or None when it carries none.

    Args:
        source: the checkpoint's TensorSource (for GGUF metadata and config); may be None for HF dirs.
        path: the checkpoint path (a directory, or a file whose directory holds the tokenizer files).

    Raises:
        TokenizerError: a tokenizer file exists but is unreadable or inconsistent (names the file).
    """
    from modelkin.tokenizer.files import hf_tokenizer_parts, read_json
    from modelkin.tokenizer.gguf_vocab import gguf_tokenizer_parts

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = _model_config(source, folder)
    parts = None
    if getattr(source, "format", None) == "gguf" or (source is None and path.suffix.lower() == ".gguf"):
        parts = gguf_tokenizer_parts(_gguf_metadata(source, path), str(path))
    if parts is None:
        parts = hf_tokenizer_parts(folder)
    if parts is None:
        return None
    return Tokenizer(parts, config=config, generation_config=read_json(folder / "generation_config.json"))


def _model_config(source: Any, folder: Path) -> dict[str, Any]:
    if source is not None:
        try:
            return dict(source.config())
        except Exception:  # noqa: BLE001 - a source without a usable config still has a tokenizer
            return {}
    from modelkin.tokenizer.files import read_json

    try:
        return read_json(folder / "config.json") or {}
    except TokenizerError:
        return {}


def _gguf_metadata(source: Any, path: Path) -> Mapping[str, Any]:
    if source is not None:
        return source.metadata()
    from modelkin.checkpoint import open_checkpoint

    with open_checkpoint(path) as opened:
        return opened.metadata()

