"""The process-wide heap policy of a process that reads a dataset (glibc only).

Any loader: glibc raises its mmap threshold to the size of every mmapped block freed (up to
32 MB), so after the first epochs a backend's image buffers and batches come from the heap, whose
free space its threads' arenas keep and fragment: RSS grew by every epoch, without bound (the DALI
backend 0.3-0.5 MB an epoch, the reference backend's main process swung between 560 and 830 MB).
:func:`fix_thresholds` fixes the mmap threshold at 512 KiB (and the trim threshold at 128 MiB):
RSS stays flat over 80 epochs in every backend (tests/test_faults.py). Measured on 200 ImageNet
photos, train spec, 2 threads, median of 3: DALI 1,323 img/s against 1,357 (-2.5%), ffcv 1,579
against 1,550, reference 523 against 566 (-7.6%: its batches are mapped afresh). glibc's default
(128 KiB) cost DALI 11%; 1 MiB and above still grew.

A process that streams a dataset, besides:

Each download's body is a fresh buffer of a unit's size (8-32 MB), and the client's copy of it.
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
_MMAP = 512 << 10  # a loader's blocks from this size are mapped, and unmapped when freed
_TRIM = 128 << 20  # freed heap kept for reuse by any loader
_lock = threading.Lock()
_kept: int | None = 0  # the largest unit the heap is set for so far (None: left alone)
_fixed = False         # fix_thresholds applied (or left alone)


def user_tuned_malloc() -> bool:
    """Whether this process runs off glibc, or under the user's own malloc settings."""
    return (platform.libc_ver()[0] != "glibc" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ))


def _mallopt():
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def fix_thresholds() -> None:
    """The heap of a process that runs a loader: glibc's thresholds fixed (see above), once, unless
    a streaming policy (below) or the user's own malloc settings are in place."""
    global _fixed
    with _lock:
        if _fixed or _kept != 0:
            return
        _fixed = True
        if not user_tuned_malloc() and (mallopt := _mallopt()) is not None:
            mallopt(_M_MMAP_THRESHOLD, _MMAP)
            mallopt(_M_TRIM_THRESHOLD, _TRIM)


def keep_unit_buffers_on_the_heap(unit_bytes: int, fetchers: int) -> None:
    """The heap set for ``fetchers`` concurrent downloads of units of at most ``unit_bytes``."""
    global _kept
    with _lock:
        if _kept is None or unit_bytes <= _kept:
            return
        first, _kept = _kept == 0, None  # left alone unless both settings below take
        if user_tuned_malloc():
            return
        mallopt = _mallopt()
        if mallopt is None:
            return
        # the trim threshold alone would also stop glibc's own raising of the mmap one: both, or neither
        if (not first or mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and mallopt(
                _M_TRIM_THRESHOLD, min(2 * fetchers * unit_bytes + (64 << 20), 1 << 30)):
            _kept = unit_bytes
