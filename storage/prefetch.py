"""The prefetch of one split's units, ahead of its reader, in the order the reader will use them.

The interface is FFCV's memory manager's: :meth:`Prefetcher.schedule_epoch` is given the
epoch's order (this node's samples, step by step), :meth:`Prefetcher.advance` the reader's
position in it. From the order it knows, for each unit, the positions where it is used: the
unit cache evicts the one used furthest ahead (Belady), and FETCHERS threads download units in
order of first use, each only once the cache has room for it beside every unit still needed
before it. Threads sleep on a condition, woken when there is work: a new schedule, a reader
that moved on, a stop.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from .cache import FETCHERS, CacheFull, UnitCache

log = logging.getLogger("fastload.cache")
# the one timed wait: room held by another process on the node (its eviction tells no one here)
_ROOM_RECHECK_S = 0.25


class Prefetcher:
    """Units of ``cache`` fetched ahead of a reader whose samples lie in units ``unit_of_sample``."""

    def __init__(self, cache: UnitCache, unit_of_sample: np.ndarray):
        self.cache, self.unit_of_sample = cache, unit_of_sample
        self._cond = threading.Condition()
        self._generation = 0
        self._position = 0
        self._lag = 0
        self._uses = None  # (positions sorted by unit, each unit's start in them): next_use's table
        self.planned = (0, 0)  # positions of the last schedule: (this epoch's, the next epoch's head)
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ the reader's side
    def schedule_epoch(self, order: np.ndarray, lag: int = 0, then: np.ndarray | None = None) -> None:
        """The epoch's order (this node's, from its resume point): its units are fetched ahead of
        the reader in order of first use, and eviction keeps the ones used soonest. ``lag``:
        positions behind this process's that the node's other ranks may still be at (a unit they
        use there is not evicted). ``then``: the next epoch's first samples, fetched after this
        order's once the cache has room for them beside what this order still uses."""
        parts = [np.asarray(order, np.int64)] + ([np.asarray(then, np.int64)] if then is not None else [])
        self.planned = (len(parts[0]), len(parts[1]) if then is not None else 0)
        units = self.unit_of_sample[np.concatenate(parts)]
        # unit -> sorted positions where it is used (Belady's "next use")
        by_unit = np.argsort(units, kind="stable")
        starts = np.searchsorted(units[by_unit], np.arange(len(self.cache.units) + 1))
        # each part's units held from their first use to their last in it (a unit used again in
        # ``then`` is held twice, not from this epoch's use to the next's)
        spans, offset = [], 0
        for part in parts:
            mine = units[offset:offset + len(part)]
            used, first = np.unique(mine, return_index=True)
            last = len(part) - 1 - np.unique(mine[::-1], return_index=True)[1]
            spans.append((used, first + offset, last + offset))
            offset += len(part)
        used, first, last = (np.concatenate(x) for x in zip(*spans))
        sizes = np.array([self.cache.units[u].size for u in used.tolist()], np.int64)
        by_first = np.argsort(first, kind="stable")
        span = (used[by_first], first[by_first], last[by_first], sizes[by_first])
        with self._cond:
            self._generation += 1
            self._position, self._lag = 0, int(lag)
            self._uses = (by_unit, starts)
            self._cond.notify_all()  # the last schedule's threads stop
        self._start(self._generation, span)

    def advance(self, position: int) -> None:
        """The reader has reached ``position`` of the scheduled order."""
        with self._cond:
            self._position = position
            self._cond.notify_all()
        log.debug("position %d", position)

    def stop(self) -> None:
        """The threads stop after the unit at hand (their reader is gone: the rest of its
        schedule would be downloaded for no one)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def next_use(self, u: int) -> float:
        """Where unit ``u`` is next used, at or after the position the slowest local rank may be at."""
        if self._uses is None:
            return float("inf")
        by_unit, starts = self._uses
        pos = by_unit[starts[u]:starts[u + 1]]
        k = np.searchsorted(pos, max(0, self._position - self._lag))
        return float(pos[k]) if k < len(pos) else float("inf")

    # ------------------------------------------------------------------ the threads
    def _start(self, generation: int, span: tuple) -> None:
        """FETCHERS daemon threads walk the spans in order of first use: a unit another thread or
        process is fetching is waited for (its lock); past the cache's room, the next unit waits
        until the reader has moved on (eviction makes room by then)."""
        lock, it = threading.Lock(), iter(range(len(span[0])))

        def worker():
            while self._current(generation):
                with lock:
                    k = next(it, None)
                if k is None:
                    return
                self._fetch_when_room(generation, k, span)
        self._threads = [threading.Thread(target=worker, name="fastload-prefetch", daemon=True)
                         for _ in range(FETCHERS)]
        for t in self._threads:
            t.start()

    def _current(self, generation: int) -> bool:
        return generation == self._generation

    def _fetch_when_room(self, generation: int, k: int, span: tuple) -> None:
        u = int(span[0][k])
        # a unit whose fetch failed after its retries is left to the reader's own fetch, which
        # raises the named error (a new schedule does not try it 6 more times first)
        while self._current(generation) and not self.cache.failed(u):
            if not self._fits_ahead(k, span):  # not before the units needed sooner have room
                self._wait(generation)
                continue
            try:
                self.cache.fetch(u)  # waits for another fetcher of it (this node's lock), then finds it present
                return
            except CacheFull:
                self._wait(generation)
            except Exception:  # noqa: BLE001 - the reader's own fetch raises it, named, if it persists
                return

    def _wait(self, generation: int) -> None:
        """Until the reader moves on, a new schedule or a stop (or another process's eviction,
        which says nothing here: looked at again after a while)."""
        with self._cond:
            position = self._position
            self._cond.wait_for(lambda: self._position != position or not self._current(generation),
                                timeout=_ROOM_RECHECK_S)

    def _fits_ahead(self, k: int, span: tuple) -> bool:
        """Whether span ``k`` (a unit, from its first use to its last) and every span that starts
        before it and is still in use fit in the cache: a prefetch further ahead would evict what
        it fetched before its use."""
        if self.cache.limit is None:
            return True
        _, _, last, sizes = span  # sorted by first use: spans 0..k start no later than k
        still = last[:k + 1] >= self._position - self._lag
        return int(sizes[:k + 1][still].sum()) <= self.cache.cache_budget() - self.cache.slack
