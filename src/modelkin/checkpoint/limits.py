"""Sanity limits for untrusted checkpoint headers: checked before a reader loops or allocates.

A header may claim anything; the file size bounds what it can truthfully hold. Readers compare every
count and length against the bytes that remain, so a lying header fails fast with a clear error.
"""

from __future__ import annotations

from typing import Any

from modelkin.errors import ConfigError

# The largest metadata array a GGUF may hold (vocabularies and merge lists are < 1M entries today);
# gguf's reader walks arrays one element at a time, so this bounds its time and memory per array.
MAX_GGUF_ARRAY_ITEMS = 1 << 22


def check_count(count: int, *, item_bytes: int, remaining: int, what: str, limit: int | None = None) -> None:
    """Raise ValueError unless ``count`` items of at least ``item_bytes`` each fit in ``remaining`` bytes.

    Args:
        count: the number of items the header claims.
        item_bytes: the smallest size one item can have on disk (> 0).
        remaining: bytes left in the file after the count.
        what: the field, for the message.
        limit: an absolute cap on ``count`` as well.
    """
    if count < 0 or count * item_bytes > remaining:
        raise ValueError(f"{what} claims {count} items but only {remaining} bytes remain in the file")
    if limit is not None and count > limit:
        raise ValueError(f"{what} claims {count} items, more than the limit of {limit}")


# config.json keys that size a tensor or a loop when a model is built; none can exceed what the
# checkpoint's tensors hold in total.
SIZE_KEYS = ("hidden_size", "intermediate_size", "vocab_size", "head_dim", "num_attention_heads",
             "num_key_value_heads", "moe_intermediate_size", "shared_expert_intermediate_size",
             "num_experts", "num_local_experts", "num_experts_per_tok", "n_routed_experts")


def check_config_sizes(config: dict[str, Any], *, num_tensors: int, total_numel: int, where: str) -> None:
    """Refuse config values no checkpoint of this size can match, before anything is built or allocated.

    A config claiming 10^9 layers or a 2^31 head_dim would otherwise make the model builder loop or
    allocate for minutes before the shape check against the tensors could catch it.

    Raises:
        ConfigError: naming the key, its value and what the checkpoint holds.
    """
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and layers > num_tensors:
        raise ConfigError(
            f"config.json of {where} says num_hidden_layers={layers} but the checkpoint holds only "
            f"{num_tensors} tensors",
            hint="use the config.json that belongs to these weights",
        )
    for key in SIZE_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > max(total_numel, 1):
            raise ConfigError(
                f"config.json of {where} says {key}={value}, more than the {total_numel} weights the "
                "checkpoint holds",
                hint="use the config.json that belongs to these weights",
            )
