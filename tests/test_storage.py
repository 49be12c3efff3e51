"""The storage layer's logic (fastload.storage): the unit cache, its eviction, the prefetch and its
plan, the node schedule, the heal and the heap policy, tested fast and in one process. The store
is an in-memory fake (fastload.testing.memory_store: fsspec's MemoryFileSystem, each read
recorded) behind the real client, cache and loader; tests/test_remote.py runs the end-to-end cases
against a real S3-protocol server, real processes and injected network faults."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest
import torch

from conftest import IMAGENET, ROOT

from fastload import FastLoader
from fastload.formats.errors import DatasetError, SampleDecodeError
from fastload.formats.manifest import CHECKSUM_KEY, MANIFEST, Manifest, manifest_checksum
from fastload.formats.records import SplitReader
from fastload.pipelines.samples import SampleChecks
from fastload.storage import cache, heap, location, open_dataset, prefetch, split
from fastload.testing.memory_store import memory_store

KW = dict(split="validation", batch_size=32, num_workers=2, seed=3, spec="imagenet:train")


@pytest.fixture
def mem(monkeypatch):
    monkeypatch.setattr(location, "BACKOFF_S", 0.001)  # a failing store is retried at once here
    with memory_store() as store:
        yield store


@pytest.fixture
def no_prefetch(monkeypatch):
    """Units come only when a batch asks (the prefetch's own tests are below)."""
    monkeypatch.setattr(prefetch.Prefetcher, "_start", lambda *a: None)


def batches(loader) -> list[torch.Tensor]:
    return [images.clone() for images, _ in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def until(condition, seconds: float = 20) -> bool:
    """Polls ``condition`` until it holds (True) or ``seconds`` pass (False)."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def data_files(directory) -> list[str]:
    m = Manifest.read(directory)
    return [f["path"] for f in m.split("validation").files_with_role("data")]


@pytest.fixture(scope="module")
def local_batches(imagenet_dirs):
    return {(fmt, backend): batches(FastLoader(imagenet_dirs[fmt], backend=backend, **KW))
            for fmt, backend in (("beton", "ffcv"), ("tfrecord", "reference"))}


def open_split(url, cache_dir, limit=None) -> SplitReader:
    return SplitReader(open_dataset(url, cache_dir=cache_dir, cache_limit=limit), "validation")


def samples_of(reader, unit: int) -> np.ndarray:
    return np.flatnonzero(reader.units == unit)


# --------------------------------------------------------------------------- reading through the cache
def test_each_unit_is_fetched_once_and_a_warm_cache_reads_only_the_manifest(mem, imagenet_dirs, local_batches,
                                                                           tmp_path):
    url = mem.upload(imagenet_dirs["tfrecord"], "t")
    loader = FastLoader(url, backend="reference", cache_dir=tmp_path / "cache", **KW)
    assert same(batches(loader), local_batches["tfrecord", "reference"])
    assert all(mem.whole_reads(url, f) == 1 for f in data_files(imagenet_dirs["tfrecord"]))
    mem.clear()
    loader.set_epoch(0)
    assert same(batches(loader), local_batches["tfrecord", "reference"])  # a second pass
    again = FastLoader(url, backend="reference", cache_dir=tmp_path / "cache", **KW)  # another process's view
    assert same(batches(again), local_batches["tfrecord", "reference"])
    assert [p.rsplit("/", 1)[-1] for p, _, _ in mem.reads] == [MANIFEST]


def test_eviction_keeps_the_units_used_soonest(mem, imagenet_dirs, tmp_path, no_prefetch):
    """Belady: past cache_limit, the present unit whose next use is furthest goes."""
    url = mem.upload(imagenet_dirs["tfrecord"], "t")
    probe = open_split(url, tmp_path / "probe")
    cache = probe.source.cache
    index = sum(u.size for u in cache.units if not u.evictable)
    a, b, c = (int(u) for u in np.unique(probe.units)[:3])
    limit = index + cache.units[a].size + cache.units[b].size + 2**16  # two of the three (and blocks)
    reader = open_split(url, tmp_path / "cache", limit)
    remote = reader.source
    order = np.concatenate([samples_of(reader, a), samples_of(reader, b), samples_of(reader, c),
                            samples_of(reader, a)])
    remote.schedule_epoch(order)
    position = 0
    for unit in (a, b, c):
        batch = samples_of(reader, unit)
        remote.ensure(batch)
        position += len(batch)
        remote.advance(position)
    assert remote.cache.present(a) and remote.cache.present(c) and not remote.cache.present(b)
    assert remote.cache.used_bytes() <= limit
    local = SplitReader(Manifest.read(imagenet_dirs["tfrecord"]), "validation")
    assert all(np.array_equal(reader.stored(int(i)), local.stored(int(i))) for i in samples_of(reader, a))


def test_the_prefetch_fetches_in_order_of_first_use_within_the_cache(mem, imagenet_dirs, tmp_path):
    url = mem.upload(imagenet_dirs["tfrecord"], "t")
    probe = open_split(url, tmp_path / "probe")
    cache = probe.source.cache
    index = sum(u.size for u in cache.units if not u.evictable)
    a, b, c = (int(u) for u in np.unique(probe.units)[:3])
    limit = index + cache.units[a].size + cache.units[b].size + 2**16
    limit += min(max(u.size for u in cache.units), limit // 7)  # the slack a prefetch leaves free (UnitCache.slack)
    reader = open_split(url, tmp_path / "cache", limit)
    remote, files = reader.source, [cache.units[u].path for u in (a, b, c)]
    mem.clear()
    remote.schedule_epoch(np.concatenate([samples_of(reader, u) for u in (a, b, c)]))
    assert until(lambda: remote.cache.present(a) and remote.cache.present(b))
    # c does not fit beside a and b, which are still to be read: the plan holds it back
    assert not remote.cache.present(c) and mem.whole_reads(url, files[2]) == 0
    remote.advance(len(samples_of(reader, a)))  # a is read: its room goes to c
    assert until(lambda: remote.cache.present(c))
    assert not remote.cache.present(a) and remote.cache.used_bytes() <= limit
    assert [p.rsplit("/", 1)[-1] for p, _, _ in mem.reads][2] == files[2]
    remote.close()


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """The ImageNet sample in 40 TFRecord shards of 5 (samples 195..199 in the last)."""
    from fastload import convert
    local = tmp_path_factory.mktemp("small-shards") / "t"
    convert(str(IMAGENET), local, format="tfrecord", shard_size=5, workers=2, progress=False)
    return local


def test_the_plan_is_what_the_batches_read_and_no_epoch_after_the_last(mem, small_shards, tmp_path, no_prefetch):
    """drop_last's partial batch is not planned (its units were downloaded for no one, and held
    room to the epoch's end); the next epoch's first batches are, unless this epoch is the last
    (``epochs``). Asserted on what the plan asks for, not on bytes that arrive in time."""
    url = mem.upload(small_shards, "t")

    def planned(epochs, drop_last):
        loader = FastLoader(url, "validation", batch_size=32, backend="reference", order="sequential",
                            drop_last=drop_last, epochs=epochs, num_workers=0, spec="imagenet:eval",
                            cache_dir=tmp_path / "cache")
        it = iter(loader)
        next(it)
        remote = loader.reader.source
        last_unit = int(loader.reader.units[199])
        return remote.prefetch.planned, remote.next_use(last_unit)
    assert planned(1, True) == ((192, 0), float("inf"))   # 6 full batches; the last shard never planned
    assert planned(None, True)[0] == (192, 64)             # then the next epoch's first 2 batches
    assert planned(1, False) == ((200, 0), 195.0)          # the partial batch is read: its unit planned
    pl = pytest.importorskip("lightning.pytorch")
    from fastload.lightning import FastDataModule
    dm = FastDataModule(url, batch_size=32, train_split="validation", val_split=None, train_spec="imagenet:train",
                        cache_dir=tmp_path / "cache", backend="reference", num_workers=1)
    dm.trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert dm.train_dataloader().schedule.epochs == 3  # the trainer's last epoch fetches no next one


def test_an_epochs_first_batches_are_fetched_before_it_is_iterated(mem, imagenet_dirs, tmp_path):
    """A cache smaller than the data: the first epoch's first units download while the loader is
    set up, and the next epoch's during this one (once this one's leave room)."""
    url = mem.upload(imagenet_dirs["tfrecord"], "t")
    mem.delay(0.005)
    loader = FastLoader(url, backend="reference", cache_dir=tmp_path / "cache", cache_limit=9 * 2**20,
                        order="shards", **{**KW, "num_workers": 1})
    remote = loader.reader.source

    def first_batch_present(epoch: int) -> bool:
        head = loader.rank_order(epoch)[:loader.batch_size]
        return all(remote.cache.present(int(u)) for u in np.unique(remote.unit_first[head]))
    assert until(lambda: first_batch_present(0)), "the first epoch's first units were not fetched before iter()"
    assert not all(remote.cache.present(u) for u in range(len(remote.cache.units)))  # a check that can fail
    list(loader)
    assert until(lambda: first_batch_present(1)), "the next epoch's first units were not fetched during this one"
    planned = remote.prefetch._generation
    loader.set_epoch(1)  # scheduled already: no new schedule
    assert remote.prefetch._generation == planned and len(list(loader)) == len(loader)


def test_a_loader_dropped_mid_epoch_stops_its_prefetch(mem, small_shards, tmp_path, monkeypatch):
    """Its prefetch would otherwise fetch the rest of the epoch's units for no one."""
    monkeypatch.setattr(prefetch, "FETCHERS", 1)  # one unit at a time
    local = small_shards
    url = mem.upload(local, "t")
    mem.delay(0.02)
    loader = FastLoader(url, backend="reference", cache_dir=tmp_path / "cache", **{**KW, "num_workers": 1})
    it = iter(loader)
    next(it)
    threads = loader.reader.source.prefetch._threads
    assert any(t.is_alive() for t in threads)
    dropped = weakref.ref(loader)
    del it, loader
    assert dropped() is None  # freed at once: no cycle keeps a loader (and its workers) for the collector
    assert until(lambda: not any(t.is_alive() for t in threads)), "the prefetch went on for a dropped loader"
    fetched = sum(1 for f in data_files(local) if mem.whole_reads(url, f))
    assert fetched < len(data_files(local)), fetched


def test_window_units_follow_the_cache_and_a_resume_reads_the_checkpoints(mem, imagenet_dirs, tmp_path):
    """The shard-aware window is sized from the cache, so it is part of the order: a resume on a
    node whose cache has another room reads the checkpoint's order, every sample once."""
    url = mem.upload(imagenet_dirs["tfrecord"], "t")

    def loader(limit_mb):
        return FastLoader(url, backend="reference", cache_dir=tmp_path / f"c{limit_mb}", cache_limit=limit_mb * 2**20,
                          order="shards", columns=("index",), drop_last=False, **{**KW, "num_workers": 1})
    roomy, tight = loader(20), loader(9)
    assert tight.window_units < roomy.window_units < len(roomy.reader.source.cache.units)
    it = iter(roomy)
    consumed = [i for _ in range(3) for i in next(it)[2].tolist()]
    state = roomy.state_dict()
    assert state["window_units"] == roomy.window_units
    tight.load_state_dict(state)
    rest = [i for _, _, index in tight for i in index.tolist()]
    assert sorted(consumed + rest) == list(range(200))
    with pytest.raises(ValueError, match=r"window_units=0 is invalid"):
        tight.load_state_dict({**state, "window_units": 0})


@pytest.fixture(scope="module")
def train_tfrecord(tmp_path_factory):
    """The ImageNet sample as a 'train' split in 7 TFRecord shards (a train split is shuffled)."""
    import datasets
    from fastload import convert
    root = tmp_path_factory.mktemp("train")
    datasets.DatasetDict({"train": datasets.load_dataset(str(IMAGENET), split="validation")}).save_to_disk(
        str(root / "src"))
    convert(str(root / "src"), root / "t", format="tfrecord", workers=2, shard_size=32, progress=False)
    return root / "t"


def test_cache_limit_evicts_and_keeps_the_data(mem, train_tfrecord, tmp_path):
    url = mem.upload(train_tfrecord, "t")
    limit = 9 * 2**20  # about 40% of the dataset
    kw = {**KW, "split": "train", "drop_last": False}
    with pytest.warns(RuntimeWarning, match=r"outgrows its cache .* order='shards'"):
        auto = FastLoader(url, backend="reference", cache_dir=tmp_path / "auto", cache_limit=limit, **kw)
    assert auto.order == "shards"  # the loader's choice for data larger than the cache, said aloud
    loader = FastLoader(url, backend="reference", cache_dir=tmp_path / "cache", cache_limit=limit, order="random",
                        **kw)
    local = batches(FastLoader(train_tfrecord, backend="reference", order="random", **kw))
    for _ in range(2):
        loader.set_epoch(0)
        assert same(batches(loader), local)
        batch = 32 * int(loader.reader.records["size"].max())  # samples of the batch at hand, by range
        assert loader.manifest.source.cache.used_bytes() <= limit + batch


# --------------------------------------------------------------------------- samples before their units
def test_a_cold_start_over_large_units_reads_samples_by_range(mem, imagenet_dirs, local_batches, tmp_path,
                                                              monkeypatch, no_prefetch):
    """Where the units a batch needs dwarf its samples, the batch's samples come by range,
    checked by CRC, while the units download."""
    monkeypatch.setattr(split, "WAIT_FOR_UNITS", 0)  # as if the units were far larger than a batch
    url = mem.upload(imagenet_dirs["beton"], "b")
    loader = FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
    assert same(batches(loader), local_batches["beton", "ffcv"])
    assert len(mem.ranges(url, "validation.beton")) >= 32, "the first batch did not read its samples by range"


def test_samples_dropped_to_make_room_are_no_longer_ready(mem, imagenet_dirs, tmp_path, monkeypatch, no_prefetch):
    """Range-read samples punched out to make room are fetched again when next needed, not read
    from the hole (zeros that fail their check; on a full tmpfs, a mapped read of a hole is SIGBUS)."""
    monkeypatch.setattr(split, "WAIT_FOR_UNITS", 0)  # samples by range, their units not awaited
    url = mem.upload(imagenet_dirs["beton"], "b")
    reader = open_split(url, tmp_path / "cache")
    remote, files = reader.source, reader.source.cache
    index = np.arange(0, 200, 25)
    remote.ensure(index)
    assert remote.ready[index].all() and files.loose
    held = files.used_bytes()
    remote._recent.clear()  # no batch in flight
    assert files._drop_samples_read_ahead() and files.used_bytes() < held
    assert not remote.ready[index].any()
    local = SplitReader(Manifest.read(imagenet_dirs["beton"]), "validation")
    for i in index:  # read again: fetched again, the stored bytes
        assert np.array_equal(reader.stored(int(i)), local.stored(int(i)))


def test_a_full_cache_keeps_the_samples_of_batches_in_flight(mem, tmp_path, monkeypatch):
    """A cache too small for the units the batches need (a .beton of 8 MB units, a cache of 5 MB):
    each batch's samples come by range while the decoders read the batches ahead; making room for
    the next batch must not punch out theirs (it did: 'does not match their checksum')."""
    from fastload import convert
    from fastload.formats import beton
    monkeypatch.setattr(beton, "CHUNK_BYTES", 1)  # one page a unit: several units in 22 MB
    local = tmp_path / "beton"
    convert(str(IMAGENET), local, format="beton", workers=2, progress=False)
    f = Manifest.read(local).split("validation").files[0]
    assert f["size"] // f["chunk_size"] >= 2
    url = mem.upload(local, "b")
    mem.delay(0.002)
    limit = 5 * 2**20
    loader = FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", cache_limit=limit, order="shards",
                        columns=("index",), drop_last=False, **{**KW, "batch_size": 16})
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert sorted(i for _, _, index in loader for i in index.tolist()) == list(range(200))
    assert loader.manifest.source.cache.used_bytes() <= limit + 4 * 16 * int(loader.reader.records["size"].max())


