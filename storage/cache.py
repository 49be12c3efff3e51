"""The node-local cache of a dataset in object storage: its units, on this node's disk.

Layout: ``<cache_dir>/<url slug>-<url hash>/<manifest checksum>/`` holds ``manifest.json`` and,
for every file the manifest lists, a file of the listed size at the listed path: sparse until
filled. A remote dataset therefore reads like a local one (the same maps, offsets and addresses);
only which byte ranges hold data differs.

The unit of transfer is a *unit* (formats/units.py: a whole file, or one chunk of a .beton). A
unit is fetched whole, checked (an index file, or any file before the per-sample checksums,
against the manifest's sha256; a data unit by its length, its samples' CRC32Cs being checked as
they are read), written in place, and only then marked present: a marker file
``.units/<unit>-<sha256>-<start>``, created by an atomic rename. Markers of another unit layout (a
fastload that cut the files otherwise) are dropped with their bytes when the cache is opened. Nothing else records state: a process
killed mid-fetch leaves a unit without a marker (fetched again by whoever needs it next) and a
lock that the kernel releases with it.

The ranks of a node share the directory. A unit is fetched under an exclusive lock of its own
lock file, so each unit is downloaded once per node; the others find the marker when the lock
is theirs. Past ``cache_limit``, the present unit needed furthest in the future (by the
:class:`CacheConsumer`'s known order) is evicted: its marker removed, its range punched out.

Bytes of single samples may also be written before their unit is present (range reads of a cold
start, storage/split.py): they are *loose*, dropped first when room is needed.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from fastload.formats.errors import DatasetError
from fastload.formats.manifest import contained_path
from fastload.formats.units import Unit, UnitTable
from fastload.formats.writing import atomic_write_bytes

from .location import Store, StoreError, cache_name
from .meter import StoreMeter

CACHE_ENV = "FASTLOAD_CACHE_DIR"
log = logging.getLogger("fastload.cache")  # fetches and evictions, at DEBUG
FETCHERS = 8  # concurrent unit downloads per process: enough to hide a store's per-request latency
# a unit checked by its samples is downloaded and written in ranges of at most this, so a fetcher
# holds one range at a time: units are up to a data file (an ImageNet TFRecord shard is ~110 MB,
# 8 fetchers' whole units ~0.9 GB a rank), and the heap keeps what its fetchers hold (heap.py)
PIECE_BYTES = 32 << 20
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_INSTANCES: "weakref.WeakSet[UnitCache]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_INSTANCES):
        cache._new_locks()


os.register_at_fork(after_in_child=_after_fork_in_child)


class CacheFull(DatasetError):
    """cache_limit leaves no room for the unit needed now."""


def default_cache_dir() -> Path:
    """``$FASTLOAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastload``, else ``~/.cache/fastload``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastload"


def dataset_cache_dir(cache_dir: Path, url: str, manifest_key: str) -> Path:
    return Path(cache_dir) / cache_name(url) / manifest_key[:32]


class CacheConsumer(Protocol):
    """What the cache asks of the one reader it serves (storage/split.py's RemoteSplit)."""

    def in_flight(self) -> set[int]:
        """Units of the batches being read now: never evicted, nor their loose samples dropped."""

    def evicted(self, u: int) -> None:
        """Unit ``u`` (or its loose samples) left the disk: its samples are no longer ready."""

    def next_use(self, u: int) -> float:
        """The position at which unit ``u`` is next read (inf: not again): eviction's order."""


class _NoConsumer:
    def in_flight(self) -> set[int]:
        return set()

    def evicted(self, u: int) -> None:
        pass

    def next_use(self, u: int) -> float:
        return float("inf")


def _libc_fallocate():
    libc = ctypes.CDLL(None, use_errno=True)
    f = libc.fallocate
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return f


