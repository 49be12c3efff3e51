"""An in-memory object store behind fastload's real store client: a fake of the network and the
store server, for fast tests of everything above them (the unit cache, the prefetch, the node
schedule, FastLoader), in one process.

It is fsspec's own ``MemoryFileSystem`` under a scheme of its own (``memtest://``), which records
every read and can be told to wait per request or to fail a path. :func:`memory_store` registers
it with fsspec and with :data:`fastload.storage.location.SCHEMES` for as long as a test runs; a
URL on it is then read by FastLoader exactly as an ``s3://`` one is, through ``Store``.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from pathlib import Path

from fsspec.implementations.memory import MemoryFileSystem

SCHEME = "memtest"


class RecordingMemoryFS(MemoryFileSystem):
    """fsspec's in-memory filesystem, its reads recorded (``reads``: (path, start, end)), each one
    delayed by ``delay_s``; a path containing one of ``failing`` answers every read with a
    connection error (a store that is down)."""
    protocol = SCHEME
    root_marker = "/"
    reads: list[tuple[str, int | None, int | None]] = []
    delay_s = 0.0
    failing: set[str] = set()
    _log_lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(f"{SCHEME}://"):
            path = path[len(SCHEME) + 3:]
        return super()._strip_protocol(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._log_lock:
            type(self).reads.append((path, start, end))
        if any(f in path for f in self.failing):
            raise ConnectionResetError(f"{path}: injected fault")
        return super().cat_file(path, start, end, **kwargs)


def _new_lock_in_child() -> None:
    # a forked reader (a DataLoader worker) must not inherit the lock held by a parent's thread
    RecordingMemoryFS._log_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


class MemoryStore:
    """One bucket of the in-memory store: upload a dataset directory, read what was asked."""

    def __init__(self):
        self.fs = RecordingMemoryFS()
        self.bucket = f"b-{uuid.uuid4().hex[:12]}"

    def upload(self, directory: Path, name: str) -> str:
        """The files of ``directory`` at ``memtest://<bucket>/<name>`` (its URL)."""
        for p in Path(directory).rglob("*"):
            if p.is_file():
                self.fs.pipe_file(f"/{self.bucket}/{name}/{p.relative_to(directory)}", p.read_bytes())
        return f"{SCHEME}://{self.bucket}/{name}"

    @property
    def reads(self) -> list[tuple[str, int | None, int | None]]:
        return [r for r in RecordingMemoryFS.reads if r[0].startswith(f"/{self.bucket}/")]

    def whole_reads(self, url: str, relative: str) -> int:
        """Reads of all of file ``relative`` of the dataset at ``url``."""
        path = self._path(url, relative)
        size = self._size(path)
        return sum(1 for p, s, e in self.reads if p == path and (s in (None, 0) and e in (None, size)))

    def ranges(self, url: str, relative: str) -> list[tuple[int, int]]:
        """Partial reads of file ``relative``: (start, end)."""
        path = self._path(url, relative)
        size = self._size(path)
        return [(s or 0, e if e is not None else size) for p, s, e in self.reads
                if p == path and not (s in (None, 0) and e in (None, size))]

    def bytes_read(self, suffix: str = "") -> int:
        total = 0
        for p, s, e in self.reads:
            if p.endswith(suffix):
                size = self._size(p)
                total += (e if e is not None else size) - (s or 0)
        return total

    def clear(self) -> None:
        with RecordingMemoryFS._log_lock:
            RecordingMemoryFS.reads[:] = [r for r in RecordingMemoryFS.reads if not r[0].startswith(f"/{self.bucket}/")]

    def delay(self, seconds: float) -> None:
        RecordingMemoryFS.delay_s = seconds

    def fail(self, *parts: str) -> None:
        RecordingMemoryFS.failing = set(parts)

    def _size(self, path: str) -> int:
        return len(self.fs.store[path].getbuffer())  # not a read: not recorded

    def _path(self, url: str, relative: str) -> str:
        return f"/{url.split('://', 1)[1]}/{relative}"


@contextlib.contextmanager
def memory_store():
    """A fresh bucket of the in-memory store, readable as ``memtest://`` while the block runs."""
    import fsspec
    from fastload.storage import location
    fsspec.register_implementation(SCHEME, RecordingMemoryFS, clobber=True)
    location.SCHEMES[SCHEME] = ("fsspec", None)
    store = MemoryStore()
    try:
        yield store
    finally:
        RecordingMemoryFS.delay_s, RecordingMemoryFS.failing = 0.0, set()
        store.clear()
        for path in [p for p in list(store.fs.store) if p.startswith(f"/{store.bucket}/")]:
            store.fs.store.pop(path, None)
        location.SCHEMES.pop(SCHEME, None)
