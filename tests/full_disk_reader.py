"""Reads a dataset from the in-memory store through a cache on a disk too small for it, in its own
process (test_storage.py): a SIGBUS kills this process, not the test run. Prints one line: how it
ended.

    python tests/full_disk_reader.py DATASET_DIR CACHE_DIR
"""
import sys
import warnings

from fastload import FastLoader
from fastload.formats.manifest import DatasetError
from fastload.testing.memory_store import memory_store

warnings.simplefilter("ignore")
with memory_store() as store:
    url = store.upload(sys.argv[1], "d")
    try:
        loader = FastLoader(url, "validation", batch_size=32, backend="ffcv", cache_dir=sys.argv[2],
                            spec="imagenet:train", seed=3, num_workers=2)
        print(f"read {sum(len(y) for _, y in loader)} samples")
    except DatasetError as e:
        print(f"DatasetError: {e}")
