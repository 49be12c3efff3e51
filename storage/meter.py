"""The store's share of a loader's time, counted across its processes (FastLoader.stats)."""
from __future__ import annotations

import contextlib
import time


class StoreMeter:
    """What reading cost in store time, summed over a loader's processes (its forked DataLoader
    workers share these counters): bytes downloaded, and the seconds during which at least one
    reader waited for bytes (a union of intervals, not a sum over threads)."""

    def __init__(self):
        import multiprocessing as mp
        self._v = mp.RawArray("d", 4)  # bytes, seconds waited, readers waiting now, since when
        self._lock = mp.Lock()  # in shared memory: a fork while a thread holds it cannot orphan it

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self._v[0] += n

    @contextlib.contextmanager
    def waiting(self):
        with self._lock:
            if self._v[2] == 0:
                self._v[3] = time.monotonic()
            self._v[2] += 1
        try:
            yield
        finally:
            with self._lock:
                self._v[2] -= 1
                if self._v[2] == 0:
                    self._v[1] += time.monotonic() - self._v[3]

    def read(self) -> tuple[int, float]:
        """(bytes downloaded, seconds readers waited), so far."""
        with self._lock:
            waiting = time.monotonic() - self._v[3] if self._v[2] else 0.0
            return int(self._v[0]), self._v[1] + waiting
