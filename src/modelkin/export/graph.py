"""What export traces: a runtime Model behind explicit KV tensors, the graph ``decode.onnx`` holds.

Inputs: input_ids [B, L], attention_mask [B, P+L] (1 = real token), position_ids [B, L] and
past_key_values.N.key/value [B, K, P, Dh]; outputs: logits [B, L, V] (float32) and
present.N.key/value [B, K, P+L, Dh]. With P = 0 it is the prefill graph (export/onnx_files.py).

Shape legend: B batch, L new tokens, P past slots, S = P + L key slots, K kv heads, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


class PastAndPresent:
    """Stands in for the runtime's KVCache while tracing: ``update`` appends a layer's new keys
    and values to its past (Concat in the graph) and keeps the result as that layer's present."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(
        self, layer_idx: int, k_BKLd: torch.Tensor, v_BKLd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.past[layer_idx]
        k_BKSd = torch.cat((past_k, k_BKLd), dim=2)
        v_BKSd = torch.cat((past_v, v_BKLd), dim=2)
        self.present.append((k_BKSd, v_BKSd))
        return k_BKSd, v_BKSd

    def advance(self, num_new: int) -> None:
        pass


def query_mask(attention_mask_BS: torch.Tensor, num_new: int, window: int | None) -> torch.Tensor:
    """Boolean [B, L, S] for the last L slots as queries: the rule of runtime/kv_cache.attention_mask
    (causal, real keys only, a padding query sees itself, optional sliding window)."""
    S = attention_mask_BS.shape[1]
    q_L1 = torch.arange(num_new)[:, None] + (S - num_new)
    k_1S = torch.arange(S)[None, :]
    causal_LS = k_1S <= q_L1
    if window is not None:
        causal_LS = causal_LS & (k_1S > q_L1 - window)
    valid_BS = attention_mask_BS.bool()
    return causal_LS[None] & (valid_BS[:, None, :] | (k_1S == q_L1)[None])


class DecoderWithPast(nn.Module):
    """``lm`` (a runtime Model) as a function of explicit tensors, ready for tracing."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.num_layers = lm.args.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = PastAndPresent([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        mask_BLS = query_mask(attention_mask, input_ids.shape[1], self.lm.sliding_window)
        logits = self.lm(input_ids, positions_BL=position_ids, mask_BLS=mask_BLS, cache=cache)
        flat = [t for kv in cache.present for t in kv]
        return (logits.float(), *flat)


def sample_inputs(
    lm: nn.Module, *, batch: int = 2, new: int = 3, past: int = 4, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """Example inputs for tracing: a left-padded batch with a past, so no size is 0 or 1."""
    args = lm.args
    ids = torch.randint(0, args.vocab_size, (batch, new), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past + new, dtype=torch.long)
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    shape = (batch, args.num_key_value_heads, past, args.head_dim)
    kv = [torch.zeros(shape, dtype=dtype) for _ in range(2 * args.num_hidden_layers)]
    return (ids, mask, positions, *kv)
