"""The check every backend makes of a sample's stored bytes as it reads them, before any decoder
sees them (``_samples.c``): its CRC32C against the records index (format version 3 on), and for a
JPEG its marker structure and frame size against the index. A sample that fails raises
:class:`~fastload.formats.records.SampleDecodeError` naming it, the same in every backend.

The ffcv backend makes the same call from its compiled loop (no Python per batch: on raw CIFAR
that overhead was a quarter of the time). Cost, measured by ``scripts/bench_peers.py``'s "no
checks" rows on 2 cores: see the README.
"""
from __future__ import annotations

import ctypes
import io

import numpy as np
from crc32c import crc32c
from PIL import Image

from . import native
from .jpeg import MESSAGE_LEN, size_disagrees


CHECK_CRC, CHECK_JPEG = 1, 2  # _samples.c's flags


class HealOnce:
    """The one heal rule: a sample that fails its check is fetched again once from where its bytes
    came from (``reader.heal``: a remote dataset's store) and checked again; failing again, or
    with nothing to fetch it from (a local dataset), its failure stands. One per batch of checks."""

    def __init__(self, reader):
        self.reader, self.healed = reader, set()

    def retry(self, i: int) -> bool:
        """True when sample ``i`` was fetched again: check it again. False: raise its failure."""
        i = int(i)
        if i in self.healed or not self.reader.heal(i):
            return False
        self.healed.add(i)
        return True


class SampleChecks:
    """The checks for one split (a :class:`~fastload.formats.records.SplitReader`); ``what`` is
    the flags ``fl_check_samples`` takes (compiled code calls it itself, ``crcs`` for its arguments)."""

    def __init__(self, reader, enabled: bool = True):
        # bytes that may change under a reader (a remote dataset's cache) are always checked: a
        # unit evicted or changed on disk is seen here, and fetched again (SplitReader.heal)
        enabled = enabled or reader.volatile
        self.reader, self.enabled = reader, enabled
        has_crc = reader.crcs is not None
        self.crcs = np.ascontiguousarray(reader.crcs if has_crc else np.zeros(len(reader)), np.uint32)
        self.what = (CHECK_CRC * has_crc | CHECK_JPEG * (reader.codec == "jpeg")) if enabled else 0
        self.heights, self.widths = reader.heights, reader.widths

    def __call__(self, index: np.ndarray) -> None:
        """Check samples ``index``; raise the first failure's SampleDecodeError."""
        failure = self.first_failure(index)
        if failure is not None:
            raise self.reader.sample_error(*failure)

    def first_failure(self, index: np.ndarray) -> tuple[int, str] | None:
        """(sample, what is wrong) of the first of samples ``index`` that fails, or None. A remote
        dataset's failing sample is fetched again from the store once before it counts."""
        heal = HealOnce(self.reader)
        while True:
            failure = self._first_failure(index)
            if failure is None or not heal.retry(failure[0]):
                return failure

    def read_checked(self, i: int) -> np.ndarray:
        """A private copy of sample ``i``'s bytes, checked: what a decoder may then read at leisure.
        (A view of a remote dataset's cache could change between its check and its decode: a unit
        evicted meanwhile by another rank.) A failure raises, after one heal for a remote dataset."""
        i, heal = int(i), HealOnce(self.reader)
        while True:
            data = np.array(self.reader.stored(i))
            failure = self._first_failure(np.array([i]), data)
            if failure is None:
                return data
            if not heal.retry(i):
                raise self.reader.sample_error(*failure)

    def _first_failure(self, index: np.ndarray, copy: np.ndarray | None = None) -> tuple[int, str] | None:
        if not self.what or not len(index):
            return None
        index = np.ascontiguousarray(index, np.int64)
        if copy is not None:  # one sample's bytes, copied out
            addresses, sizes = np.array([copy.ctypes.data], np.uint64), np.array([copy.size], np.uint64)
        else:
            addresses, sizes = self.reader.stored_addresses(index)
        addresses, sizes = np.ascontiguousarray(addresses), np.ascontiguousarray(sizes)
        crcs = self.crcs[index]
        heights, widths = np.ascontiguousarray(self.heights[index]), np.ascontiguousarray(self.widths[index])
        if native.LIB is None:
            return _python_failure(self.reader, index, crcs, heights, widths, self.what, copy)
        message = ctypes.create_string_buffer(MESSAGE_LEN)
        k = native.LIB.fl_check_samples(addresses.ctypes.data, sizes.ctypes.data, crcs.ctypes.data,
                                        heights.ctypes.data, widths.ctypes.data, len(index), self.what, message,
                                        MESSAGE_LEN)
        return None if k < 0 else (int(index[k]), message.value.decode(errors="replace"))


def _python_failure(reader, index, crcs, heights, widths, what, copy) -> tuple[int, str] | None:
    """The checks without the C library (a source install without libjpeg's headers): the same
    CRC32C (the crc32c package), and for a JPEG PIL's reading of its header (an RGB JPEG of the
    records index's size); a file cut short is then left to the decoder, PIL's, to refuse."""
    for k, i in enumerate(index):
        data = copy if copy is not None else reader.stored(int(i))
        if what & CHECK_CRC and (crc := crc32c(data)) != crcs[k]:
            return int(i), (f"its bytes do not match their checksum (crc32c {crc:08x}, the records index says "
                            f"{int(crcs[k]):08x}): the data file is damaged")
        if what & CHECK_JPEG:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    kind, size = (im.format, im.mode), im.size
            except Exception as e:  # PIL raises many types for bad data
                return int(i), f"not a readable JPEG ({type(e).__name__})"
            if kind != ("JPEG", "RGB"):
                return int(i), f"a {kind[0]} image in mode {kind[1]}, not an RGB JPEG"
            if size != (widths[k], heights[k]):
                return int(i), size_disagrees(*size, widths[k], heights[k])
    return None
