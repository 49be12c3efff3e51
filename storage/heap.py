"""The process-wide heap policy of a process that reads a dataset (glibc only).

Any loader: at each epoch's end, :func:`release_free_pages` returns the heap's free pages to the
system (``malloc_trim``). glibc raises its mmap threshold to the size of every mmapped block
freed (up to 32 MB), so after the first epochs a backend's buffers and batches come from the
heap, and its arenas keep what is freed: the reference backend's main process swung between 370
and 890 MB over 80 epochs, 309 MB flat with the trim. Fixing the mmap threshold (512 KiB) kept
every backend flat, the DALI backend too, but every larger tensor of the training step was then
mapped afresh: a CPU training test ran 12 s -> 20 s, so it is not done. The DALI backend's
decoded regions come from DALI's own pool instead (``pipelines/dali_engine.py``).

A process that streams a dataset, besides:

Each download's body is a fresh buffer of a unit's size, or of a 32 MiB piece of a larger unit
(cache.PIECE_BYTES), and the client's copy of it.
glibc serves such a buffer with its own mmap, or trims it off the heap once the fetchers free
theirs, so its every page is faulted in and zeroed again per unit: 100-150k page faults and
~0.3 s of CPU per 444 MB here, on the cores that decode. So buffers up to 32 MB come from the
heap, and freed heap is kept for what the fetchers hold at once (two copies of a unit each).
Left alone where the user set glibc's malloc tunables, and off glibc. Applied once per process
by :func:`keep_unit_buffers_on_the_heap`, which the dataset opener calls.
"""
from __future__ import annotations

import ctypes
import os
import platform
import threading

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for it on 64-bit
_lock = threading.Lock()
_kept: int | None = 0  # the largest unit the heap is set for so far (None: left alone)
_trim = None           # glibc's malloc_trim, once looked up (False: none)


def user_tuned_malloc() -> bool:
    """Whether this process runs off glibc, or under the user's own malloc settings."""
    return (platform.libc_ver()[0] != "glibc" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ))


def release_free_pages() -> None:
    """The heap's free pages, in every arena, back to the system: glibc only, not under the user's
    own malloc settings, nor in a streaming process (its heap is kept for the next units, below)."""
    global _trim
    if _trim is None:
        _trim = False if user_tuned_malloc() else getattr(ctypes.CDLL(None), "malloc_trim", False)
    if _trim and not _kept:
        _trim(0)


def keep_unit_buffers_on_the_heap(unit_bytes: int, fetchers: int) -> None:
    """The heap set for ``fetchers`` concurrent downloads of units of at most ``unit_bytes``."""
    global _kept
    with _lock:
        if _kept is None or unit_bytes <= _kept:
            return
        first, _kept = _kept == 0, None  # left alone unless both settings below take
        if user_tuned_malloc():
            return
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is None:
            return
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        # the trim threshold alone would also stop glibc's own raising of the mmap one: both, or neither
        if (not first or mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and mallopt(
                _M_TRIM_THRESHOLD, min(2 * fetchers * unit_bytes + (64 << 20), 1 << 30)):
            _kept = unit_bytes
