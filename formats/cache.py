"""The node-local cache of a dataset in object storage.

Layout: ``<cache_dir>/<url slug>-<url hash>/<manifest checksum>/`` holds ``manifest.json`` and,
for every file the manifest lists, a file of the listed size at the listed path: sparse until
filled. A remote dataset therefore reads like a local one (the same maps, offsets and addresses);
only which byte ranges hold data differs.

The unit of transfer is a *unit*: a whole file (a TFRecord shard, the records index) or one
chunk of a large one (a run of .beton pages, ``chunk_size`` / ``chunk_sha256`` in the manifest,
format version 4). A unit is fetched whole, checked (an index file, or any file before format
version 3, against the manifest's sha256; a data unit by its length, its samples' CRC32Cs being
checked as they are read), written in place, and only then marked present: a marker file
``.units/<unit>-<sha256>``, created by an atomic rename. Nothing else records state: a process killed mid-fetch leaves a unit without a
marker (fetched again by whoever needs it next) and a lock that the kernel releases with it.

The ranks of a node share the directory. A unit is fetched under an exclusive ``flock`` of its own
lock file, so each unit is downloaded once per node; the others find the marker when the lock
is theirs. Past ``cache_limit``, the present unit needed furthest in the future (by the
consumer's known order) is evicted: its marker removed, its range punched out of the file.

Samples are read before their unit is present when the dataset has per-sample CRC32Cs (format
version 3 on): a range request for each sample of the batch at hand, checked against its CRC,
so the first batch does not wait for the whole dataset. Every sample's bytes are checked again
by the backends as they read them (``pipelines/samples.py``); a sample whose cached bytes fail
(a unit evicted by another rank meanwhile, a cached file changed on disk) is fetched again,
once, from the store (:meth:`RemoteSplit.heal`) before its failure counts.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .location import Store, StoreError
from .manifest import MANIFEST, DatasetError, atomic_write_bytes, contained_path
from .records import CHECKSUM_FROM_VERSION

CACHE_ENV = "FASTLOAD_CACHE_DIR"
log = logging.getLogger("fastload.cache")  # fetches and evictions, at DEBUG
FETCHERS = 8  # concurrent unit downloads per process: enough to hide a store's per-request latency
SAMPLE_FETCHERS = 32  # concurrent sample range requests (the first batches of a cold cache)
# a batch waits for its absent units whole when they hold at most this many times its bytes in them
# (so range reads, which the units then download again, are for a cold start over a large dataset)
WAIT_FOR_UNITS = 32
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_INSTANCES: "weakref.WeakSet[RemoteFiles]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for files in list(_INSTANCES):
        files._new_locks()


os.register_at_fork(after_in_child=_after_fork_in_child)


class CacheFull(DatasetError):
    """cache_limit leaves no room for the unit needed now."""


def default_cache_dir() -> Path:
    """``$FASTLOAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastload``, else ``~/.cache/fastload``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastload"


def dataset_cache_dir(cache_dir: Path, url: str, manifest_key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-80:]
    return Path(cache_dir) / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}" / manifest_key[:32]


def check_cache_limit(cache_limit) -> int | None:
    if cache_limit is None:
        return None
    if not isinstance(cache_limit, int) or isinstance(cache_limit, bool) or cache_limit < 1:
        raise ValueError(f"cache_limit={cache_limit!r} is invalid: allowed bytes as an int >= 1, or None "
                         "(no limit but the disk)")
    return cache_limit


@dataclass(frozen=True)
class Unit:
    index: int
    path: str       # the manifest's path of the file it is part of
    start: int      # byte range in that file
    end: int
    sha256: str
    evictable: bool  # data; an index file stays once fetched
    # checked by its samples' CRC32Cs, which every backend checks as it reads them (and a remote
    # dataset's always): a data unit from format version 3 on. Its sha256 too would be a second
    # pass over the same bytes on the decoding cores (0.4 s per 444 MB here, 4% of an epoch)
    by_samples: bool = False


