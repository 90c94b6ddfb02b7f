"""Per-layer weight access for the fingerprints: canonical names -> (layer, role, expert), tensors on a device.

Methods ask for ``weights.get(layer, "q")`` (or ``weights.rows("embed", ids)``) and read nothing else. Every
read goes through the checkpoint's TensorSource once: a per-model memo (memo.py) serves repeats and values
derived from tensors, and ``weights.stats`` counts what was read and what the memo served.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelkin.checkpoint import TensorSource, open_checkpoint
from modelkin.compare.fingerprints.memo import Memo
from modelkin.errors import CheckpointError
from modelkin.inspect.roles import UNKNOWN, classify

ATTENTION_ROLES = ("q", "k", "v", "o")

Key = tuple[int | None, str, int | None]


def parse_name(name: str) -> Key | None:
    """(layer, role, expert) of a canonical tensor name (modelkin.inspect.roles), None when unknown."""
    found = classify(name)
    return None if found.role == UNKNOWN else (found.layer, found.role, found.expert)


def acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for reductions where the device has it (Ascend NPUs do not: float32 there)."""
    return torch.float32 if device.type == "npu" else torch.float64


@dataclass(frozen=True)
class Geometry:
    """Attention/MLP shapes read from the config (and the tensors where the config is silent)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


class ModelWeights:
    """One checkpoint seen as layers and roles; reads tensors lazily onto ``device``.

    Every tensor is read from the checkpoint once while the memo holds it (LRU, ``memo_bytes``; default
    1 GiB capped at RAM / 8, or $MODELKIN_FINGERPRINT_MEMO_BYTES): methods share reads and derived
    values, and a ModelWeights kept open across comparisons reads its model once. Returned tensors may be
    the memo's own: callers must not modify them in place.

    Args:
        source: an open TensorSource.
        device: where tensors are computed on.
        label: a short name for reports (the path's name by default).
        memo_bytes: the memo's budget in bytes for tensors in memory of their own (0: no memo); tensors
            that are views of mapped file pages (safetensors, unquantised GGUF) count against a second
            budget, ``memo.mapped_budget`` (RAM / 3, or $MODELKIN_FINGERPRINT_MAPPED_BYTES).
    """

    def __init__(self, source: TensorSource, device: torch.device, label: str | None = None, *,
                 memo_bytes: int | None = None):
        self.source = source
        self.device = device
        self.label = label or Path(str(source.path)).name
        self.memo = Memo(memo_bytes, 0 if memo_bytes == 0 else None)
        self.reads: dict[str, int] = {}  # checkpoint name -> times read from the checkpoint
        self._tensors_read = self._rows_read = self._bytes_read = 0
        self.index: dict[Key, str] = {}
        for name in source.keys():
            key = parse_name(name)
            if key is not None:
                self.index.setdefault(key, name)
        self.layers = sorted({k[0] for k in self.index if k[0] is not None})
        try:
            self.config: dict[str, Any] = dict(source.config())
        except CheckpointError:
            self.config = {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def has(self, layer: int | None, role: str, expert: int | None = None) -> bool:
        if role in ATTENTION_ROLES and (layer, role, expert) not in self.index:
            return (layer, "qkv", None) in self.index
        return (layer, role, expert) in self.index

    def name(self, layer: int | None, role: str, expert: int | None = None) -> str:
        try:
            return self.index[(layer, role, expert)]
        except KeyError:
            where = f"layer {layer} " if layer is not None else ""
            raise CheckpointError(f"{self.source.path}: no {role} tensor {where}(expert {expert})"
                                  if expert is not None else f"{self.source.path}: no {where}{role} tensor",
                                  hint="this fingerprint needs it; check the checkpoint's tensor names") from None

    def info(self, layer: int | None, role: str, expert: int | None = None):
        return self.source.info(self.name(layer, role, expert))

    @property
    def stats(self) -> dict[str, int]:
        """What this model cost: tensors / row sets read from the checkpoint, bytes read, memo hits, misses,
        evictions, bytes held and budget."""
        memo = self.memo
        return {"tensors_read": self._tensors_read, "rows_read": self._rows_read,
                "bytes_read": self._bytes_read,
                "memo_hits": memo.hits, "memo_misses": memo.misses, "memo_evictions": memo.evictions,
                "memo_bytes": memo.held, "memo_budget": memo.budget, "memo_mapped_bytes": memo.held_mapped,
                "memo_mapped_budget": memo.mapped_budget}

    def drop_tensors(self) -> None:
        """Free the memoised tensors and row sets, keeping derived values (spectra, std curves, vocabulary):
        what a model kept open across comparisons should hold while another model runs."""
        self.memo.drop("tensor", "rows")

    def derived(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """A value computed from this model's weights alone, memoised under ``key`` (a tuple naming it)."""
        return self.memo.get(("derived", *(key if isinstance(key, tuple) else (key,))), make)

    def get(self, layer: int | None, role: str, expert: int | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor on the device in ``dtype``; q/k/v split out of a fused qkv_proj when needed."""
        if role in ATTENTION_ROLES[:3] and (layer, role, None) not in self.index and self.has(layer, role):
            return self._split_qkv(layer, role).to(self.device, dtype)
        return self.tensor(self.name(layer, role, expert), dtype)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor by checkpoint name on the device (memoised as stored), converted to ``dtype``."""
        mapped = self.device.type == "cpu" and self.source.is_mapped(name)
        found = self.memo.get(("tensor", name), lambda: self._read(name), mapped=mapped)
        return found if dtype is None else found.to(self.device, dtype)

    def rows(self, role: str, ids: Sequence[int] | np.ndarray | torch.Tensor,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` (in that order) of a global tensor such as the embedding, in ``dtype``.

        Served from the whole tensor when the memo holds it or when most rows are wanted; otherwise only
        those rows are read (formats that can read byte ranges read nothing else).
        """
        name = self.name(None, role)
        index = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        whole = self.whole(role, int(index.unique().numel()))
        if whole is not None:
            return whole[index.to(whole.device)].to(self.device, dtype)
        digest = hashlib.blake2b(index.numpy().tobytes(), digest_size=16).hexdigest()
        found = self.memo.get(("rows", name, digest), lambda: self._read_rows(name, index))
        return found.to(self.device, dtype)

    def whole(self, role: str, rows: int) -> torch.Tensor | None:
        """The whole global tensor of ``role`` (as stored) where ``rows`` distinct rows of it are served from
        it: the memo holds it, or at least half its rows are wanted. None where reading only those rows is
        cheaper."""
        name = self.name(None, role)
        found = self.memo.peek(("tensor", name))
        if found is None and 2 * rows >= self.source.info(name).shape[0]:
            found = self.tensor(name)
        return found

    def _read(self, name: str) -> torch.Tensor:
        before = self.source.bytes_read
        tensor = self.source.get_tensor(name).to(self.device)
        self._tensors_read += 1
        self._count(name, before)
        return tensor

    def _read_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        before = self.source.bytes_read
        tensor = self.source.get_rows(name, index).to(self.device)
        self._rows_read += 1
        self._count(name, before)
        return tensor

    def _count(self, name: str, before: int) -> None:
        self._bytes_read += self.source.bytes_read - before
        self.reads[name] = self.reads.get(name, 0) + 1

    def _split_qkv(self, layer: int, role: str) -> torch.Tensor:
        fused = self.tensor(self.index[(layer, "qkv", None)])
        g = self.geometry()
        sizes = [g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim, g.num_kv_heads * g.head_dim]
        if sum(sizes) != fused.shape[0]:
            sizes = [fused.shape[0] // 3] * 3  # LeaFBench's rule for fused Wqkv without head counts
        return torch.split(fused, sizes, dim=0)["qkv".index(role)]

    def norm_gain(self, layer: int, role: str) -> torch.Tensor | None:
        """The gain an RMSNorm applies (its weight, or 1 + weight for Gemma's offset-from-1 storage), None if absent."""
        if not self.has(layer, role):
            return None
        gain = self.get(layer, role).flatten()
        return 1.0 + gain if str(self.config.get("model_type", "")).startswith("gemma") else gain

    def mlp_input_norm(self, layer: int) -> str:
        """The role of the norm feeding the MLP: sandwich-norm models (Gemma) have pre_mlp_norm, whose
        mlp_norm norms the attention output instead."""
        return "pre_mlp_norm" if self.has(layer, "pre_mlp_norm") else "mlp_norm"

    def experts(self, layer: int) -> list[int]:
        return sorted({k[2] for k in self.index if k[0] == layer and k[1] == "expert_gate"})

    @property
    def is_moe(self) -> bool:
        return any(k[1] == "expert_gate" for k in self.index)

    def geometry(self) -> Geometry:
        """Hidden size, head counts and head_dim from the config, checked against q/k shapes."""
        return self.derived("geometry", self._geometry)

    def _geometry(self) -> Geometry:
        cfg = self.config
        layer = self.layers[0] if self.layers else 0
        hidden = int(cfg.get("hidden_size") or self.info(layer, "q").shape[1])
        heads = int(cfg.get("num_attention_heads") or 0)
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or (hidden // heads if heads else 0))
        if not heads or not head_dim:
            raise CheckpointError(f"{self.source.path}: config.json has no num_attention_heads",
                                  hint="this fingerprint needs the head layout; add it to config.json")
        return Geometry(hidden_size=hidden, num_heads=heads, num_kv_heads=kv, head_dim=head_dim)


@contextlib.contextmanager
def open_weights(model: str | Path | TensorSource | ModelWeights, device: torch.device,
                 label: str | None = None, *, memo_bytes: int | None = None) -> Iterator[ModelWeights]:
    """ModelWeights over a path (opened and closed here), an open TensorSource (left open), or an open
    ModelWeights (used as it is, memo included, and left open)."""
    if isinstance(model, ModelWeights):
        yield model
        return
    if isinstance(model, TensorSource):
        yield ModelWeights(model, device, label, memo_bytes=memo_bytes)
        return
    with open_checkpoint(model) as source:
        yield ModelWeights(source, device, label or Path(model).name, memo_bytes=memo_bytes)


def pick_layers(layers: list[int], limit: int | None) -> list[int]:
    """At most ``limit`` layers spread evenly over the depth (all of them when limit is None)."""
    if limit is None or limit >= len(layers):
        return list(layers)
    if limit <= 1:
        return [layers[-1]]
    idx = [round(i * (len(layers) - 1) / (limit - 1)) for i in range(limit)]
    return [layers[i] for i in sorted(set(idx))]


def vocab_strings(weights: ModelWeights) -> list[str] | None:
    """Token strings by id (GGUF vocabulary or tokenizer.json), or None when the checkpoint carries none."""
    found = vocabulary(weights)
    return None if found is None else found[0]


def vocabulary(weights: ModelWeights) -> tuple[list[str], set[int]] | None:
    """(token strings by id, special ids) from a GGUF vocabulary or tokenizer.json, None when absent.

    Special ids: GGUF unknown/control/unused token types, or tokenizer.json added tokens marked special.
    """
    return weights.derived("vocabulary", lambda: _read_vocabulary(weights))


def _read_vocabulary(weights: ModelWeights) -> tuple[list[str], set[int]] | None:
    source = weights.source
    if source.format == "gguf":
        meta = source.metadata()
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            return None
        types = list(meta.get("tokenizer.ggml.token_type") or [])
        return [str(t) for t in tokens], {i for i, t in enumerate(types) if int(t) in (2, 3, 5)}
    folder = Path(str(source.path))
    folder = folder if folder.is_dir() else folder.parent
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    raw = (data.get("model") or {}).get("vocab") or {}
    if isinstance(raw, list):  # unigram models store [token, score] pairs in id order
        vocab = {str(pair[0]): i for i, pair in enumerate(raw)}
    else:
        vocab = {str(k): int(v) for k, v in dict(raw).items()}
    special = set()
    for added in data.get("added_tokens") or []:
        vocab[str(added.get("content"))] = int(added.get("id"))
        if added.get("special"):
            special.add(int(added.get("id")))
    if not vocab:
        return None
    out = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        out[int(i)] = token
    return out, special
