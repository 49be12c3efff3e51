"""What a reader needs from wherever a dataset's bytes come from: a small protocol.

A :class:`~fastload.formats.records.SplitReader` reads files under ``manifest.root`` by the
contract alone; the source behind them makes the bytes present first. A local directory has
them all (:class:`LocalBytes`: nothing to do). A dataset in object storage is read through a
node-local cache that fetches them (``fastload.storage``), which implements the same protocol:
the reader, and the backends that ask it, never know which.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .units import UnitTable


class SplitBytes(Protocol):
    """The bytes of one split's samples."""

    #: whether bytes may change under a reader (a cache another process evicts from): such bytes
    #: are always checked as read, and decoders get checked copies, not views
    volatile: bool

    def ensure(self, index: np.ndarray) -> None:
        """Samples ``index``'s bytes present in their files (blocks until they are)."""

    def heal(self, i: int) -> bool:
        """Sample ``i`` failed its check as read: fetch it again. True when the caller should
        check it again; False when there is nothing to fetch it from (or the copy fails too)."""

    def close(self) -> None:
        """No more reads: background work for this split stops."""


class DatasetBytes(Protocol):
    """The bytes of a whole dataset, under its manifest's root."""

    units: UnitTable

    def fetch_file(self, path: str) -> None:
        """File ``path`` (the manifest's) present whole: a split's records index before it is read."""

    def open_split(self, data_paths: list[str], records: np.ndarray, crcs: np.ndarray | None) -> SplitBytes:
        """The source of one split's samples (``records``: its index, ``crcs``: their CRC32Cs or None)."""


class _Present:
    """A split whose bytes are all present and stay as they are."""
    volatile = False

    def ensure(self, index: np.ndarray) -> None:
        pass

    def heal(self, i: int) -> bool:
        return False  # nothing to fetch it again from

    def close(self) -> None:
        pass


class LocalBytes:
    """A dataset in a local (or shared-filesystem) directory: every byte is there already."""

    def __init__(self, data: dict):
        self._data = data
        self._units = None

    @property
    def units(self) -> UnitTable:
        if self._units is None:
            self._units = UnitTable(self._data)
        return self._units

    def fetch_file(self, path: str) -> None:
        pass

    def open_split(self, data_paths, records, crcs) -> SplitBytes:
        return _Present()