def _libc_fallocate():
    libc = ctypes.CDLL(None, use_errno=True)
    f = libc.fallocate
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return f


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for it on 64-bit
_heap_kept: int | None = 0  # the largest unit the heap is set for so far (None: left alone)


def _keep_unit_buffers_on_the_heap(unit_bytes: int) -> None:
    """Each download's body is a fresh buffer of a unit's size (8-32 MB), and the client's copy
    of it. glibc serves such a buffer with its own mmap, or trims it off the heap once the
    fetchers free theirs, so its every page is faulted in and zeroed again per unit: 100-150k
    page faults and ~0.3 s of CPU per 444 MB here, on the cores that decode. So, in a process
    that streams a dataset, buffers up to 32 MB come from the heap, and freed heap is kept for
    what the fetchers hold at once (two copies of a unit each). Left alone where the user set
    glibc's malloc tunables, and off glibc."""
    global _heap_kept
    if _heap_kept is None or unit_bytes <= _heap_kept:
        return
    first, _heap_kept = _heap_kept == 0, None  # left alone unless both settings below take
    import platform
    if (platform.libc_ver()[0] != "glibc" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the trim threshold alone would also stop glibc's own raising of the mmap one: both, or neither
    if (not first or mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and mallopt(
            _M_TRIM_THRESHOLD, min(2 * FETCHERS * unit_bytes + (64 << 20), 1 << 30)):
        _heap_kept = unit_bytes


class RemoteFiles:
    """The units of one remote dataset and their local copies under ``root``."""

    def __init__(self, store: Store, root: Path, data: dict, cache_limit: int | None):
        self.store, self.root, self.limit = store, Path(root), cache_limit
        self._sample_crcs = data["format_version"] >= CHECKSUM_FROM_VERSION
        self.units: list[Unit] = []
        self.first_unit: dict[str, int] = {}
        self.chunk_size: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        for split in data["splits"].values():
            for f in split["files"]:
                if f["path"] in self.first_unit:
                    continue
                self._add_units(f)
        (self.root / ".units").mkdir(exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)
        (self.root / ".reserved").mkdir(exist_ok=True)
        self._present = bytearray(len(self.units))
        self._new_locks()
        _INSTANCES.add(self)
        self.next_use = None  # the consumer's plan: unit -> position of its next use (eviction order)
        self.bytes_fetched = 0  # this process's downloads (units and sample ranges), for the benchmarks
        self.loose: set[int] = set()  # units not present that this process wrote samples into
        self.in_flight = frozenset  # () -> units of the batches this process is reading (RemoteSplit's)
        self.on_evict = lambda u: None  # RemoteSplit: its samples in unit u are no longer ready
        self._make_files()
        _keep_unit_buffers_on_the_heap(max((u.end - u.start for u in self.units), default=0))

    def _new_locks(self) -> None:
        """This process's locks (again in a forked child: a lock held by a parent's thread at the
        fork would stay held there forever)."""
        self._thread_locks = [threading.Lock() for _ in self.units]
        self._failed: dict[int, tuple[float, str]] = {}  # unit -> (when, why) its last fetch failed
        self._evict_lock, self._room_lock, self._count_lock = threading.Lock(), threading.Lock(), threading.Lock()

    def _add_units(self, f: dict) -> None:
        path, size = f["path"], int(f["size"])
        chunk = f.get("chunk_size")
        hashes = f.get("chunk_sha256") if chunk else [f.get("sha256")]
        chunk = int(chunk) if chunk else max(size, 1)
        if not hashes or any(not isinstance(h, str) for h in hashes):
            raise DatasetError(f"{self.store.url_of(path)} has no sha256 in the manifest: a remote dataset's files "
                               "are checked before use; convert it again with this fastload")
        self.first_unit[path], self.chunk_size[path], self.sizes[path] = len(self.units), chunk, size
        for k, h in enumerate(hashes):
            data = f["role"] == "data"
            self.units.append(Unit(len(self.units), path, k * chunk, min(size, (k + 1) * chunk), h, data,
                                   data and self._sample_crcs))

    def _make_files(self) -> None:
        """Every listed file at its listed size (sparse): the maps and offsets of a local dataset.
        Each file's path is checked once, here (a realpath per write or eviction was most of what
        a prefetch thread spent waiting for room)."""
        self._local = {path: contained_path(self.root, path, "file") for path in self.sizes}
        for path, size in self.sizes.items():
            local = self._local[path]
            local.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(local, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ units
    def _marker(self, u: Unit) -> Path:
        return self.root / ".units" / f"{u.index}-{u.sha256[:32]}"

    def present(self, u: int) -> bool:
        if self._present[u]:
            return True
        if self._marker(self.units[u]).exists():
            self._present[u] = 1
            return True
        return False

    def forget(self, u: int) -> None:
        """This process's belief that unit ``u`` is present, dropped (it was evicted or damaged)."""
        self._present[u] = 0

    def forget_all(self) -> None:
        self._present = bytearray(len(self.units))

    def fetch(self, u: int, wait: bool = True) -> bool:
        """Make unit ``u`` present (downloaded, checked, written, marked). ``wait=False``: give up
        at once (False) when another process or thread is fetching it."""
        if self.present(u):
            return True
        unit = self.units[u]
        asked = time.monotonic()
        with self._unit_lock(u, wait) as mine:
            if not mine:
                return False
            if self.present(u):  # fetched by the lock's previous holder
                return True
            failed = self._failed.get(u)
            if failed is not None and failed[0] >= asked:
                # the fetch this call waited for failed after all its retries: the same error, not
                # as many tries again per waiting batch (a store that is down is said once, soon)
                raise StoreError(failed[1])
            self._make_room(unit)
            log.debug("fetch unit %d (next use %s)", u, self._use_of(u))
            try:
                data = self._download(unit)
                self._write(unit.path, unit.start, data)
                atomic_write_bytes(self._marker(unit), b"", durable=False)
            except StoreError as e:
                self._failed[u] = (time.monotonic(), str(e))
                raise
            finally:
                self._unreserve(unit)
            self._failed.pop(u, None)
            self._present[u] = 1
            return True

    def failed(self, u: int) -> bool:
        """Whether unit ``u``'s last fetch in this process failed after all its retries."""
        return u in self._failed

    @contextlib.contextmanager
    def _unit_lock(self, u: int, wait: bool):
        """Unit ``u`` exclusively, node-wide (yields whether it is ours): this process's thread
        lock, then a POSIX lock of ``.locks/<u>``, which the kernel drops with a dead process and
        which a forked DataLoader worker does not inherit (a ``flock`` would be)."""
        tlock = self._thread_locks[u]
        if not tlock.acquire(blocking=wait):
            yield False
            return
        try:
            fd = os.open(self.root / ".locks" / str(u), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if not _lock_file(fd, wait):
                    yield False
                    return
                yield True
            finally:
                os.close(fd)  # releases the lock
        finally:
            tlock.release()

    def _download(self, unit: Unit) -> bytes:
        """The unit's bytes from the store, checked against the manifest: its sha256, or for a
        unit its samples check (``by_samples``), its length (a body that does not match is fetched
        again, as a truncated one is; a damaged sample is fetched again by range when it is read)."""
        size = unit.end - unit.start
        for attempt in range(self.store.retries + 1):
            data = self.store.read(unit.path, unit.start, unit.end)
            self._count(len(data))
            if len(data) == size and (unit.by_samples or hashlib.sha256(data).hexdigest() == unit.sha256):
                return data
        what = "sha256 in the manifest" if len(data) == size else f"size ({len(data)} bytes came, not {size})"
        raise StoreError(f"{self.store.url_of(unit.path)}: bytes {unit.start}..{unit.end} do not match their {what}, "
                         f"{self.store.retries + 1} downloads in a row: the stored file differs "
                         "from the one the manifest describes (convert it again)")

    def _count(self, n: int) -> None:
        with self._count_lock:
            self.bytes_fetched += n

    def _write(self, path: str, offset: int, data: bytes) -> None:
        local = self._local[path]
        view = memoryview(data)
        fd = os.open(local, os.O_WRONLY | os.O_CLOEXEC)
        try:
            while len(view):
                try:
                    n = os.pwrite(fd, view, offset)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise self._disk_error(e) from None
                    waited = 0
                    # a full disk: never the units of batches being read (on a full tmpfs, a mapped
                    # read of a punched page is SIGBUS, not zeros that fail their check)
                    while not (self._evict_one(exclude=None, busy=self.in_flight()) or self._drop_samples_read_ahead()):
                        # units being fetched may become evictable
                        if waited >= 20 or not self._reserved_bytes():
                            raise self._disk_error(e) from None
                        threading.Event().wait(0.1)
                        waited += 1
                    continue
                view, offset = view[n:], offset + n
        finally:
            os.close(fd)

    def _disk_error(self, e: OSError) -> DatasetError:
        if e.errno == errno.ENOSPC:
            return DatasetError(f"the cache directory {self.root} is on a full disk ({os.strerror(e.errno)}), "
                                "and nothing in it can be evicted: free space there, give a smaller cache_limit, "
                                f"or another cache_dir (${CACHE_ENV})")
        return DatasetError(f"the cache directory {self.root} cannot be written: {e}")

    # ------------------------------------------------------------------ samples before their unit
    def fetch_range(self, path: str, start: int, end: int) -> bytes:
        data = self.store.read(path, start, end)
        self._count(len(data))
        return data

    def write_range(self, path: str, start: int, data: bytes, unit: int) -> None:
        self._write(path, start, data)
        self.loose.add(unit)

    # ------------------------------------------------------------------ eviction
    def used_bytes(self) -> int:
        """Disk bytes the dataset's files hold on this node (every process's units, and samples
        fetched by range into units not yet present): what the filesystem allocated."""
        total = 0
        for path in self.sizes:
            try:
                total += os.stat(self._local[path]).st_blocks * 512
            except FileNotFoundError:
                pass
        return total

    def _make_room(self, unit: Unit) -> None:
        """Under cache_limit with ``unit`` counted: evict what is used later than it, then reserve
        its bytes (``.reserved/<unit>``) until its marker exists. One node-wide lock orders this,
        so concurrent fetches (threads, ranks) do not all see the same free room."""
        need = unit.end - unit.start
        with self._room_lock:
            fd = os.open(self.root / ".locks" / "room", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                _lock_file(fd, wait=True)
                while (held := self.used_bytes() + self._reserved_bytes()) + need > self._room_limit(held):
                    if not (self._drop_samples_read_ahead()
                            or self._evict_one(exclude=unit.index, before=self._use_of(unit.index))):
                        limit = (f"cache_limit={self.limit} bytes" if self.limit is not None else
                                 f"the free space of {self.root}")
                        raise CacheFull(f"{limit} is too small for {self.store.url}: the units needed now ({need} "
                                        "bytes more) do not fit beside the ones in use; raise it")
                (self.root / ".reserved" / str(unit.index)).touch()
            finally:
                os.close(fd)

    def _room_limit(self, held: int) -> int:
        """cache_limit, or without one the disk's room: what the cache holds now plus the free
        space, less 5% of the filesystem (the disk is shared with everything else)."""
        if self.limit is not None:
            return self.limit
        st = os.statvfs(self.root)
        return held + st.f_bavail * st.f_frsize - st.f_blocks * st.f_frsize // 20

    def cache_budget(self) -> int:
        """Bytes this cache may hold: cache_limit, else the disk's room for it (asked often: the
        prefetch's every wait for room)."""
        return self.limit if self.limit is not None else self._room_limit(self.used_bytes())

    def being_fetched(self, u: int) -> bool:
        """Whether some process reserved unit ``u``'s room and is fetching it now."""
        return (self.root / ".reserved" / str(u)).exists()

    def _unreserve(self, unit: Unit) -> None:
        (self.root / ".reserved" / str(unit.index)).unlink(missing_ok=True)

    def _reserved_bytes(self) -> int:
        """Bytes of units being fetched on this node: a reservation whose unit lock is free was
        left by a process that died (dropped here)."""
        total = 0
        for entry in os.scandir(self.root / ".reserved"):
            if not entry.name.isdigit() or int(entry.name) >= len(self.units):
                continue
            u = int(entry.name)
            with self._unit_lock(u, wait=False) as free:
                if free:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)  # stale
                else:
                    total += self.units[u].end - self.units[u].start
        return total

    def _use_of(self, u: int) -> float:
        return self.next_use(u) if self.next_use is not None else float("inf")

    def _evict_one(self, exclude: int | None, before: float = float("-inf"), busy: frozenset = frozenset()) -> bool:
        """Evict the present unit used furthest in the future (later than ``before``), but for
        ``busy``; False when none can go."""
        with self._evict_lock:
            present = [u for e in os.scandir(self.root / ".units")
                       if (u := _unit_of_marker(e.name, len(self.units))) is not None
                       and u != exclude and u not in busy and self.units[u].evictable]
            present.sort(key=self._use_of, reverse=True)
            for u in present:
                if self._use_of(u) <= before and before != float("-inf"):
                    return False
                if self._evict(u):
                    return True
            return False

    def _evict(self, u: int) -> bool:
        unit = self.units[u]
        with self._unit_lock(u, wait=False) as mine:
            if not mine:
                return False  # being fetched
            try:
                self._marker(unit).unlink()
            except FileNotFoundError:
                return False
            self._present[u] = 0
            self._punch(unit)
            self.on_evict(u)
            log.debug("evict unit %d (next use %s)", u, self._use_of(u))
            return True

    def _punch(self, unit: Unit) -> None:
        """The unit's range back to a hole: its disk space returned, the file's size kept (a
        filesystem without holes keeps the bytes: the marker's absence is what counts)."""
        data_fd = os.open(self._local[unit.path], os.O_WRONLY | os.O_CLOEXEC)
        try:
            _libc_fallocate()(data_fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, unit.start, unit.end - unit.start)
        finally:
            os.close(data_fd)

    def trim(self) -> None:
        """Past the cache's room, samples this process fetched by range are dropped (but for the
        batches in flight's): their units come whole or not at all."""
        if self.limit is None:
            return
        if self.used_bytes() > self.limit:
            self._drop_samples_read_ahead()

    def _drop_samples_read_ahead(self) -> bool:
        """On a full disk with no unit to evict: the samples fetched by range into units not yet
        present take room no marker accounts for; their ranges are punched out (a reader of one
        sees its check fail and fetches it again). The batches in flight's stay: dropping them
        would fail those batches (their heal's copy too). True when there was any."""
        dropped = False
        for u in sorted(self.loose - self.in_flight()):  # this process's: another's are its own to drop
            unit = self.units[u]
            self.loose.discard(u)
            if self.present(u):
                continue
            with self._unit_lock(u, wait=False) as mine:
                if mine and not self.present(u):
                    path = self._local[unit.path]
                    before = os.stat(path).st_blocks
                    self._punch(unit)
                    # its samples are no longer ready: read, the hole would fail their check (and
                    # on a full tmpfs, a mapped read of a hole is SIGBUS, not zeros)
                    self.on_evict(u)
                    dropped |= os.stat(path).st_blocks < before
        return dropped

    # ------------------------------------------------------------------ whole files
    def fetch_file(self, path: str, progress=None) -> None:
        """Every unit of file ``path`` (the records index, or everything for ``verify``)."""
        first = self.first_unit[path]
        units = [u.index for u in self.units[first:] if u.path == path]
        with ThreadPoolExecutor(FETCHERS, thread_name_prefix="fastload-fetch") as pool:
            for u, _ in zip(units, pool.map(self.fetch, units)):
                if progress is not None:
                    progress(self.units[u].end - self.units[u].start)


def _lock_file(fd: int, wait: bool) -> bool:
    """A POSIX lock of file ``fd``, polled rather than waited for: the kernel's deadlock check sees
    processes, not threads, and refuses a wait that threads of two processes would resolve."""
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if not wait:
                return False
            threading.Event().wait(0.005)


def _unit_of_marker(name: str, count: int) -> int | None:
    head = name.split("-", 1)[0]
    if not head.isdigit() or "tmp" in name:
        return None
    u = int(head)
    return u if u < count else None


class RemoteSplit:
    """One split's samples over :class:`RemoteFiles`: which unit holds each sample, which are
    ready in this process, and the prefetch of the units an epoch's order needs, in that order."""

    def __init__(self, files: RemoteFiles, data_paths: list[str], records: np.ndarray, crcs: np.ndarray | None):
        self.files, self.data_paths, self.crcs = files, data_paths, crcs
        file = np.asarray(records["file"]).astype(np.int64)
        offset = np.asarray(records["offset"]).astype(np.int64)
        size = np.asarray(records["size"]).astype(np.int64)
        first = np.array([files.first_unit[p] for p in data_paths], np.int64)
        chunk = np.array([files.chunk_size[p] for p in data_paths], np.int64)
        self.file, self.offset, self.size = file, offset, size
        self.unit_first = first[file] + offset // chunk[file]
        self.unit_last = first[file] + np.maximum(offset + size - 1, offset) // chunk[file]
        self.ready = np.zeros(len(records), bool)
        self._all_ready = False
        self._recent = deque(maxlen=8)  # units of the last batches made ready: in flight, not trimmed
        files.in_flight = self.in_flight
        files.on_evict = self._evicted
        self._plan_lock = threading.Lock()
        self._generation = 0
        self._position = 0
        self._lag = 0
        self._samples_pool = None
        self._units_pool = None

    # ------------------------------------------------------------------ reading
    def ensure(self, index: np.ndarray) -> None:
        """Samples ``index`` readable from their local files: present units, or (with CRCs) their
        own bytes fetched by range. Blocks until they are."""
        if self._all_ready:  # a warm cache: nothing to look up per batch
            return
        index = np.asarray(index, np.int64)
        # the batch's units are in flight while it is read (its range-read samples are kept; on a
        # full disk, its units too)
        self._recent.append(frozenset(self._units_of(index).tolist()))
        todo = index[~self.ready[index]]
        if not len(todo):
            return
        files = self.files
        absent = {u for u in self._units_of(todo).tolist() if not files.present(u)}
        # a batch whose absent units are not much larger than its samples in them (a shard-aware
        # order, a small dataset) waits for them whole; one that would wait for far more (a global
        # order over a large dataset, from a cold cache) reads its samples by range meanwhile
        unit_bytes = sum(files.units[u].end - files.units[u].start for u in absent)
        in_absent = np.isin(self.unit_first[todo], list(absent)) if absent else np.zeros(len(todo), bool)
        whole = unit_bytes <= WAIT_FOR_UNITS * max(1, int(self.size[todo[in_absent]].sum()))
        coming = absent if whole or self.crcs is None else {u for u in absent if files.being_fetched(u)}
        if coming:  # on their way (the prefetch, another rank): waited for, not fetched twice
            list(self._pool("units").map(self._wait_for, sorted(coming)))
            absent -= {u for u in coming if files.present(u)}
        if absent:
            missing = np.isin(self.unit_first[todo], list(absent)) | np.isin(self.unit_last[todo], list(absent))
            if self.crcs is not None:
                self._fetch_samples(np.unique(todo[missing]))
                files.trim()
            else:
                list(self._pool("units").map(files.fetch, sorted(absent)))
        self.ready[todo] = True
        self._all_ready = bool(self.ready.all())

    def _units_of(self, samples: np.ndarray) -> np.ndarray:
        """The units holding ``samples`` (a sample may straddle two)."""
        return np.unique(np.concatenate([self.unit_first[samples], self.unit_last[samples]]))

    def _wait_for(self, u: int) -> None:
        """Unit ``u``, which another fetches: present once its lock is free (or fetched here if
        that fetch failed; past the cache's room, left to the samples' range reads)."""
        try:
            self.files.fetch(u)
        except CacheFull:
            pass

    def _evicted(self, u: int) -> None:
        self._all_ready = False
        self.ready[(self.unit_first == u) | (self.unit_last == u)] = False

    def in_flight(self) -> set[int]:
        return set().union(*list(self._recent))

    def _pool(self, kind: str) -> ThreadPoolExecutor:
        with self._plan_lock:
            if kind == "samples":
                if self._samples_pool is None:
                    self._samples_pool = ThreadPoolExecutor(SAMPLE_FETCHERS, thread_name_prefix="fastload-sample")
                return self._samples_pool
            if self._units_pool is None:
                self._units_pool = ThreadPoolExecutor(FETCHERS, thread_name_prefix="fastload-unit")
            return self._units_pool

    def _fetch_samples(self, samples: np.ndarray) -> None:
        list(self._pool("samples").map(self._fetch_sample, samples.tolist()))

    def _fetch_sample(self, i: int) -> bool:
        """Sample ``i``'s bytes by range, checked against its CRC32C, written in place; False when
        the store's bytes fail their CRC too (the dataset itself is damaged)."""
        import crc32c
        log.debug("range sample %d (unit %d)", i, self.unit_first[i])
        path = self.data_paths[int(self.file[i])]
        start, end = int(self.offset[i]), int(self.offset[i] + self.size[i])
        for _ in range(self.files.store.retries + 1):
            data = self.files.fetch_range(path, start, end)
            if crc32c.crc32c(data) == int(self.crcs[i]):
                self.files.write_range(path, start, data, int(self.unit_first[i]))
                return True
        return False

    def heal(self, i: int) -> bool:
        """Sample ``i`` failed its check as read from the cache: fetch it again from the store.
        True when the store's copy passes (the caller checks again); False when it fails too."""
        i = int(i)
        self._all_ready = False
        units = frozenset(self._units_of(np.array([i])).tolist())
        for u in units:
            self.files.forget(u)
            marker = self.files._marker(self.files.units[u])
            if marker.exists():  # a unit marked present with damaged bytes: fetched whole again later
                self._drop_marker(u)
        self.ready[i] = False
        if self.crcs is None:
            for u in units:
                self.files.fetch(u)
            self.ready[i] = True
            return True
        self._recent.append(units)  # kept until it is read
        ok = self._fetch_sample(i)
        self.ready[i] = ok
        return ok

    def _drop_marker(self, u: int) -> None:
        try:
            self.files._marker(self.files.units[u]).unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ prefetch
    def plan(self, order: np.ndarray, lag: int = 0, then: np.ndarray | None = None) -> None:
        """The epoch's order (this node's, from its resume point): its units are fetched ahead of
        the consumer in order of first use, and eviction keeps the ones used soonest. ``lag``:
        positions behind this process's that the node's other ranks may still be at (a unit they
        use there is not evicted). ``then``: the next epoch's first samples, fetched after this
        order's once the cache has room for them beside what this order still uses."""
        parts = [np.asarray(order, np.int64)] + ([np.asarray(then, np.int64)] if then is not None else [])
        order = np.concatenate(parts)
        self._lag = int(lag)
        # what this process believes present is looked at again each epoch (other ranks evict)
        self.ready[:] = False
        self._all_ready = False
        self.files.forget_all()
        with self._plan_lock:
            self._generation += 1
            generation = self._generation
            self._position = 0
        units = self.unit_first[order]
        # unit -> sorted positions where it is used (Belady's "next use")
        by_unit = np.argsort(units, kind="stable")
        starts = np.searchsorted(units[by_unit], np.arange(len(self.files.units) + 1))
        # each part's units held from their first use to their last in it (a unit used again in
        # ``then`` is held twice, not from this epoch's use to the next's)
        spans, offset = [], 0
        for part in parts:
            used, first = np.unique(units[offset:offset + len(part)], return_index=True)
            last = len(part) - 1 - np.unique(units[offset:offset + len(part)][::-1], return_index=True)[1]
            spans.append((used, first + offset, last + offset))
            offset += len(part)
        used, first, last = (np.concatenate(x) for x in zip(*spans))
        sizes = np.array([self.files.units[u].end - self.files.units[u].start for u in used.tolist()], np.int64)
        by_first = np.argsort(first, kind="stable")
        self._span = (used[by_first], first[by_first], last[by_first], sizes[by_first])

        def next_use(u: int) -> float:
            pos = by_unit[starts[u]:starts[u + 1]]
            k = np.searchsorted(pos, max(0, self._position - self._lag))
            return float(pos[k]) if k < len(pos) else float("inf")
        self.files.next_use = next_use
        self._prefetch_units(generation, self._span)

    def stop_prefetch(self) -> None:
        """The prefetch threads stop after the unit at hand (their loader is gone: the rest of
        its plan would be downloaded for no one)."""
        with self._plan_lock:
            self._generation += 1

    def advance(self, position: int) -> None:
        """The consumer has reached ``position`` of the planned order."""
        self._position = position
        log.debug("position %d", position)

    def _prefetch_units(self, generation: int, span: tuple) -> None:
        """FETCHERS daemon threads walk the plan's spans in order of first use: a unit another
        process is fetching is left to it; past the cache's room, the next unit waits until the
        consumer has moved on (eviction makes room by then). They stop when another plan starts."""
        lock, it = threading.Lock(), iter(range(len(span[0])))

        def worker():
            while generation == self._generation:
                with lock:
                    k = next(it, None)
                if k is None:
                    return
                u = int(span[0][k])
                # a unit whose fetch failed after its retries is left to the consumer's own fetch,
                # which raises the named error (a new plan does not try it 6 more times first)
                while generation == self._generation and not self.files.failed(u):
                    if not self._fits_ahead(k, span):  # not before the units needed sooner have room
                        threading.Event().wait(0.05)
                        continue
                    try:
                        if self.files.fetch(u, wait=False):
                            break
                        threading.Event().wait(0.02)  # another fetches it: present soon, or ours to redo
                    except CacheFull:
                        threading.Event().wait(0.05)
                    except Exception:  # noqa: BLE001 - the consumer's own fetch raises it, named, if it persists
                        break
        threads = [threading.Thread(target=worker, name="fastload-prefetch", daemon=True) for _ in range(FETCHERS)]
        for t in threads:
            t.start()

    def _fits_ahead(self, k: int, span: tuple) -> bool:
        """Whether span ``k`` of a plan (a unit, from its first use to its last) and every span
        that starts before it and is still in use fit in the cache: a prefetch further ahead would
        evict what it fetched before its use."""
        if self.files.limit is None:
            return True
        _, _, last, sizes = span  # sorted by first use: spans 0..k start no later than k
        still = last[:k + 1] >= self._position - self._lag
        return int(sizes[:k + 1][still].sum()) <= self.files.cache_budget()


def open_remote(url: str, cache_dir=None, cache_limit: int | None = None):
    """(the dataset's local directory under the cache, its manifest's data, its RemoteFiles)."""
    from .manifest import CHECKSUM_KEY, parse_manifest
    store = Store(url)
    try:
        raw = store.read(MANIFEST)
    except StoreError as e:
        if "does not exist" in str(e):
            raise DatasetError(f"{url} has no {MANIFEST}, so it is not a complete fastload dataset (a conversion "
                               "to it may be running or was interrupted: rerun the same `fastload convert`)") from None
        raise
    data = parse_manifest(raw, f"{url}/{MANIFEST}")
    # the cache directory's name: the manifest's checksum (checked above from version 3 on), else its bytes'
    key = data[CHECKSUM_KEY] if data["format_version"] >= 3 else hashlib.sha256(raw).hexdigest()
    root = dataset_cache_dir(Path(cache_dir) if cache_dir else default_cache_dir(), url, key)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not (root / MANIFEST).exists():
            atomic_write_bytes(root / MANIFEST, raw, durable=False)
    except OSError as e:
        raise DatasetError(f"cache directory {root} cannot be written ({e}): give cache_dir= or "
                           f"${CACHE_ENV} a writable place") from None
    return root, data, RemoteFiles(store, root, data, check_cache_limit(cache_limit))
