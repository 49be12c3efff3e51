"""How a dataset's files are written: checksums taken on the way, and whole-or-nothing writes.
The contract (``manifest.py``) says what the bytes mean; this module only writes them."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class HashingFile:
    """Sequential writes to file ``f``, hashed (sha256) and counted on the way: a checksum with
    no second read of what was written."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> None:
        self.f.write(data)
        self.sha256.update(data)
        self.size += memoryview(data).nbytes


class ChunkHashes:
    """sha256 of each ``chunk_size`` bytes of a stream fed in order, in pieces of any length: the
    per-chunk checksums a remote reader checks each chunk against (format version 4)."""

    def __init__(self, chunk_size: int):
        self.chunk_size, self.done, self.current, self.filled = chunk_size, [], hashlib.sha256(), 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), self.chunk_size - self.filled)
            self.current.update(view[:n])
            self.filled += n
            view = view[n:]
            if self.filled == self.chunk_size:
                self.done.append(self.current.hexdigest())
                self.current, self.filled = hashlib.sha256(), 0

    def hexdigests(self) -> list[str]:
        return self.done + ([self.current.hexdigest()] if self.filled or not self.done else [])


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``path`` whole or not at all (a temporary name, renamed). ``durable``: on disk
    before the rename (fsync); without it the file survives the process (kill -9) but not a
    power cut, for bookkeeping that a later step syncs or can redo."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
