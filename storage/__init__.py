"""Where a dataset's bytes come from: the storage layer, beneath the readers.

- ``location.py``: local paths and URLs, and :class:`Store`, the one client of object storage
  (retries, timeouts, one named error); ``obstore_reads.py``: its ``s3://`` reads through obstore;
- ``cache.py``: the node-local unit cache shared by a node's ranks (locks, markers, eviction);
- ``split.py`` and ``prefetch.py``: one split read through that cache, and its prefetch in the
  order the reader will use (``schedule_epoch`` / ``advance``);
- ``schedule.py``: what a node's ranks tell the prefetch each epoch, and the shard-aware order's
  window when a node's share outgrows its cache;
- ``heap.py``: the heap policy of a process that reads a dataset (free pages returned each epoch) or streams one;
- ``dataset.py``: :func:`open_dataset`, the one entry.

It builds on ``fastload.formats`` (the contract: what the bytes mean), whose readers know only
formats/source.py's protocol; nothing in ``formats`` imports from here.
"""
from .dataset import check_cache_options, open_dataset
from .location import Store, StoreError, is_url, local_path

__all__ = ["open_dataset", "check_cache_options", "Store", "StoreError", "is_url", "local_path"]