class UnitCache:
    """The units of one remote dataset (``table``) and their local copies under ``root``."""

    def __init__(self, store: Store, root: Path, table: UnitTable, cache_limit: int | None):
        self.store, self.root, self.limit, self.table = store, Path(root), cache_limit, table
        self.units: list[Unit] = table.units
        self.sizes: dict[str, int] = table.sizes
        missing = next((u for u in self.units if u.sha256 is None), None)
        if missing is not None:
            raise DatasetError(f"{store.url_of(missing.path)} has no sha256 in the manifest: a remote dataset's files "
                               "are checked before use; convert it again with this fastload")
        (self.root / ".units").mkdir(exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)
        (self.root / ".reserved").mkdir(exist_ok=True)
        self._present = bytearray(len(self.units))
        self._new_locks()
        _INSTANCES.add(self)
        self.consumer: CacheConsumer = _NoConsumer()
        self.bytes_fetched = 0  # this process's downloads (units and sample ranges), for the benchmarks
        self.meter = StoreMeter()  # the loader's processes' downloads and waits (FastLoader.stats)
        self.loose: set[int] = set()  # units not present that this process wrote samples into
        # room a prefetch leaves free: the files that stay, and up to a unit (an eighth of the
        # limit at most) for what its plan does not count (samples read by range, a unit another
        # rank reserved). A prefetch that fills the cache to its limit makes the next fetch evict
        # a unit it fetched ahead, which is fetched again later (1.2-1.4x the bytes an epoch)
        self.staying = sum(u.size for u in self.units if not u.evictable)  # index files, kept once fetched
        self.slack = self.staying + min(max((u.size for u in self.units if u.evictable), default=0),
                                        (cache_limit or 0) // 8)
        self._make_files()
        self._drop_other_layouts()

    def attach(self, consumer: CacheConsumer) -> None:
        """The reader whose order steers eviction, and who hears of it."""
        self.consumer = consumer

    def _new_locks(self) -> None:
        """This process's locks (again in a forked child: a lock held by a parent's thread at the
        fork would stay held there forever)."""
        self._thread_locks = [threading.Lock() for _ in self.units]
        self._failed: dict[int, tuple[float, str]] = {}  # unit -> (when, why) its last fetch failed
        self._evict_lock, self._room_lock, self._count_lock = threading.Lock(), threading.Lock(), threading.Lock()

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

    def _drop_other_layouts(self) -> None:
        """Markers that name no unit of this table were written by a fastload that cut the files
        into other units: the bytes they mark are no unit's here, and would hold room that nothing
        can evict. Dropped, with every byte no present unit holds."""
        stale = [e.path for e in os.scandir(self.root / ".units")
                 if "tmp" not in e.name and self._unit_of_marker(e.name) is None]
        if not stale:
            return
        log.info("%s: dropping %d units of another layout", self.root, len(stale))
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for unit in self.units:
            if unit.evictable and not self.present(unit.index):
                with self._unit_lock(unit.index, wait=False) as free:
                    if free:  # (not one that a rank of this layout is fetching now)
                        self._punch(unit)

    # ------------------------------------------------------------------ units
    def _marker(self, u: Unit) -> Path:
        return self.root / ".units" / f"{u.index}-{u.sha256[:32]}-{u.start}"

    def _unit_of_marker(self, name: str) -> int | None:
        """The unit whose marker is named ``name``, if any."""
        head = name.split("-", 1)[0]
        if not head.isdigit() or int(head) >= len(self.units):
            return None
        u = int(head)
        return u if name == self._marker(self.units[u]).name else None

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

    def invalidate(self, u: int) -> None:
        """Unit ``u`` was found damaged as read: no longer present here or on the node (its marker
        dropped), so that it is fetched whole again when next needed."""
        self.forget(u)
        with contextlib.suppress(FileNotFoundError):
            self._marker(self.units[u]).unlink()

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
                self._download(unit)
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

    def _download(self, unit: Unit) -> None:
        """The unit's bytes from the store into its place in the cache file, checked against the
        manifest: its length, and its sha256 before a byte is written, or for a unit its samples
        check (``by_samples``) as they are read, in pieces (a damaged sample is fetched again by
        range when it is read). A body that does not match is fetched again, as a truncated one is."""
        for start, end in download_pieces(unit):
            self._write(unit.path, start, self._checked(unit, start, end))

    def _checked(self, unit: Unit, start: int, end: int):
        """Bytes ``start..end`` of ``unit``'s file (the whole unit, or a piece of one checked by its samples)."""
        for attempt in range(self.store.retries + 1):
            data = self.store.read(unit.path, start, end)
            self._count(len(data))
            if len(data) == end - start and (unit.by_samples or hashlib.sha256(data).hexdigest() == unit.sha256):
                return data
        what = "sha256 in the manifest" if len(data) == end - start else f"size ({len(data)} bytes came, not {end - start})"
        raise StoreError(f"{self.store.url_of(unit.path)}: bytes {start}..{end} do not match their {what}, "
                         f"{self.store.retries + 1} downloads in a row: the stored file differs "
                         "from the one the manifest describes (convert it again)")

    def _count(self, n: int) -> None:
        with self._count_lock:
            self.bytes_fetched += n
        self.meter.add_bytes(n)

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
                    while not (self._evict_one(exclude=None, busy=self.consumer.in_flight()) or self._drop_samples_read_ahead()):
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
        return self.consumer.next_use(u)

    def _evict_one(self, exclude: int | None, before: float = float("-inf"), busy: frozenset = frozenset()) -> bool:
        """Evict the present unit used furthest in the future (later than ``before``), but for
        ``busy``; False when none can go."""
        with self._evict_lock:
            present = [u for e in os.scandir(self.root / ".units")
                       if (u := self._unit_of_marker(e.name)) is not None
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
            self.consumer.evicted(u)
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
        for u in sorted(self.loose - self.consumer.in_flight()):  # this process's: another's are its own to drop
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
                    self.consumer.evicted(u)
                    dropped |= os.stat(path).st_blocks < before
        return dropped

    # ------------------------------------------------------------------ whole files
    def fetch_file(self, path: str, progress=None) -> None:
        """Every unit of file ``path`` (the records index, or everything for ``verify``)."""
        units = self.table.of_file(path)
        with ThreadPoolExecutor(FETCHERS, thread_name_prefix="fastload-fetch") as pool:
            for u, _ in zip(units, pool.map(self.fetch, units)):
                if progress is not None:
                    progress(self.units[u].end - self.units[u].start)


def download_pieces(unit: Unit) -> list[tuple[int, int]]:
    """The byte ranges unit ``unit`` is downloaded in: itself (checked whole by its sha256, or
    empty), or pieces of at most PIECE_BYTES (checked by its samples)."""
    if not unit.by_samples or unit.size == 0:
        return [(unit.start, unit.end)]
    return [(a, min(unit.end, a + PIECE_BYTES)) for a in range(unit.start, unit.end, PIECE_BYTES)]


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