# --------------------------------------------------------------------------- damage, and the heal
def test_damaged_cached_bytes_are_fetched_again_once(mem, imagenet_dirs, local_batches, tmp_path):
    """Cached bytes changed on disk are seen by every backend's check and fetched again by range
    (SampleChecks' one heal); the unit's marker goes, so the unit comes whole next time."""
    url = mem.upload(imagenet_dirs["beton"], "b")
    cache = tmp_path / "cache"
    batches(FastLoader(url, backend="ffcv", cache_dir=cache, **KW))
    beton = next(cache.glob("*/*/validation.beton"))
    reader = SplitReader(Manifest.read(imagenet_dirs["beton"]), "validation")
    with open(beton, "r+b") as f:
        for i in (5, 77, 150):
            at = int(reader.records["offset"][i]) + 700
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x5A]))
    mem.clear()
    assert same(batches(FastLoader(url, backend="ffcv", cache_dir=cache, **KW)), local_batches["beton", "ffcv"])
    sizes = [e - s for s, e in mem.ranges(url, "validation.beton")]
    assert sizes and min(sizes) < 2**20, sizes  # a sample's range (its unit, marked damaged, may come again whole)
    ref = FastLoader(url, backend="reference", cache_dir=cache, **KW)
    assert same(batches(ref), batches(FastLoader(imagenet_dirs["beton"], backend="reference", **KW)))


