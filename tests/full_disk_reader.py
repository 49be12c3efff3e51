"""Reads a remote dataset through a cache on a disk too small for it, in its own process
(test_remote.py): a SIGBUS kills this process, not the test run. Prints one line: how it ended.

    python tests/full_disk_reader.py URL CACHE_DIR
"""
import sys
import warnings

from fastload import FastLoader
from fastload.formats.manifest import DatasetError

warnings.simplefilter("ignore")
try:
    loader = FastLoader(sys.argv[1], "validation", batch_size=32, backend="ffcv", cache_dir=sys.argv[2],
                        spec="imagenet:train", seed=3, num_workers=2)
    print(f"read {sum(len(y) for _, y in loader)} samples")
except DatasetError as e:
    print(f"DatasetError: {e}")
