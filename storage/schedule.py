"""A node's schedule of one split: what the loader's ranks on this node tell the prefetch, epoch
by epoch, and how a node's cache shapes the order it reads.

The ranks of a node share its cache, so the prefetch and eviction follow every local rank's
order, step by step (torchrun numbers ranks node by node: ``LOCAL_WORLD_SIZE``, ``LOCAL_RANK``).
An epoch's first batches are scheduled before it is iterated (the first epoch's while the loader
is made, the next epoch's during this one), unless the loader knows this epoch is the last. A
local dataset has nothing to schedule (:class:`LocalSchedule`).
"""
from __future__ import annotations

import os
import warnings
from typing import Protocol

import numpy as np

from .split import RemoteSplit

HEAD_BATCHES = 2  # an epoch's first batches fetched before it is iterated (the next epoch's during this one)
DEFAULT_WINDOW_UNITS = 8  # a shard-aware window where no cache sizes it


class EpochOrders(Protocol):
    """What the schedule asks the loader (pipelines/orders.py's sequences, its selection)."""

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's samples of an epoch, in order."""

    def global_samples(self, epoch: int) -> np.ndarray:
        """The epoch's global sequence of samples (rank r reads ``[r::world_size]``)."""


class LocalSchedule:
    """A dataset whose bytes are all present: the global random order, nothing to fetch."""

    def choose_order(self, order: str, name: str) -> str:
        return "random" if order == "auto" else order

    def window_units(self, units: np.ndarray) -> int:
        return DEFAULT_WINDOW_UNITS

    def start(self, epoch: int, batch: int) -> None:
        pass

    def begin_epoch(self, epoch: int, order: np.ndarray, skip: int) -> None:
        pass

    def advance(self, batches: int) -> None:
        pass

    def store_counters(self) -> tuple[int, float]:
        return 0, 0.0