def test_a_store_whose_bytes_differ_from_the_manifest_is_one_error(mem, imagenet_dirs, tmp_path):
    """Stored files changed after their manifest was written: the index is refused by its sha256;
    a sample by its CRC32C once its copy from the store fails too (one heal, then the error)."""
    url = mem.upload(imagenet_dirs["beton"], "b")
    reader = SplitReader(Manifest.read(imagenet_dirs["beton"]), "validation")

    def store_changed(name: str, at: int) -> None:
        path = f"/{url.split('://', 1)[1]}/{name}"
        data = bytearray(mem.fs.cat_file(path))
        data[at] ^= 0xFF
        mem.fs.pipe_file(path, bytes(data))
    store_changed("validation.records.npy", 200)
    with pytest.raises(DatasetError, match=rf"{url}/validation.records.npy: bytes 0..\d+ do not match their sha256 "
                                           r"in the manifest, \d downloads in a row: .*convert it again"):
        FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
    store_changed("validation.records.npy", 200)  # as it was
    store_changed("validation.beton", int(reader.records["offset"][40]) + 500)
    for backend in ("ffcv", "reference"):
        loader = FastLoader(url, backend=backend, cache_dir=tmp_path / backend, **KW)
        with pytest.raises(SampleDecodeError, match=r"split 'validation' sample 40 .* does not decode: .*checksum.*"
                                                    r"Run `fastload verify"):
            batches(loader)
    remote = open_split(url, tmp_path / "checks")
    checks = SampleChecks(remote)
    remote.ensure(np.arange(200))
    assert checks.first_failure(np.array([39, 40, 41]))[0] == 40  # healed once from the store, failed again


