"""Writing one large file front to back: in pieces, hashed on the way, durable at the end, and
past the page cache.

Why past the page cache (``O_DIRECT``): a conversion writes as many bytes as the dataset holds
(ImageNet: ~140 GB), once. Through the page cache, each written page is first allocated and
filled in memory, then written back, and the file evicts whatever the cache held (the
source being read, for one). Measured here on 420 MB right after a conversion: 1.27 s of
``write`` calls through the cache (new pages), 0.30 s written direct, durable included.
Filesystems without ``O_DIRECT`` (tmpfs before Linux 6.6) get the same pieces through the cache, with a
``fdatasync`` every 256 MB so that the final one stays short.

The caller fills the current piece (``take`` gives a view of its next bytes, ``write`` copies
bytes in); a full piece is handed to a writer thread and a hasher thread (both release the GIL)
while the caller fills the next one. A few page-aligned buffers are reused: fresh memory costs a
page fault per 4 KB, about as much as copying into it.
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .writing import ChunkHashes

ALIGN = 4096              # O_DIRECT offsets, lengths and addresses: a multiple of the block size
PIECE_BYTES = 16 * 2**20  # the unit handed to the writer thread
BUFFERS = 3
_SYNC_EVERY = 2**28       # without O_DIRECT: wait for the disk every 256 MB


def _aligned_buffer(nbytes: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)  # anonymous maps are page-aligned


class BulkFile:
    """``path`` written sequentially, created or truncated. ``size`` and ``sha256`` describe what
    was written; :meth:`close` makes it durable. ``direct``: past the page cache where the
    filesystem allows. Not thread-safe: one caller fills it."""

    def __init__(self, path: Path, progress: Callable[[int], None] | None = None, direct: bool = True,
                 chunk_size: int | None = None):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.fd, self.direct = -1, False
        if direct:
            try:
                self.fd, self.direct = os.open(self.path, flags | os.O_DIRECT, 0o644), True
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT (older tmpfs)
                    raise
        if self.fd < 0:
            self.fd = os.open(self.path, flags, 0o644)
        self.progress = progress
        self.sha256 = hashlib.sha256()
        # with ``chunk_size``: a sha256 per chunk too (``chunks.hexdigests()``), on the hasher thread
        self.chunks = ChunkHashes(chunk_size) if chunk_size else None
        self.size = 0           # bytes written or queued, including the current piece's
        self.flushed = 0        # file offset where the current piece starts
        self.free = [_aligned_buffer(PIECE_BYTES) for _ in range(BUFFERS)]
        self.current, self.fill, self.samples = self.free.pop(), 0, 0
        self.in_flight: deque = deque()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="fastload-bulk-writer")
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="fastload-bulk-hasher")

    def room(self) -> int:
        """Bytes that fit in the current piece."""
        return self.current.size - self.fill

    def take(self, nbytes: int, samples: int = 0) -> np.ndarray:
        """A view of the next ``nbytes`` of the file, for the caller to fill before its next
        call; ``samples`` of the caller's items end in it (counted when it is written)."""
        if nbytes > self.room():
            self._next_piece(nbytes)
        view = self.current[self.fill:self.fill + nbytes]
        self.fill += nbytes
        self.size += nbytes
        self.samples += samples
        return view

    def write(self, data) -> None:
        data = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        while len(data):
            if not self.room():
                self._next_piece(0)
            n = min(len(data), self.room())
            self.take(n)[:] = data[:n]
            data = data[n:]

    def _next_piece(self, need: int) -> None:
        """Hand the current piece's aligned part to the threads and carry its tail (under one
        block) into a fresh buffer with room for ``need`` more bytes."""
        whole = self.fill // ALIGN * ALIGN
        tail = self.fill - whole
        if tail + need > PIECE_BYTES:  # one item larger than a piece
            fresh = _aligned_buffer(-(-(tail + need) // ALIGN) * ALIGN)
        else:
            while not self.free:
                self._finish_oldest()
            fresh = self.free.pop()
        fresh[:tail] = self.current[whole:self.fill]
        self._submit(self.current, whole, whole)
        self.current, self.fill = fresh, tail

    def _submit(self, buffer: np.ndarray, nbytes: int, hashed: int) -> None:
        """Write ``buffer[:nbytes]`` at the next offset and hash its first ``hashed`` bytes."""
        self.in_flight.append((self.writer.submit(self._write, buffer[:nbytes], self.flushed),
                               self.hasher.submit(self._hash, buffer[:hashed]), buffer, self.samples))
        self.flushed += nbytes
        self.samples = 0

    def _hash(self, piece: np.ndarray) -> None:
        self.sha256.update(piece)
        if self.chunks is not None:
            self.chunks.update(piece)

    def _write(self, piece: np.ndarray, start: int) -> None:
        view, at = memoryview(piece), start
        while len(view):
            try:
                n = os.pwrite(self.fd, view, at)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._stop_direct()  # a filesystem that opens with O_DIRECT but refuses its writes
                continue
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            view, at = view[n:], at + n
        if not self.direct and (start + piece.nbytes) // _SYNC_EVERY != start // _SYNC_EVERY:
            os.fdatasync(self.fd)

    def _stop_direct(self) -> None:
        import fcntl
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def _finish_oldest(self) -> None:
        written, hashed, buffer, samples = self.in_flight.popleft()
        written.result()  # raises the write's error (a full disk)
        hashed.result()
        if buffer.size == PIECE_BYTES:
            self.free.append(buffer)
        if self.progress is not None and samples:
            self.progress(samples)

    def close(self) -> None:
        """Write what is left (the last block padded, then cut back to ``size``), wait for the
        threads (raising the first error) and make the file durable."""
        try:
            tail = self.fill
            padded = -(-tail // ALIGN) * ALIGN
            self.current[tail:padded] = 0
            self._submit(self.current, padded, tail)
            while self.in_flight:
                self._finish_oldest()
            if padded != tail:
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Stop the threads, dropping queued pieces, and close the file (the caller removes it)."""
        self.writer.shutdown(wait=True, cancel_futures=True)
        self.hasher.shutdown(wait=True, cancel_futures=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
