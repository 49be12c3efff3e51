"""One split of a remote dataset as its reader sees it (formats/source.py's ``SplitBytes``):
which samples are ready in this process, how a batch's samples become present, and the heal of a
sample whose cached bytes fail their check.

A batch waits for its absent units whole when they are not much larger than its samples in them
(a shard-aware order, a small dataset). A batch that would wait for far more (a global order over
a large dataset, from a cold cache) reads its own samples by range meanwhile, each checked against
its CRC32C (format version 3 on), so the first batch does not wait for the whole dataset. Every
sample's bytes are checked again by the backends as they read them (``pipelines/samples.py``); a
sample whose cached bytes fail (a unit evicted by another rank meanwhile, a cached file changed
on disk) is fetched again, once, from the store (:meth:`RemoteSplit.heal`) before it counts.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .cache import FETCHERS, CacheFull, UnitCache
from .prefetch import Prefetcher

log = logging.getLogger("fastload.cache")
SAMPLE_FETCHERS = 32  # concurrent sample range requests (the first batches of a cold cache)
# a batch waits for its absent units whole when they hold at most this many times its bytes in them
# (so range reads, which the units then download again, are for a cold start over a large dataset)
WAIT_FOR_UNITS = 32


class RemoteSplit:
    """One split's samples over a :class:`UnitCache`: the reader's source of bytes, and the
    cache's consumer (its order steers eviction, through :attr:`prefetch`)."""
    volatile = True  # other ranks evict from the node's cache under this reader

    def __init__(self, cache: UnitCache, data_paths: list[str], records: np.ndarray, crcs: np.ndarray | None):
        self.cache, self.data_paths, self.crcs = cache, data_paths, crcs
        self.file = np.asarray(records["file"]).astype(np.int64)
        self.offset = np.asarray(records["offset"]).astype(np.int64)
        self.size = np.asarray(records["size"]).astype(np.int64)
        self.unit_first, self.unit_last = cache.table.of_samples(data_paths, records)
        self.ready = np.zeros(len(records), bool)
        self._all_ready = False
        self._recent = deque(maxlen=8)  # units of the last batches made ready: in flight, not trimmed
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()
        self.prefetch = Prefetcher(cache, self.unit_first)
        cache.attach(self)

    # ------------------------------------------------------------------ SplitBytes
    def ensure(self, index: np.ndarray) -> None:
        """Samples ``index`` readable from their local files: present units, or (with CRCs) their
        own bytes fetched by range. Blocks until they are."""
        if self._all_ready:  # a warm cache: nothing to look up per batch
            return
        index = np.asarray(index, np.int64)
        # the batch's units are in flight while it is read (its range-read samples are kept; on a
        # full disk, its units too)
        self._recent.append(frozenset(self._units_of(index).tolist()))
        todo = index[~self.ready[index]]
        if not len(todo):
            return
        cache = self.cache
        absent = {u for u in self._units_of(todo).tolist() if not cache.present(u)}
        if absent:
            with cache.meter.waiting():  # the batch waits on the store (FastLoader.stats)
                self._make_present(todo, absent)
        self.ready[todo] = True
        self._all_ready = bool(self.ready.all())

    def _make_present(self, todo: np.ndarray, absent: set[int]) -> None:
        cache = self.cache
        unit_bytes = sum(cache.units[u].size for u in absent)
        in_absent = np.isin(self.unit_first[todo], list(absent)) if absent else np.zeros(len(todo), bool)
        whole = unit_bytes <= WAIT_FOR_UNITS * max(1, int(self.size[todo[in_absent]].sum()))
        coming = absent if whole or self.crcs is None else {u for u in absent if cache.being_fetched(u)}
        if coming:  # on their way (the prefetch, another rank): waited for, not fetched twice
            list(self._pool("units").map(self._wait_for, sorted(coming)))
            absent -= {u for u in coming if cache.present(u)}
        if absent:
            missing = self._touches(todo, absent)
            if self.crcs is not None:
                list(self._pool("samples").map(self._fetch_sample, np.unique(todo[missing]).tolist()))
                cache.trim()
            else:
                list(self._pool("units").map(cache.fetch, sorted(absent)))

    def heal(self, i: int) -> bool:
        """Sample ``i`` failed its check as read from the cache: fetch it again from the store.
        True when the store's copy passes (the caller checks again); False when it fails too."""
        i = int(i)
        self._all_ready = False
        units = frozenset(self._units_of(np.array([i])).tolist())
        for u in units:  # a unit marked present with damaged bytes: fetched whole again later
            self.cache.invalidate(u)
        self.ready[i] = False
        if self.crcs is None:
            for u in units:
                self.cache.fetch(u)
            self.ready[i] = True
            return True
        self._recent.append(units)  # kept until it is read
        ok = self._fetch_sample(i)
        self.ready[i] = ok
        return ok

    def close(self) -> None:
        self.prefetch.stop()

    # ------------------------------------------------------------------ the reader's schedule
    def schedule_epoch(self, order: np.ndarray, lag: int = 0, then: np.ndarray | None = None) -> None:
        """The epoch's order (see :meth:`Prefetcher.schedule_epoch`). What this process believes
        present is looked at again each epoch (other ranks evict)."""
        self.ready[:] = False
        self._all_ready = False
        self.cache.forget_all()
        self.prefetch.schedule_epoch(order, lag, then)

    def advance(self, position: int) -> None:
        self.prefetch.advance(position)

    # ------------------------------------------------------------------ CacheConsumer
    def in_flight(self) -> set[int]:
        return set().union(*list(self._recent))

    def evicted(self, u: int) -> None:
        self._all_ready = False
        self.ready[(self.unit_first <= u) & (self.unit_last >= u)] = False

    def next_use(self, u: int) -> float:
        return self.prefetch.next_use(u)

    # ------------------------------------------------------------------ helpers
    def _units_of(self, samples: np.ndarray) -> np.ndarray:
        """The units holding ``samples`` (a sample may straddle two, or more when it is larger than a unit)."""
        first, last = self.unit_first[samples], self.unit_last[samples]
        wide = np.flatnonzero(last - first > 1)
        between = [np.arange(first[k] + 1, last[k]) for k in wide.tolist()]
        return np.unique(np.concatenate([first, last, *between]))

    def _touches(self, samples: np.ndarray, units: set[int]) -> np.ndarray:
        """Which of ``samples`` have bytes in one of ``units`` (one in their span first..last)."""
        listed = np.sort(np.fromiter(units, np.int64, len(units)))
        return (np.searchsorted(listed, self.unit_last[samples], "right")
                > np.searchsorted(listed, self.unit_first[samples], "left"))

    def _wait_for(self, u: int) -> None:
        """Unit ``u``, which another fetches: present once its lock is free (or fetched here if
        that fetch failed; past the cache's room, left to the samples' range reads)."""
        try:
            self.cache.fetch(u)
        except CacheFull:
            pass

    def _pool(self, kind: str) -> ThreadPoolExecutor:
        with self._pools_lock:
            if kind not in self._pools:
                workers, name = (SAMPLE_FETCHERS, "sample") if kind == "samples" else (FETCHERS, "unit")
                self._pools[kind] = ThreadPoolExecutor(workers, thread_name_prefix=f"fastload-{name}")
            return self._pools[kind]

    def _fetch_sample(self, i: int) -> bool:
        """Sample ``i``'s bytes by range, checked against its CRC32C, written in place; False when
        the store's bytes fail their CRC too (the dataset itself is damaged)."""
        import crc32c
        log.debug("range sample %d (unit %d)", i, self.unit_first[i])
        path = self.data_paths[int(self.file[i])]
        start, end = int(self.offset[i]), int(self.offset[i] + self.size[i])
        for _ in range(self.cache.store.retries + 1):
            data = self.cache.fetch_range(path, start, end)
            if crc32c.crc32c(data) == int(self.crcs[i]):
                self.cache.write_range(path, start, data, int(self.unit_first[i]))
                return True
        return False
