"""Opening a dataset wherever it lies: :func:`open_dataset`, the one entry to fastload's storage.

A local path is read in place. A URL is read through the node-local cache (storage/cache.py):
its manifest fetched and checked, its files laid out sparse under the cache, and a
:class:`RemoteDataset` (formats/source.py's ``DatasetBytes``) that fills them as readers ask.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from fastload.formats.errors import DatasetError
from fastload.formats.manifest import CHECKSUM_FROM_VERSION, CHECKSUM_KEY, MANIFEST, Manifest, parse_manifest
from fastload.formats.units import UnitTable
from fastload.formats.writing import atomic_write_bytes

from .cache import CACHE_ENV, FETCHERS, UnitCache, dataset_cache_dir, default_cache_dir, download_pieces
from .heap import keep_unit_buffers_on_the_heap
from .location import Store, StoreError, is_url, local_path
from .split import RemoteSplit


def check_cache_options(cache_dir, cache_limit) -> tuple[Path | None, int | None]:
    """``cache_dir`` and ``cache_limit`` as given to a loader, checked whatever the location (a
    wrong value is said at once, not when the dataset one day moves to a store)."""
    if cache_limit is not None and (not isinstance(cache_limit, int) or isinstance(cache_limit, bool)
                                    or cache_limit < 1):
        raise ValueError(f"cache_limit={cache_limit!r} is invalid: allowed bytes as an int >= 1, or None "
                         "(no limit but the disk)")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ValueError(f"cache_dir={cache_dir!r} is invalid: allowed a directory path, or None "
                         f"(${CACHE_ENV}, else ~/.cache/fastload)")
    return (Path(cache_dir) if cache_dir is not None else None), cache_limit


class RemoteDataset:
    """A remote dataset's bytes (``DatasetBytes``): its files under the node's cache, filled by
    units from the store as its splits' readers ask."""

    def __init__(self, cache: UnitCache):
        self.cache = cache
        self.units = cache.table

    def fetch_file(self, path: str, progress=None) -> None:
        self.cache.fetch_file(path, progress)

    def open_split(self, data_paths: list[str], records: np.ndarray, crcs: np.ndarray | None) -> RemoteSplit:
        return RemoteSplit(self.cache, data_paths, records, crcs)


def open_dataset(location, cache_dir=None, cache_limit: int | None = None) -> Manifest:
    """The dataset at a path or a URL (s3://, gs://, hf://, https://: storage/location.py), its
    manifest checked. A remote one is read through the node-local cache at ``cache_dir`` (default
    ``$FASTLOAD_CACHE_DIR``, else ``~/.cache/fastload``), holding at most ``cache_limit`` bytes."""
    cache_dir, cache_limit = check_cache_options(cache_dir, cache_limit)
    if not is_url(location):
        return Manifest.read(local_path(location))
    return open_store(Store(location.rstrip("/")), cache_dir, cache_limit)


def open_store(store: Store, cache_dir: Path | None = None, cache_limit: int | None = None) -> Manifest:
    """The dataset at ``store`` (a :class:`Store`, or an object with its interface) through the
    node-local cache: what :func:`open_dataset` does for a URL."""
    url = store.url
    try:
        raw = bytes(store.read(MANIFEST))
    except StoreError as e:
        if e.kind == "missing":
            raise DatasetError(f"{url} has no {MANIFEST}, so it is not a complete fastload dataset (a conversion "
                               "to it may be running or was interrupted: rerun the same `fastload convert`)") from None
        raise
    data = parse_manifest(raw, f"{url}/{MANIFEST}")
    # the cache directory's name: the manifest's checksum (checked above), else its bytes'
    key = data[CHECKSUM_KEY] if data["format_version"] >= CHECKSUM_FROM_VERSION else hashlib.sha256(raw).hexdigest()
    root = dataset_cache_dir(cache_dir or default_cache_dir(), url, key)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not (root / MANIFEST).exists():
            atomic_write_bytes(root / MANIFEST, raw, durable=False)
    except OSError as e:
        raise DatasetError(f"cache directory {root} cannot be written ({e}): give cache_dir= or "
                           f"${CACHE_ENV} a writable place") from None
    cache = UnitCache(store, root, UnitTable(data), cache_limit)
    # the largest buffer a fetcher holds: a unit, or a piece of one
    keep_unit_buffers_on_the_heap(max((b - a for u in cache.units for a, b in download_pieces(u)), default=0),
                                  FETCHERS)
    return Manifest(root, data, RemoteDataset(cache), url)
