"""Backend over a ``tokenizers.Tokenizer`` (HF tokenizer.json, or one built from a GGUF vocabulary)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# transformers' clean_up_tokenization: spaces before punctuation and inside English contractions
_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class FastBackend:
    """Encodes with a tokenizers.Tokenizer the way transformers' fast tokenizers do.

    Args:
        tk: the tokenizers.Tokenizer (added and special tokens already registered).
        bos_id / eos_id: ids that add_bos / add_eos put around the text.
        add_bos / add_eos: None keeps the tokenizer's own post-processor (tokenizer.json without
            explicit flags); booleans replace it, as transformers does when tokenizer_config sets them.
        clean_up_spaces: apply transformers' clean_up_tokenization after decoding.
    """

    def __init__(
        self,
        tk: Any,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        clean_up_spaces: bool = False,
    ):
        self.tk = tk
        self.bos_id, self.eos_id = bos_id, eos_id
        self.use_post_processor = add_bos is None and add_eos is None
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.clean_up_spaces = clean_up_spaces
        added = tk.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if add_special_tokens and self.use_post_processor:
            return list(self.tk.encode(text, add_special_tokens=True).ids)
        ids = list(self.tk.encode(text, add_special_tokens=False).ids)
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    def id_to_token(self, i: int) -> str:
        return self.tk.id_to_token(i) or ""

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)
