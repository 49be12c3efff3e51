"""The check every backend makes of a sample's stored bytes as it reads them, before any decoder
sees them (``_samples.c``): its CRC32C against the records index (format version 3 on), and for a
JPEG its marker structure and frame size against the index. A sample that fails raises
:class:`~fastload.formats.records.SampleDecodeError` naming it, the same in every backend.

Cost, measured on 2 cores: about 1% of an ImageNet photo's decode, a few % of a raw CIFAR
image's copy (``scripts/bench_peers.py --no-checks`` measures it side by side).
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import native
from .jpeg import MESSAGE_LEN


class SampleChecks:
    """The checks for one split (a :class:`~fastload.formats.records.SplitReader`)."""

    def __init__(self, reader, enabled: bool = True):
        self.reader, self.enabled = reader, enabled
        self.crcs = reader.crcs
        self.jpeg = reader.codec == "jpeg"
        self.heights, self.widths = reader.heights, reader.widths

    def __call__(self, index: np.ndarray) -> None:
        """Check samples ``index``; raise the first failure's SampleDecodeError."""
        failure = self.first_failure(index)
        if failure is not None:
            raise self.reader.sample_error(*failure)

    def first_failure(self, index: np.ndarray) -> tuple[int, str] | None:
        """(sample, what is wrong) of the first of samples ``index`` that fails, or None."""
        if not self.enabled or not len(index):
            return None
        index = np.ascontiguousarray(index, np.int64)
        addresses, sizes = self.reader.stored_addresses(index)
        addresses, sizes = np.ascontiguousarray(addresses), np.ascontiguousarray(sizes)
        crcs = None if self.crcs is None else np.ascontiguousarray(self.crcs[index], np.uint32)
        heights, widths = np.ascontiguousarray(self.heights[index]), np.ascontiguousarray(self.widths[index])
        message = ctypes.create_string_buffer(MESSAGE_LEN)
        k = native.LIB.fl_check_samples(addresses.ctypes.data, sizes.ctypes.data,
                                        None if crcs is None else crcs.ctypes.data, heights.ctypes.data,
                                        widths.ctypes.data, len(index), self.jpeg, message, MESSAGE_LEN)
        return None if k < 0 else (int(index[k]), message.value.decode(errors="replace"))
