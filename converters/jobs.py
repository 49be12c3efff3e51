"""What a long conversion job needs around its work: one writer per output directory, workers
that do not outlive the job, memory that does not grow with the source, and a clear word when
the disk fills up."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

LOCK = ".lock"
PARTIAL = ".partial"  # an unfinished conversion's progress, inside its output directory
_PR_SET_PDEATHSIG = 1
_MADV_DONTNEED, _MADV_PAGEOUT = 4, 21  # PAGEOUT: Linux >= 5.4


class ConversionError(RuntimeError):
    """The conversion stopped; nothing final was written. ``cli``: the same message in the
    command line's words (its flags, not convert()'s arguments), where they differ."""

    def __init__(self, message: str, cli: str | None = None):
        super().__init__(message)
        self.cli = cli or message


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a ``kill -9`` of the job would
    otherwise leave its workers blocked on a pipe forever)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: nothing to ask
        pass


_in_job = False


def _after_fork_in_child() -> None:
    if _in_job:
        die_with_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class children_die_with_parent:
    """Every process forked in this block (ffcv's writer workers too) dies with this process."""

    def __enter__(self):
        global _in_job
        _in_job = True
        return self

    def __exit__(self, *exc):
        global _in_job
        _in_job = False
        return False


class OutputLock:
    """An exclusive lock on an output directory, held for the whole conversion.

    ``flock`` on ``<out>/.lock``: the kernel releases it when the holder dies (kill -9 included),
    so there is no stale lock to clean up; the file holds the owner's pid for the message."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fd = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConversionError(f"{self.path.parent} is being written by another conversion ({owner}): wait for "
                                  "it to finish or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        return False


def disk_full_error(directory: Path, error: OSError) -> ConversionError:
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return ConversionError(f"the disk holding {directory} is full ({error.strerror}; {free}): free some space or "
                           "choose another --out, then rerun the same command (finished shards are kept)")


@contextmanager
def full_disk_reported(directory: Path):
    """A full disk (or quota) inside the block becomes the one-line :func:`disk_full_error`."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(directory, e) from None
        raise


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse before writing ``needed`` bytes into ``directory`` when they cannot fit."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise ConversionError(f"{directory} needs about {needed / 2**20:.0f} MB for the next file and the disk has "
                              f"{free / 2**20:.0f} MB free: free some space or choose another --out, then rerun the "
                              "same command (finished shards are kept)")


def _arrow_maps() -> list[tuple[int, int]]:
    """(start, end) of this process's read-only maps of ``.arrow`` files, from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".arrow") and "w" not in fields[1]:
            ranges.append(tuple(int(v, 16) for v in fields[0].split("-")))
    return ranges


def _madvise(ranges, advice: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):  # not Linux: nothing to release
        return
    for start, end in ranges:
        libc.madvise(start, end - start, advice)


class SourcePages:
    """Drops this process's resident pages of a source's memory-mapped Arrow files.

    ``datasets`` reads its Arrow files through memory maps: every page read stays in the reading
    process's RSS until unmapped, so a job over a 3 GB source would grow by 3 GB however little
    it holds. The pages are clean copies of the page cache: ``MADV_DONTNEED`` drops them from
    this process, and a later read maps them again from the cache. Only maps holding a buffer
    of ``data`` are touched: those cannot be unmapped (nor their addresses reused) while
    ``data`` lives, where DONTNEED on a map another thread had just unmapped would zero
    whatever memory took its place. Linux only; elsewhere a no-op."""

    def __init__(self, data: dict):
        addresses = []
        for ds in data.values():
            if not getattr(ds, "cache_files", None):
                continue  # an in-memory dataset: nothing mapped
            table = ds.data.table if hasattr(ds.data, "table") else ds.data
            for column in table.columns:
                for chunk in column.chunks:
                    addresses += [b.address for b in chunk.buffers() if b is not None and b.size]
        self.data = data  # keeps the maps alive
        self.live = np.unique(np.asarray(addresses, np.uint64))

    def release(self) -> None:
        if not len(self.live):
            return
        ours = []
        for start, end in _arrow_maps():
            k = np.searchsorted(self.live, start)
            if k < len(self.live) and self.live[k] < end:
                ours.append((start, end))
        _madvise(ours, _MADV_DONTNEED)


@contextmanager
def pages_released_while_opening(every: float = 0.02):
    """Opening a dataset maps 64 KB of its Arrow files around each record batch header (the
    kernel's fault-around): ~0.8 GB for 1.3 M CIFAR images, in one ``datasets`` call. While the
    block runs, every ``every`` seconds, ``MADV_PAGEOUT`` reclaims the pages of every Arrow map.
    No buffer is known yet to pin those maps, so not DONTNEED (see :func:`release_source_pages`):
    PAGEOUT never loses data, wherever it lands (at worst it swaps pages out). Linux >= 5.4."""
    import threading
    stop = threading.Event()

    def loop():
        while not stop.wait(every):
            _madvise(_arrow_maps(), _MADV_PAGEOUT)
    thread = threading.Thread(target=loop, name="fastload-release-arrow-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
