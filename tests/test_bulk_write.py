"""BulkFile: the file and its checksum are exactly what was written, past the page cache or
through it, across pieces, with items larger than a piece and a last block cut short."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fastload.formats.bulk_write import ALIGN, PIECE_BYTES, BulkFile


@pytest.mark.parametrize("direct", [True, False])
def test_bulk_file_holds_exactly_what_was_written(tmp_path, direct):
    rng = np.random.default_rng(0)
    sizes = [1, ALIGN - 1, ALIGN + 1, PIECE_BYTES - 10, 3, PIECE_BYTES + 12345, 7, 2 * PIECE_BYTES + 1, 100, 0, 5]
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    counted = []
    f = BulkFile(tmp_path / "x.bin", progress=counted.append, direct=direct)
    assert f.direct or not direct or pytest.skip("this filesystem has no O_DIRECT")
    for k, part in enumerate(parts):
        if k % 2:
            f.write(part.tobytes())
        else:
            f.take(part.size, samples=1)[:] = part  # filled in place, as the .beton writer reads samples in
    f.close()
    expected = np.concatenate(parts).tobytes()
    written = (tmp_path / "x.bin").read_bytes()
    assert len(written) == f.size == len(expected) and written == expected
    assert f.sha256.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert sum(counted) == (len(parts) + 1) // 2  # every taken item counted once it was written


def test_bulk_file_abandoned_stops_its_threads(tmp_path):
    import threading
    before = threading.active_count()
    f = BulkFile(tmp_path / "x.bin")
    f.write(b"x" * (3 * PIECE_BYTES))  # pieces in flight
    f.abandon()
    assert threading.active_count() == before and f.fd == -1
