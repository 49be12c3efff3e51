"""A dataset's units of transfer, numbered once for every reader of it.

A *unit* is a whole file (a records index; any file before format version 3), one chunk of a
.beton (``chunk_size`` / ``chunk_sha256`` in the manifest, version 4), or, from version 3 on, a
piece of a data file: each sample then carries its own CRC32C, so a unit needs no checksum of its
own and its size is the reader's choice. A split's data is cut into at least ``MIN_UNITS`` units
(of ``MIN_UNIT_BYTES`` at least): a cache that holds a quarter of any dataset then holds enough
units for a shuffle window and the next one (8 TFRecord shards, or one small .beton, are too few
units for that: a window of one unit and no room ahead cost 1.2-1.3x the bytes per epoch). Units
are numbered across the whole dataset, split by split, file by file in manifest order, each file
once. The shard-aware order groups samples by unit and a remote cache fetches, marks and evicts
units, both by these numbers; within one split they increase with the file and the offset, so
an order that ranks units is the same whichever split is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .versions import CHECKSUM_FROM_VERSION

MIN_UNITS = 64              # data units a split is cut into at least (from format version 3)
MIN_UNIT_BYTES = 4 << 20    # but none smaller: a request has a cost, and a sample that straddles two
                            # units is read by range beside them (about one sample per unit)


@dataclass(frozen=True)
class Unit:
    index: int
    path: str        # the manifest's path of the file it is part of
    start: int       # byte range in that file
    end: int
    sha256: str | None  # of the unit (an index file, a .beton chunk before version 3), else of its file
    evictable: bool  # data; an index file stays once fetched
    # a data unit from format version 3 on: every sample in it has a CRC32C, which every backend
    # checks as it reads (a remote dataset's always), so its sha256 would be a second pass
    by_samples: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start


class UnitTable:
    """Every unit of a dataset (``data``: its checked manifest)."""

    def __init__(self, data: dict):
        sample_crcs = data["format_version"] >= CHECKSUM_FROM_VERSION
        self.units: list[Unit] = []
        self.first_unit: dict[str, int] = {}
        self.chunk_size: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        for split in data["splits"].values():
            data_bytes = sum(int(f["size"]) for f in split["files"] if f["role"] == "data")
            piece = max(MIN_UNIT_BYTES, -(-data_bytes // MIN_UNITS))
            for f in split["files"]:
                if f["path"] in self.first_unit:
                    continue
                path, size, chunk = f["path"], int(f["size"]), f.get("chunk_size")
                is_data = f["role"] == "data"
                if is_data and sample_crcs:  # pieces of the reader's size, each sample checked as read
                    chunk = min(int(chunk) if chunk else max(size, 1), piece)
                    hashes = [f.get("sha256")] * max(1, -(-size // chunk))
                else:
                    hashes = f.get("chunk_sha256") if chunk else [f.get("sha256")]
                    chunk = int(chunk) if chunk else max(size, 1)
                self.first_unit[path], self.chunk_size[path], self.sizes[path] = len(self.units), chunk, size
                for k, h in enumerate(hashes):
                    self.units.append(Unit(len(self.units), path, k * chunk, min(size, (k + 1) * chunk),
                                           h if isinstance(h, str) else None, is_data, is_data and sample_crcs))

    def __len__(self) -> int:
        return len(self.units)

    def of_file(self, path: str) -> list[int]:
        first = self.first_unit[path]
        return [u.index for u in self.units[first:] if u.path == path]

    def of_samples(self, data_paths: list[str], records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first unit, last unit) of each row of a records index whose ``file`` field indexes
        ``data_paths`` (a sample may straddle two chunks)."""
        file = np.asarray(records["file"]).astype(np.int64)
        offset = np.asarray(records["offset"]).astype(np.int64)
        size = np.asarray(records["size"]).astype(np.int64)
        first = np.array([self.first_unit[p] for p in data_paths], np.int64)
        chunk = np.array([self.chunk_size[p] for p in data_paths], np.int64)
        if not len(data_paths):
            return np.zeros(len(file), np.int64), np.zeros(len(file), np.int64)
        return (first[file] + offset // chunk[file],
                first[file] + np.maximum(offset + size - 1, offset) // chunk[file])
