"""Background reading for scan: a thread reads the next tensor while the current one is computed.

Safetensors tensors that need no full matrix are streamed as raw pieces into a small pool of reused
(pinned, for CUDA) buffers, so memory stays bounded by the pool, not the tensor; everything else
comes whole from TensorSource.get_tensor, at most one tensor ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from modelkin.checkpoint import TensorSource

PIECE_BYTES = 32 << 20
POOL_SIZE = 3  # one being computed, one queued, one being read


@dataclass(frozen=True, slots=True)
class RawLocation:
    file: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype


@dataclass(slots=True)
class Piece:
    """Part (or all) of one tensor's data on the host; call release() once it is consumed."""

    name: str
    data: torch.Tensor
    nbytes: int
    last: bool
    pool: queue.Queue | None = None
    buffer: torch.Tensor | None = None

    def release(self) -> None:
        if self.pool is not None and self.buffer is not None:
            self.pool.put(self.buffer)
            self.pool = self.buffer = None


def safetensors_locations(src: TensorSource) -> dict[str, RawLocation]:
    """Where each tensor of a safetensors source lies in its file; others map to nothing."""
    if getattr(src, "format", "") != "safetensors":
        return {}
    from modelkin.checkpoint.safetensors_reader import scan_file
    from modelkin.checkpoint.source import TORCH_DTYPES

    found: dict[str, list[RawLocation]] = {}
    for file in src.files():
        entries, _ = scan_file(Path(file))
        for e in entries:
            if e.info.dtype in TORCH_DTYPES:
                loc = RawLocation(Path(file), e.offset, e.info.nbytes, TORCH_DTYPES[e.info.dtype])
                found.setdefault(e.info.name, []).append(loc)
    keys = set(src.keys())
    # a name stored in two shards is resolved by the index: leave it to get_tensor
    return {n: locs[0] for n, locs in found.items()
            if len(locs) == 1 and n in keys and src.info(n).nbytes == locs[0].nbytes}


class _Failure:
    def __init__(self, err: BaseException):
        self.err = err


class Prefetcher:
    """Iterate Pieces of ``names`` in order, read by a background thread.

    Args:
        src: the checkpoint.
        names: tensors to read, in order.
        raw: names that may be streamed in pieces (from safetensors_locations).
        pin: allocate pinned buffers (CUDA hosts) so device copies can be asynchronous.
    """

    def __init__(self, src: TensorSource, names: list[str], raw: dict[str, RawLocation], *,
                 pin: bool = False, piece_bytes: int = PIECE_BYTES):
        self.src, self.names, self.raw = src, names, raw
        self.piece_bytes = max(8, piece_bytes // 8 * 8)
        self.pin = pin
        self._allocated = 0
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._pool: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modelkin-prefetch", daemon=True)

    def __iter__(self) -> Iterator[Piece]:
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, _Failure):
                    raise item.err
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                item = self._queue.get(timeout=0.05)
                if isinstance(item, Piece):
                    item.release()
            except queue.Empty:
                pass

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for name in self.names:
                if self._stop.is_set():
                    return
                loc = self.raw.get(name)
                ok = self._stream(name, loc) if loc is not None else self._whole(name)
                if not ok:
                    return
            self._put(None)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failure(err))

    def _whole(self, name: str) -> bool:
        tensor = self.src.get_tensor(name)
        return self._put(Piece(name, tensor, self.src.info(name).nbytes, True))

    def _buffer(self) -> torch.Tensor | None:
        if self._pool.qsize() == 0 and self._allocated < POOL_SIZE:
            self._allocated += 1
            return torch.empty(self.piece_bytes, dtype=torch.uint8, pin_memory=self.pin)
        while not self._stop.is_set():
            try:
                return self._pool.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _stream(self, name: str, loc: RawLocation) -> bool:
        itemsize = torch.empty((), dtype=loc.dtype).element_size()
        step = self.piece_bytes // itemsize * itemsize
        with open(loc.file, "rb", buffering=0) as f:
            f.seek(loc.offset)
            done = 0
            while True:
                size = min(step, loc.nbytes - done)
                buf = self._buffer()
                if buf is None:
                    return False
                view = buf[:size]
                got = f.readinto(view.numpy()) if size else 0
                if got != size:
                    self._pool.put(buf)
                    raise OSError(f"{loc.file} ended inside tensor {name!r}")
                done += size
                last = done >= loc.nbytes
                if last:
                    self.src.bytes_read += loc.nbytes
                piece = Piece(name, view.view(loc.dtype), size, last, self._pool, buf)
                if not self._put(piece):
                    return False
                if last:
                    return True
