"""SentencePiece tokenizer.model backend, behaving like transformers' slow Llama/Pangu tokenizers.

Text is split on added/special token strings first (longest match wins); each remaining piece is
encoded by sentencepiece. With ``legacy`` (the Pangu and slow-Llama default) every piece gets
sentencepiece's dummy prefix; without it only a piece at the start of the text does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from modelkin.errors import TokenizerError


class SpecialSplitter:
    """Splits text into plain runs and whole special-token matches, like transformers' trie.

    Args:
        tokens: token string -> id for every string that must stay whole (added and special tokens).
        lstrip / rstrip: token strings that swallow whitespace on their left / right.
    """

    def __init__(self, tokens: dict[str, int], *, lstrip: Iterable[str] = (), rstrip: Iterable[str] = ()):
        self.tokens = {t: i for t, i in tokens.items() if t}
        self.lstrip, self.rstrip = set(lstrip), set(rstrip)
        ordered = sorted(self.tokens, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def split(self, text: str) -> list[str | int]:
        """Plain text runs (str, never empty) interleaved with special token ids (int)."""
        if self._pattern is None:
            return [text] if text else []
        parts: list[str | int] = []
        pos = 0
        for match in self._pattern.finditer(text):
            token = match.group(0)
            left = text[pos : match.start()]
            if token in self.lstrip:
                left = left.rstrip()
            if left:
                parts.append(left)
            parts.append(self.tokens[token])
            pos = match.end()
            if token in self.rstrip:
                while pos < len(text) and text[pos].isspace():
                    pos += 1
        if pos < len(text):
            parts.append(text[pos:])
        return parts


class SentencePieceBackend:
    """Encodes and decodes with a sentencepiece model plus added tokens from tokenizer_config.

    Args:
        processor: the loaded sentencepiece model (see ``load_processor``).
        model_file: where it came from, for error messages.
        added: token string -> id of added tokens (ids may lie beyond the sentencepiece vocabulary).
        special_ids: ids that decode(skip_special_tokens=True) drops.
        bos_id / eos_id: ids added by encode(add_special_tokens=True) per add_bos / add_eos.
        legacy: dummy prefix on every piece between special tokens (True) or only at the start.
    """

    def __init__(
        self,
        processor: Any,
        model_file: Path,
        *,
        added: dict[str, int],
        special_ids: set[int],
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        add_eos: bool,
        legacy: bool = True,
        lstrip: Iterable[str] = (),
        rstrip: Iterable[str] = (),
    ):
        self.sp = processor
        self.model_file = Path(model_file)
        self.legacy = legacy
        self._sp_plain = self.sp if legacy else _without_dummy_prefix(self.sp, model_file)
        self.added = dict(added)
        self.added_by_id = {i: t for t, i in self.added.items()}
        self.splitter = SpecialSplitter(self.added, lstrip=lstrip, rstrip=rstrip)
        n = self.sp.get_piece_size()
        self.control_ids = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special_ids = set(special_ids) | self.control_ids
        self.bos_id, self.eos_id, self.add_bos, self.add_eos = bos_id, eos_id, add_bos, add_eos
        self.vocab_size = max([n, *(i + 1 for i in self.added_by_id)])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(self.splitter.split(text)):
            if isinstance(part, int):
                ids.append(part)
            else:
                processor = self.sp if (self.legacy or k == 0) else self._sp_plain
                ids.extend(processor.encode(part))
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        run: list[int] = []
        after_special = False
        n = self.sp.get_piece_size()

        def flush() -> None:
            if run:
                processor = self._sp_plain if (after_special and not self.legacy) else self.sp
                out.append(processor.decode(run))
                run.clear()

        for i in ids:
            special = i in self.special_ids
            if i < n and not special and i not in self.added_by_id:
                run.append(i)
                continue
            flush()
            if not (skip_special_tokens and special):
                out.append(self.id_to_token(i))
            # a BOS before any text is the one encode() added: the text after it still starts the string
            after_special = after_special or i != self.bos_id or len(out) > 1
        flush()
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        if i in self.added_by_id:
            return self.added_by_id[i]
        return self.sp.id_to_piece(i) if i < self.sp.get_piece_size() else ""

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None


def load_processor(model_file: Path) -> Any:
    """A SentencePieceProcessor for ``model_file``; TokenizerError naming the file when it is unreadable."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(model_file))
    except Exception as err:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError with long protobuf text
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenizerError(
            f"{model_file}: not a readable sentencepiece model ({first})",
            hint="the tokenizer.model file is corrupt or truncated; restore it from the original checkpoint",
        ) from None
    return processor


def _without_dummy_prefix(processor: Any, model_file: Path) -> Any:
    """A copy of ``processor`` that does not prepend the dummy-prefix space (for non-legacy pieces)."""
    import sentencepiece as spm

    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError as err:
        raise TokenizerError(
            f"{model_file}: a non-legacy sentencepiece tokenizer needs protobuf ({err})",
            hint="pip install protobuf",
        ) from None
    proto = model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    if not proto.normalizer_spec.add_dummy_prefix:
        return processor
    proto.normalizer_spec.add_dummy_prefix = False
    plain = spm.SentencePieceProcessor()
    plain.LoadFromSerializedProto(proto.SerializeToString())
    return plain
