"""Resumable inspection cache: per-tensor results keyed by the checkpoint files' identity.

One JSON file per checkpoint under $MODELKIN_CACHE_DIR/inspect (default ~/.cache/modelkin),
rewritten atomically every few tensors or seconds, so a killed scan resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from modelkin.utils import atomic_write_text

CACHE_VERSION = 1  # bump when the statistics or their JSON keys change


def cache_root() -> Path:
    env = os.environ.get("MODELKIN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modelkin"


def file_identity(files: list[Path]) -> list[list[Any]]:
    """(absolute path, size, mtime_ns, hash of the first 64 kB) of each data file."""
    ident = []
    for file in files:
        st = os.stat(file)
        with open(file, "rb") as f:
            head = hashlib.sha256(f.read(65536)).hexdigest()[:16]
        ident.append([str(Path(file).resolve()), st.st_size, st.st_mtime_ns, head])
    return ident


def cache_key(files: list[Path], options: dict[str, Any]) -> str:
    material = json.dumps({"v": CACHE_VERSION, "files": file_identity(files), "options": options},
                          sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


class ScanCache:
    """Per-tensor results of one checkpoint; `flush()` writes only when enough is new.

    Args:
        path: the cache file, or None for a disabled cache (everything is a miss, nothing written).
        every: write after this many new tensors ...
        seconds: ... or when this many seconds passed since the last write.
    """

    def __init__(self, path: Path | None, *, every: int = 64, seconds: float = 10.0):
        self.path = path
        self.every = max(1, every)
        self.seconds = seconds
        self.entries: dict[str, dict[str, Any]] = {}
        self._pending = 0
        self._last = time.monotonic()
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("version") == CACHE_VERSION:
                    self.entries = dict(data.get("tensors", {}))
            except (OSError, ValueError, AttributeError):
                self.entries = {}  # a damaged cache is only a cache: start over

    @classmethod
    def open(cls, files: list[Path], options: dict[str, Any], *, enabled: bool = True) -> ScanCache:
        if not enabled:
            return cls(None)
        every = int(os.environ.get("MODELKIN_CACHE_FLUSH_EVERY", "64"))
        return cls(cache_root() / "inspect" / f"{cache_key(files, options)}.json", every=every)

    def get(self, name: str) -> dict[str, Any] | None:
        return self.entries.get(name)

    def put(self, name: str, entry: dict[str, Any]) -> None:
        self.entries[name] = entry
        self._pending += 1
        if self._pending >= self.every or time.monotonic() - self._last >= self.seconds:
            self.flush()

    def put_many(self, entries: dict[str, dict[str, Any]]) -> None:
        """Store several results at once (written by the next flush): a sharded scan's gather."""
        self.entries.update(entries)
        self._pending += len(entries)

    def flush(self) -> None:
        if self.path is None or self._pending == 0:
            return
        text = json.dumps({"version": CACHE_VERSION, "tensors": self.entries}, allow_nan=True)
        atomic_write_text(self.path, text)
        self._pending = 0
        self._last = time.monotonic()