class NodeSchedule:
    """The schedule of ``split`` (a :class:`RemoteSplit`) for one rank of a loader."""

    def __init__(self, split: RemoteSplit, orders: EpochOrders, *, rank: int, world_size: int, batch_size: int,
                 drop_last: bool, repeats: int, epochs: int | None):
        self.split, self.orders = split, orders
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.drop_last, self.repeats, self.epochs = drop_last, repeats, epochs
        self.local_ranks = max(1, min(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), world_size))
        self._local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._head = None  # (epoch, batch) whose first batches are scheduled
        self._ranks = 1    # ranks the current schedule interleaves

    # ------------------------------------------------------------------ the order's shape
    def choose_order(self, order: str, name: str) -> str:
        """'auto' is the global random order unless this node's share of the dataset outgrows its
        cache; then it is shard-aware, and a warning says so."""
        if order != "auto":
            return order
        if self.repeats > 1:
            return "random"
        cache = self.split.cache
        share = sum(cache.sizes.values()) * self.local_ranks / self.world_size
        budget = cache.cache_budget()
        if share <= budget:
            return "random"
        warnings.warn(f"{name}: this node's share of the dataset ({share / 2**30:.1f} GiB) outgrows its cache "
                      f"({budget / 2**30:.1f} GiB): order='shards' (shard-aware: each rank reads its own units, a "
                      "window at a time); pass order='random' for a global order", RuntimeWarning)
        return "shards"

    def window_units(self, units: np.ndarray) -> int:
        """Units per shuffle window, for samples in ``units``. A node's cache holds the files that
        stay (index files), and for each of its ranks the units its other ranks may still read
        (:meth:`lag`), a unit of slack (the backend's read-ahead, the next epoch's first units
        arriving at an epoch's end), the window being read and the next one arriving; the room
        left is split between those two windows (at least one unit). A cache with no slack
        evicts units before their last use and fetches them again (1.2-1.4x the bytes an epoch,
        measured in scripts/bench_shuffle.py). Sized on the units that hold samples, and rounded
        down to a power of two, so that nodes whose disks have about the same room agree without
        a cache_limit (give every node the same one to be sure)."""
        cache, local = self.split.cache, self.local_ranks
        used = np.unique(units)
        unit = max(1, sum(cache.units[u].size for u in used.tolist()) // max(1, len(used)))
        per_unit = max(1, len(units) // max(1, len(used)))
        lag_units = -(-self.lag(local) // local // per_unit) + 1  # per rank; +1: a window's edge
        fits = int((cache.cache_budget() - cache.staying) // (unit * local)) - lag_units - 1
        fits = max(1, fits // 2)
        return 1 << (fits.bit_length() - 1)

    def lag(self, local: int) -> int:
        """Positions a node's other ranks may be behind this one: one step. A rank yields batch b
        (and advances to its end) only once step b-1's gradients are reduced, so every other rank
        has taken batch b-1 and needs nothing before batch b (a lone rank's decoders are ahead of
        its position, never behind). Ranks that drift further apart (no collective each step)
        only fetch again a unit evicted early."""
        return self.batch_size * local if local > 1 else 0

    # ------------------------------------------------------------------ epochs
    def start(self, epoch: int, batch: int) -> None:
        """The next iteration (``epoch`` from ``batch``): its first batches start downloading now,
        not when the iteration asks for them. At most those batches' units are fetched for
        nothing, if another epoch or checkpoint is given before iterating."""
        if self._head == (epoch, batch):
            return
        self._head = (epoch, batch)
        head, local = self._node_head(epoch, batch)
        self.split.schedule_epoch(head, lag=self.lag(local))

    def begin_epoch(self, epoch: int, order: np.ndarray, skip: int) -> None:
        """Epoch ``epoch`` is iterated from position ``skip`` of this rank's ``order``: its units in
        the order this node uses them, then the next epoch's first batches (a training loop goes on
        to epoch + 1), fetched once this epoch's units leave room."""
        node_order, self._ranks = self._node_order(epoch, order, skip)
        follows = self.epochs is None or epoch + 1 < self.epochs
        then = self._node_head(epoch + 1, 0)[0] if follows else None
        self.split.schedule_epoch(node_order, lag=self.lag(self._ranks), then=then)
        self._head = (epoch + 1, 0) if follows else None

    def advance(self, batches: int) -> None:
        """This rank has taken ``batches`` batches since :meth:`begin_epoch`."""
        self.split.advance(batches * self.batch_size * self._ranks)

    def store_counters(self) -> tuple[int, float]:
        """(bytes downloaded, seconds reading waited on the store) so far, by this loader's processes."""
        return self.split.cache.meter.read()

    def _node_head(self, epoch: int, batch: int) -> tuple[np.ndarray, int]:
        """This node's samples of an epoch's first batches from ``batch`` on (a shard-aware order's
        first window per rank), and its ranks (as _node_order)."""
        node_order, local = self._node_order(epoch, self.orders.rank_order(epoch), batch * self.batch_size)
        return node_order[:HEAD_BATCHES * self.batch_size * local], local

    def _node_order(self, epoch: int, order: np.ndarray, skip: int) -> tuple[np.ndarray, int]:
        """The samples this node's ranks read from position ``skip`` on, step by step (ranks
        interleaved), and how many ranks that is."""
        local = self.local_ranks
        first = self.rank - self._local_rank
        if local <= 1 or self.repeats > 1 or not 0 <= first <= self.world_size - local:
            return order[skip:self._read_length(len(order))], 1
        g = self.orders.global_samples(epoch).reshape(-1, self.world_size)
        return g[skip:self._read_length(len(g)), first:first + local].reshape(-1), local

    def _read_length(self, n: int) -> int:
        """Positions of a rank's ``n`` that its batches read: drop_last's partial batch is not (its
        units, scheduled, were downloaded for no one, and held room to the epoch's end)."""
        return n // self.batch_size * self.batch_size if self.drop_last else n


def schedule_for(reader, orders: EpochOrders, **loader) -> LocalSchedule | NodeSchedule:
    """The schedule of a split reader's bytes: a node's, for a split read through the cache."""
    if isinstance(reader.source, RemoteSplit):
        return NodeSchedule(reader.source, orders, **loader)
    return LocalSchedule()
