"""Sanity limits for untrusted checkpoint headers: checked before a reader loops or allocates.

A header may claim anything; the file size bounds what it can truthfully hold. Readers compare every
count and length against the bytes that remain, so a lying header fails fast with a clear error.
"""

from __future__ import annotations

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
