"""Small shared helpers: atomic file output and human-readable sizes."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it over ``final``.

    An exception (or a kill) inside the block leaves ``final`` untouched and removes the
    temporary file, so readers only ever see the previous file or the complete new one.
    Works for files and directories (the temporary path does not exist when yielded).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=suffix or ".tmp", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if tmp.is_dir() and final.is_dir():
            # os.replace cannot swap a directory over a non-empty one: move the old one aside.
            old = final.with_name(f".{final.name}.old")
            _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically (temporary file, fsync, rename)."""
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``final`` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))


def human_bytes(n: float | None) -> str:
    """Format a byte count as '1.23 GB' (decimal units); None (not known) as 'unknown'."""
    if n is None:
        return "unknown"
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/Inf become None, tuples lists, Paths strings, tensors/arrays lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return _clean(obj.item())
    return obj


def to_json_text(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def trim_heap(*, collect: bool = False) -> None:
    """Hand freed memory back to the OS. glibc keeps freed blocks of up to 32 MB in its heap (still RssAnon)
    once its mmap threshold has grown, and a loop that frees a large block while keeping small ones
    fragments the heap, so RssAnon grows with every iteration: between models the process would look as if
    the last one were still resident, and the upcycle detector's loop over 64 experts of 27 MB reached 12 GB
    on a 72B layout. Costs milliseconds; call it after freeing large temporaries. ``collect`` runs a full
    garbage collection first, for objects held by reference cycles; it costs ~0.13 s once torch, scipy and
    matplotlib are imported (~340k tracked objects), and models and fingerprint memos need none: they are
    freed by reference count."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (another OS or C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
