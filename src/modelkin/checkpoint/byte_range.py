"""One tensor's bytes from a checkpoint file, never a mapping of the whole file: a copy-on-write map of
just its byte range, or positioned reads (os.preadv) into a new buffer. A file larger than RAM (or than
an address-space limit) costs only the tensors actually read.
"""

from __future__ import annotations

import mmap
import os
import pathlib

import torch

# Linux returns at most 0x7ffff000 bytes from one read call; ask for no more than that at a time.
_MAX_CALL = 1 << 30


class RangeReader:
    """Read-only file descriptors, one per file, opened on first use and closed by ``close``."""

    def __init__(self) -> None:
        self._fds: dict[pathlib.Path, int] = {}

    def fd(self, file: pathlib.Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return fd

    def read(self, file: pathlib.Path, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` bytes at ``offset`` as a new uint8 tensor.

        Raises:
            OSError: the file ends before ``offset + nbytes`` (it shrank since its header was read).
        """
        out = torch.empty(nbytes, dtype=torch.uint8)
        read_into(self.fd(file), offset, out, file)
        return out

    def map(self, file: pathlib.Path, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` bytes at ``offset`` as a uint8 tensor over a private (copy-on-write) map of only
        those pages: nothing is copied until written, and the map goes with the tensor.

        Raises:
            OSError: the file is shorter than ``offset + nbytes``, or the map is refused.
        """
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        fd = self.fd(file)
        if offset + nbytes > os.fstat(fd).st_size:  # a map past the end would fault (SIGBUS) when read
            raise OSError(f"{file} ends before byte {offset + nbytes}, inside a tensor that starts at {offset}")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, offset - start + nbytes, access=mmap.ACCESS_COPY, offset=start)
        return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset - start)

    def read_blocks(self, file: pathlib.Path, offset: int, count: int, block: int, stride: int) -> torch.Tensor:
        """``count`` blocks of ``block`` bytes, the i-th at ``offset + i * stride``, packed together."""
        out = torch.empty(count * block, dtype=torch.uint8)
        fd = self.fd(file)
        for i in range(count):
            read_into(fd, offset + i * stride, out[i * block:(i + 1) * block], file)
        return out

    def read_runs(self, file: pathlib.Path, runs: list[tuple[int, int]]) -> torch.Tensor:
        """The byte ranges ``runs`` ((offset, nbytes) each) packed together in one new buffer."""
        out = torch.empty(sum(n for _, n in runs), dtype=torch.uint8)
        fd, done = self.fd(file), 0
        for offset, nbytes in runs:
            read_into(fd, offset, out[done:done + nbytes], file)
            done += nbytes
        return out

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def row_runs(unique: torch.Tensor, offset: int, row_bytes: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of each run of consecutive rows in ``unique`` (sorted distinct row ids)."""
    ids = unique.tolist()
    runs, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or ids[k] != ids[k - 1] + 1:
            runs.append((offset + ids[start] * row_bytes, (k - start) * row_bytes))
            start = k
    return runs


def read_into(fd: int, offset: int, out: torch.Tensor, file: pathlib.Path | str = "the file") -> None:
    """Fill the contiguous uint8 tensor ``out`` from byte ``offset`` of ``fd``, retrying short reads."""
    view = memoryview(out.numpy()).cast("B") if out.numel() else memoryview(b"")
    done, total = 0, len(view)
    while done < total:
        got = os.preadv(fd, [view[done:done + min(total - done, _MAX_CALL)]], offset + done)
        if got <= 0:
            raise OSError(f"{file} ends at byte {offset + done}, inside a tensor that needs "
                          f"bytes {offset}..{offset + total}")
        done += got