def test_a_store_that_keeps_failing_is_one_error_naming_the_url(mem, imagenet_dirs, tmp_path):
    url = mem.upload(imagenet_dirs["beton"], "b")
    mem.fail("records.npy")
    with pytest.raises(DatasetError, match=rf"{url}/validation.records.npy: reading .* failed 6 times"):
        FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
    mem.fail(".beton")
    loader = FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
    with pytest.raises(DatasetError, match=rf"{url}/validation.beton: reading bytes .* failed 6 times"):
        batches(loader)
    # a unit: 6 tries by the prefetch, then by the first batch; batches waiting on a fetch that
    # failed share its error, not 6 more tries each
    from collections import Counter
    tries = Counter((s, e) for p, s, e in mem.reads if p.endswith(".beton"))
    assert tries and max(tries.values()) <= 12, tries


def test_a_version_3_dataset_reads_pieces_of_the_readers_size(mem, imagenet_dirs, local_batches, tmp_path):
    """Format version 3 had no chunk hashes, but a CRC32C per sample: its .beton is read in units
    of the reader's size (formats/units.py), each once."""
    old = tmp_path / "v3"
    shutil.copytree(imagenet_dirs["beton"], old)
    data = json.loads((old / MANIFEST).read_text())
    data["format_version"] = 3
    for f in data["splits"]["validation"]["files"]:
        f.pop("chunk_size", None), f.pop("chunk_sha256", None)
    data[CHECKSUM_KEY] = manifest_checksum(data)
    (old / MANIFEST).write_text(json.dumps(data))
    url = mem.upload(old, "v3")
    assert same(batches(FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)),
                local_batches["beton", "ffcv"])
    size = (old / "validation.beton").stat().st_size
    pieces = sorted(mem.ranges(url, "validation.beton"))
    assert len(pieces) > 1 and mem.whole_reads(url, "validation.beton") == 0
    assert pieces[0][0] == 0 and pieces[-1][1] == size and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))


