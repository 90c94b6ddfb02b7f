"""The explicit KV cache: preallocated keys/values per layer, which slots hold real tokens, and the
attention masks and position ids that follow from that.

Shape legend: B batch, K kv heads, S slots, Dh head dimension, L new tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from modelkin.errors import InputError


def attention_mask(
    valid_BS: torch.Tensor, start: int, num_new: int, window: int | None = None
) -> torch.Tensor:
    """Boolean mask [B, L, S] for queries in slots [start, start+L) over key slots [0, S).

    A query sees earlier slots that hold real tokens (causal + padding). A padding query also sees
    itself, so no row is empty: an empty row would make softmax produce NaN that then spreads
    through padding keys to every later layer. ``window`` limits the look-back (sliding window).
    """
    S = valid_BS.shape[1]
    device = valid_BS.device
    q_L1 = torch.arange(start, start + num_new, device=device)[:, None]
    k_1S = torch.arange(S, device=device)[None, :]
    causal_LS = k_1S <= q_L1
    if window is not None:
        causal_LS &= k_1S > q_L1 - window
    return causal_LS[None] & (valid_BS[:, None, :] | (k_1S == q_L1)[None])


def positions_from_mask(mask_BL: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L]: the count of real tokens before each slot (padding gets 0)."""
    return (mask_BL.long().cumsum(-1) - 1).clamp(min=0)


class KVCache:
    """Keys and values of every layer in preallocated [B, K, S_max, Dh] tensors.

    A forward over L new tokens first calls ``reserve(L, mask_BL)`` (records which new slots hold
    real tokens; returns their position ids and the attention mask), then every attention layer
    calls ``update(layer_idx, k, v)``, then the model calls ``advance(L)``.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        window: int | None = None,
        zeroed: bool = True,
    ):
        # zeroed=False: the caller writes every slot a query can see before it is read (gather_rows)
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        alloc = torch.zeros if zeroed else torch.empty
        self.keys = [alloc(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [alloc(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid_BS = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.window = window
        self.length = 0  # slots filled so far (same for every row: rows are left-padded)
        self.has_padding = False

    @property
    def batch_size(self) -> int:
        return self.valid_BS.shape[0]

    def reserve(
        self, num_new: int, mask_BL: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Claim the next ``num_new`` slots; returns (positions [B, L], mask [B, L, S] or None).

        ``mask_BL`` marks which new tokens are real (1) or padding (0); None means all real. The
        mask is None when every cached slot is visible to the single new query (plain decoding).

        Raises:
            InputError: the cache has no room for the new tokens.
        """
        start, end = self.length, self.length + num_new
        if end > self.max_len:
            raise InputError(
                f"sequence of {end} tokens exceeds the KV cache of {self.max_len} slots",
                hint="lower max_new_tokens or shorten the prompt",
            )
        device = self.valid_BS.device
        if mask_BL is None:
            self.valid_BS[:, start:end] = True
            positions_BL = self.next_pos_B[:, None] + torch.arange(num_new, device=device)
            self.next_pos_B += num_new
        else:
            mask_BL = mask_BL.to(device=device, dtype=torch.bool)
            self.valid_BS[:, start:end] = mask_BL
            self.has_padding = self.has_padding or not bool(mask_BL.all())
            positions_BL = self.next_pos_B[:, None] + positions_from_mask(mask_BL)
            self.next_pos_B += mask_BL.sum(-1)
        if num_new == 1 and not self.has_padding and self.window is None:
            return positions_BL, None
        return positions_BL, attention_mask(self.valid_BS[:, :end], start, num_new, self.window)

    def update(
        self, layer_idx: int, k_BKLd: torch.Tensor, v_BKLd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values at the reserved slots; return all filled slots."""
        start, end = self.length, self.length + k_BKLd.shape[2]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, start:end] = k_BKLd
        values[:, :, start:end] = v_BKLd
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, num_new: int) -> None:
        self.length += num_new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def real_length(self, row: int) -> int:
        """Real tokens of ``row`` (they end at ``length``: rows are left-padded)."""
        return int(self.valid_BS[row, : self.length].sum())

    def select(self, rows_B: torch.Tensor) -> KVCache:
        """Keep only ``rows_B`` (indices into this batch), e.g. to drop finished rows; in place, one
        layer at a time, so the transient copy is one layer's. Returns self."""
        for layer in range(len(self.keys)):
            self.keys[layer] = self.keys[layer].index_select(0, rows_B)
            self.values[layer] = self.values[layer].index_select(0, rows_B)
        self.valid_BS = self.valid_BS.index_select(0, rows_B)
        self.next_pos_B = self.next_pos_B.index_select(0, rows_B)
        return self


def gather_rows(
    sources: list[tuple[KVCache, int, int]], *, extra: int, dtype: torch.dtype | None = None
) -> KVCache:
    """A new left-padded cache from ``(cache, row, copies)`` triples: each source row's real slots,
    repeated ``copies`` times, right-aligned, with room for ``extra`` more tokens.

    Continuations of one prompt (a greedy one and many samples) so share the prompt's prefill.
    """
    first = sources[0][0]
    lengths = [cache.real_length(row) for cache, row, _ in sources]
    width = max(lengths)
    batch = sum(copies for _, _, copies in sources)
    k0 = first.keys[0]
    out = KVCache(
        num_layers=len(first.keys), batch_size=batch, num_kv_heads=k0.shape[1], head_dim=k0.shape[3],
        max_len=width + extra, dtype=dtype or k0.dtype, device=k0.device, window=first.window, zeroed=False,
    )
    dst = 0
    for (cache, row, copies), n in zip(sources, lengths):
        src = slice(cache.length - n, cache.length)
        for layer in range(len(first.keys)):
            out.keys[layer][dst : dst + copies, :, width - n : width] = cache.keys[layer][row, :, src]
            out.values[layer][dst : dst + copies, :, width - n : width] = cache.values[layer][row, :, src]
            if n < width:  # left padding: masked, but zeros (not garbage) so that 0 x value stays 0
                out.keys[layer][dst : dst + copies, :, : width - n] = 0
                out.values[layer][dst : dst + copies, :, : width - n] = 0
        out.valid_BS[dst : dst + copies, width - n : width] = True
        out.next_pos_B[dst : dst + copies] = cache.next_pos_B[row]
        dst += copies
    out.length = width
    out.has_padding = min(lengths) < width
    return out


def make_kv_cache(
    model: nn.Module,
    *,
    batch_size: int,
    max_len: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> KVCache:
    """A KVCache sized for ``model`` (its ``args`` and ``sliding_window``), in its dtype and device."""
    args = model.args
    weight = model.model.embed_tokens.weight
    # the heads the attention modules (layers.Attention) hold: fewer than the config's on a
    # tensor-parallel rank; read by attribute, since layers imports this module
    kv_heads = next((m.num_kv_heads for m in model.modules() if hasattr(m, "num_kv_heads")), None)
    return KVCache(
        num_layers=args.num_hidden_layers,
        batch_size=batch_size,
        num_kv_heads=args.num_key_value_heads if kv_heads is None else kv_heads,
        head_dim=args.head_dim,
        max_len=max_len,
        dtype=dtype or weight.dtype,
        device=device or weight.device,
        window=model.sliding_window,
    )
