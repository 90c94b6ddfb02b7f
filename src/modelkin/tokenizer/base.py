"""What every tokenizer backend provides, and the parts a loader hands to modelkin's Tokenizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class TokenizerBackend(Protocol):
    """One way of turning text into ids (tokenizers, sentencepiece, a GGUF vocabulary)."""

    vocab_size: int
    special_ids: set[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def id_to_token(self, i: int) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


@dataclass(kw_only=True)
class TokenizerParts:
    """A backend plus the special tokens and chat templates its files declare.

    Token fields hold strings (``tokens``: bos/eos/unk/pad as the files spell them); ``ids`` holds ids
    given directly (GGUF metadata). ``extra_eos_ids`` are further end-of-generation ids (GGUF eot/eom).
    """

    backend: TokenizerBackend
    source: str
    tokens: dict[str, str] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)
    extra_eos_ids: set[int] = field(default_factory=set)
    chat_templates: str | Mapping[str, str] | None = None
    chat_template_source: str = ""