def test_a_unit_larger_than_a_piece_is_downloaded_in_pieces(mem, imagenet_dirs, local_batches, tmp_path,
                                                             monkeypatch):
    """A unit checked by its samples comes in ranges of at most PIECE_BYTES, each written as it
    comes (a fetcher holds one piece, not a 110 MB TFRecord shard), each read once; the index,
    checked by its sha256, still comes whole."""
    from fastload.storage import dataset
    monkeypatch.setattr(cache, "PIECE_BYTES", 1 << 20)
    heap_set_for = []  # the largest buffer a fetcher holds, as the opener sets the heap for it
    monkeypatch.setattr(dataset, "keep_unit_buffers_on_the_heap", lambda size, fetchers: heap_set_for.append(size))
    url = mem.upload(imagenet_dirs["tfrecord"], "t")
    loader = FastLoader(url, backend="reference", cache_dir=tmp_path / "cache", **KW)
    unit = max(loader.manifest.source.units.sizes.values())
    assert unit > 2 << 20  # several pieces a unit
    assert same(batches(loader), local_batches["tfrecord", "reference"])
    for name in data_files(imagenet_dirs["tfrecord"]):
        pieces = sorted(mem.ranges(url, name))
        size = (imagenet_dirs["tfrecord"] / name).stat().st_size
        assert all(b - a <= 1 << 20 for a, b in pieces) and mem.whole_reads(url, name) == 0
        assert pieces[0][0] == 0 and pieces[-1][1] == size and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert heap_set_for == [1 << 20]


def test_no_manifest_a_missing_extra_and_an_unknown_scheme_are_one_line(mem, tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"memtest://.*/nothing has no manifest.json, so it is not a complete"):
        FastLoader(f"memtest://{mem.bucket}/nothing", cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if the extra were not installed
    with pytest.raises(DatasetError, match=r"gs://b/x: reading gs:// locations needs gcsfs: pip install 'fastload\[gcs\]'"):
        FastLoader("gs://b/x", cache_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"does not read ftp:// locations"):
        FastLoader("ftp://host/x", cache_dir=tmp_path)


@pytest.mark.parametrize("value,message", [(0, r"cache_limit=0 is invalid: allowed bytes as an int >= 1"),
                                           (True, r"cache_limit=True is invalid"),
                                           ("1G", r"cache_limit='1G' is invalid")])
def test_cache_limit_is_checked_for_every_location(imagenet_dirs, value, message):
    with pytest.raises(ValueError, match=message):
        FastLoader(imagenet_dirs["tfrecord"], "validation", cache_limit=value)
    with pytest.raises(ValueError, match=r"cache_dir=3 is invalid: allowed a directory path"):
        FastLoader(imagenet_dirs["tfrecord"], "validation", cache_dir=3)


def test_verify_a_remote_dataset_fetches_every_file(mem, imagenet_dirs, tmp_path):
    from click.testing import CliRunner
    from fastload.cli import main
    url = mem.upload(imagenet_dirs["tfrecord"], "t")
    r = CliRunner().invoke(main, ["verify", url, "--no-decode", "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0 and f"OK {url}" in r.output, r.output
    assert all(mem.whole_reads(url, f) == 1 for f in data_files(imagenet_dirs["tfrecord"]))
    assert list((tmp_path / "c").glob("*/*/validation-*.tfrecord")), "--cache-dir was not the cache"


# --------------------------------------------------------------------------- full disks
def test_a_full_cache_disk_evicts_then_is_one_error(mem, imagenet_dirs, local_batches, tmp_path):
    from test_faults import small_disk
    url = mem.upload(imagenet_dirs["tfrecord"], "t")
    with small_disk(tmp_path / "small", "16m") as disk:  # the dataset is 22 MB: evicted as it goes
        assert same(batches(FastLoader(url, backend="reference", cache_dir=disk, cache_limit=4 * 2**20, **KW)),
                    local_batches["tfrecord", "reference"])
    url = mem.upload(imagenet_dirs["beton"], "b")
    with small_disk(tmp_path / "tiny", "4m") as disk:  # its 8 MB units do not fit
        loader = FastLoader(url, backend="ffcv", cache_dir=disk, **KW)
        with pytest.raises(DatasetError, match=r"is on a full disk .* free space there"):
            batches(loader)


def test_a_full_tmpfs_cache_never_reads_a_punched_page(tmp_path, monkeypatch):
    """Units of 8 MB on a 4 MB tmpfs: evicting to make room on the full disk must spare the units
    of batches being decoded: a mapped read of a page punched out of a full tmpfs is SIGBUS (it
    was, 1 run in 3), not zeros that fail their check. In a child process, which a SIGBUS kills."""
    from fastload import convert
    from fastload.formats import beton
    from test_faults import small_disk
    monkeypatch.setattr(beton, "CHUNK_BYTES", 1)  # one 8 MB page a unit
    local = tmp_path / "beton"
    convert(str(IMAGENET), local, format="beton", workers=2, progress=False)
    for attempt in range(3):
        with small_disk(tmp_path / f"tiny{attempt}", "4m") as disk:
            r = subprocess.run([sys.executable, str(ROOT / "tests" / "full_disk_reader.py"), str(local), str(disk)],
                               capture_output=True, text=True, timeout=200)
        assert r.returncode == 0, f"rc={r.returncode}: {r.stdout[-1500:]} {r.stderr[-1500:]}"
        assert r.stdout.startswith("DatasetError: the cache directory ") and "is on a full disk" in r.stdout, r.stdout


# --------------------------------------------------------------------------- the heap policy
_UNIT_BUFFERS = """
import resource, sys
if sys.argv[1:]:
    from fastload.storage import heap
    heap.keep_unit_buffers_on_the_heap(8 << 20, 8)  # what opening a remote dataset of 8 MB units does
chunk = b"x" * (64 << 10)
units = lambda: [b"".join([chunk] * 128) for _ in range(8)]  # 8 MB bodies
units()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    units()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_streaming_process_keeps_its_unit_buffers_faulted_in(mem, imagenet_dirs, tmp_path):
    """glibc maps each fresh 8 MB buffer (or trims it off the heap once 8 are freed), so every
    unit's pages are faulted in again: a process that opens a remote dataset keeps them on the
    heap, unless the user tuned malloc (GLIBC_TUNABLES)."""
    import os

    def faults(*args, **extra):
        out = subprocess.run([sys.executable, "-c", _UNIT_BUFFERS, *args], env={**os.environ, **extra},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])
    pages = 10 * 8 * (8 << 20) // 4096
    assert faults() > pages // 2  # glibc's own policy: faulted in again, about every page
    assert faults("policy") < pages // 20
    assert faults("policy", GLIBC_TUNABLES="glibc.malloc.arena_max=8") > pages // 2  # the user's malloc: left alone
    url = mem.upload(imagenet_dirs["beton"], "b")  # and opening a remote dataset applies it (or leaves it alone)
    open_dataset(url, cache_dir=tmp_path / "cache")
    assert heap._kept != 0


def test_a_store_that_cannot_be_reached_is_one_line_that_says_so(tmp_path, monkeypatch):
    """No server at the endpoint (a closed port): one error naming the URL and the remedy, after
    the retries, not a client's traceback."""
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(location, "BACKOFF_S", 0.001)
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                 "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DatasetError, match=r"^s3://some-bucket/x/manifest.json: the store cannot be reached \(reading "
                                           r"the file, 6 tries; the last: .*\): check the network and AWS_ENDPOINT_URL$"):
        FastLoader("s3://some-bucket/x", cache_dir=tmp_path)
