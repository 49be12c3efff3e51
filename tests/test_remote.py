"""Datasets in object storage (#21), against real components: moto's S3 server on 127.0.0.1 behind
a proxy that injects latency and faults and counts requests (tests/store_proxy.py), the real
s3fs client, real processes sharing one cache, and an HTTP server with range requests."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import IMAGENET, ROOT, torchrun
from store_proxy import StoreServers

from fastload import FastLoader
from fastload.formats import location
from fastload.formats.manifest import MANIFEST, DatasetError, Manifest

pytestmark = pytest.mark.slow
KW = dict(split="validation", batch_size=32, num_workers=2, seed=3, spec="imagenet:train")


@pytest.fixture(scope="module")
def store():
    servers = StoreServers()
    yield servers
    servers.close()


@pytest.fixture
def s3(store, monkeypatch):
    """The store's environment, no faults, an empty request log, and a fresh bucket's URL."""
    for k, v in store.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(location, "BACKOFF_S", 0.01)  # faults are retried at once here
    store.faults([])
    store.latency(0)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    fs = _fs()
    fs.mkdir(bucket)
    store.clear_log()
    store.only = f"/{bucket}"  # another test's loader may still be prefetching from its own bucket
    yield f"s3://{bucket}"
    store.only = None


def _fs():
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True)


def upload(local: Path, url: str) -> str:
    _fs().put(f"{local}/", url[len("s3://"):] + "/", recursive=True)
    return url


def batches(loader) -> list[torch.Tensor]:
    return [images.clone() for images, _ in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def local_batches(imagenet_dirs):
    return {(fmt, backend): batches(FastLoader(imagenet_dirs[fmt], backend=backend, **KW))
            for fmt, backend in (("beton", "ffcv"), ("tfrecord", "reference"), ("tfrecord", "dali"))}


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("fmt,backend", [("beton", "ffcv"), ("tfrecord", "reference"), ("tfrecord", "dali")])
def test_remote_batches_are_the_local_datasets_bit_for_bit(s3, store, imagenet_dirs, local_batches, tmp_path,
                                                            fmt, backend):
    url = upload(imagenet_dirs[fmt], f"{s3}/{fmt}")
    store.clear_log()
    loader = FastLoader(url, backend=backend, cache_dir=tmp_path / "cache", **KW)
    assert same(batches(loader), local_batches[fmt, backend])
    dataset = sum(f.stat().st_size for f in imagenet_dirs[fmt].iterdir())
    assert store.bytes_read() > 0.9 * sum(f.stat().st_size for f in imagenet_dirs[fmt].glob("*.[bt][ef]*"))
    store.clear_log()
    loader.set_epoch(0)
    assert same(batches(loader), local_batches[fmt, backend])  # a second pass, as the first
    assert store.bytes_read() < 0.05 * dataset, "the second epoch downloaded again"
    # a new loader (a new process's view) on the warm cache reads nothing but the manifest
    store.clear_log()
    again = FastLoader(url, backend=backend, cache_dir=tmp_path / "cache", **KW)
    assert same(batches(again), local_batches[fmt, backend])
    assert [e[1].rsplit("/", 1)[-1] for e in store.log() if e[0] == "GET"] == [MANIFEST]


def test_http_location_with_range_requests(imagenet_dirs, local_batches, tmp_path):
    servers = StoreServers(directory=str(imagenet_dirs["beton"].parent))
    try:
        url = f"{servers.endpoint}/beton"
        loader = FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
        assert same(batches(loader), local_batches["beton", "ffcv"])
        assert any(e[2] for e in servers.log()), "no range request was made"
    finally:
        servers.close()


def test_cache_limit_evicts_furthest_and_keeps_the_data(s3, store, imagenet_dirs, local_batches, tmp_path):
    url = upload(imagenet_dirs["tfrecord"], f"{s3}/t")
    limit = 9 * 2**20  # about 40% of the dataset
    with pytest.warns(RuntimeWarning, match=r"outgrows its cache .* order='shards'"):
        auto = FastLoader(url, backend="reference", cache_dir=tmp_path / "auto", cache_limit=limit, **KW)
    assert auto.order == "shards"  # the loader's choice for data larger than the cache, said aloud
    loader = FastLoader(url, backend="reference", cache_dir=tmp_path / "cache", cache_limit=limit, order="random",
                        **KW)
    for _ in range(2):
        loader.set_epoch(0)
        assert same(batches(loader), local_batches["tfrecord", "reference"])
        batch = 32 * int(loader.reader.records["size"].max())  # samples of the batch at hand, by range
        assert loader.manifest.remote.used_bytes() <= limit + batch


def test_a_resume_under_another_cache_reads_the_checkpoints_shard_order(s3, store, imagenet_dirs, tmp_path):
    """The shard-aware window is sized from the cache, so it is part of the order: a resume on a
    node whose cache has another room (another machine, a disk filled by checkpoints meanwhile)
    reads the checkpoint's order, every sample of the epoch once."""
    url = upload(imagenet_dirs["tfrecord"], f"{s3}/t")

    def loader(limit_mb):
        return FastLoader(url, backend="reference", cache_dir=tmp_path / f"c{limit_mb}", cache_limit=limit_mb * 2**20,
                          order="shards", columns=("index",), drop_last=False, **{**KW, "num_workers": 1})
    roomy, tight = loader(20), loader(9)
    assert tight.window_units < roomy.window_units < len(roomy.reader.remote.files.units)
    it = iter(roomy)
    consumed = [i for _ in range(3) for i in next(it)[2].tolist()]
    state = roomy.state_dict()
    assert state["window_units"] == roomy.window_units
    tight.load_state_dict(state)
    rest = [i for _, _, index in tight for i in index.tolist()]
    assert sorted(consumed + rest) == list(range(200))
    with pytest.raises(ValueError, match=r"window_units=0 is invalid"):
        tight.load_state_dict({**state, "window_units": 0})


def _until(condition, seconds: float = 10) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_an_epochs_first_batches_are_fetched_before_it_is_iterated(s3, store, imagenet_dirs, tmp_path):
    """A cache smaller than the data: the first epoch's first units download while the loader is
    set up, and the next epoch's during this one (once this one's leave room), so no epoch starts
    on a cold window."""
    url = upload(imagenet_dirs["tfrecord"], f"{s3}/t")
    store.latency(5)
    loader = FastLoader(url, backend="reference", cache_dir=tmp_path / "cache", cache_limit=9 * 2**20,
                        order="shards", **{**KW, "num_workers": 1})
    remote = loader.reader.remote

    def first_batches_present(epoch: int) -> bool:  # the first batch's (a 9 MB cache holds 2 of these units)
        head = loader._rank_order(epoch)[:loader.batch_size]
        return all(remote.files.present(int(u)) for u in np.unique(remote.unit_first[head]))
    assert _until(lambda: first_batches_present(0)), "the first epoch's first units were not fetched before iter()"
    assert not all(remote.files.present(u) for u in range(len(remote.files.units)))  # a check that can fail
    list(loader)
    assert _until(lambda: first_batches_present(1)), "the next epoch's first units were not fetched during this one"
    loader.set_epoch(1)  # the epoch planned: no new plan, nothing fetched again
    assert first_batches_present(1) and len(list(loader)) == len(loader)


def test_the_last_epoch_does_not_fetch_a_next_one(s3, store, imagenet_dirs, tmp_path):
    """Each epoch's first batches download during the one before; where the loader knows the
    job's last epoch (``epochs``; FastDataModule passes the trainer's max_epochs), it fetches no
    epoch after it."""
    pl = pytest.importorskip("lightning.pytorch")
    from fastload.lightning import FastDataModule
    url = upload(imagenet_dirs["tfrecord"], f"{s3}/t")
    store.latency(5)
    small = dict(backend="reference", cache_limit=9 * 2**20, order="shards", seed=3, num_workers=1)

    def plain(epochs):
        return FastLoader(url, "validation", batch_size=32, spec="imagenet:train", epochs=epochs,
                          cache_dir=tmp_path / f"plain-{epochs}", **small)

    def lightning(max_epochs):
        dm = FastDataModule(url, batch_size=32, train_split="validation", val_split=None, train_spec="imagenet:train",
                            cache_dir=tmp_path / f"lightning-{max_epochs}", **small)
        dm.trainer = pl.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False)
        loader = dm.train_dataloader()
        assert loader.epochs == max_epochs
        return loader
    fetched = {}
    for name, make in (("epochs unknown", lambda: plain(None)), ("epochs=1", lambda: plain(1)),
                       ("max_epochs=2", lambda: lightning(2)), ("max_epochs=1", lambda: lightning(1))):
        store.clear_log()
        loader = make()
        assert len(list(loader)) == len(loader)
        time.sleep(1.0)  # a next epoch's prefetch, if any, has arrived
        fetched[name] = store.bytes_read(".tfrecord")
    assert fetched["epochs=1"] < fetched["epochs unknown"], fetched
    assert fetched["max_epochs=1"] < fetched["max_epochs=2"], fetched
    with pytest.raises(ValueError, match=r"epochs=0 is invalid: allowed an int >= 1"):
        FastLoader(imagenet_dirs["tfrecord"], "validation", epochs=0)


def test_the_samples_drop_last_leaves_out_are_not_downloaded(s3, store, tmp_path):
    """The prefetch plans what the batches read: a unit holding only the partial last batch's
    samples is not fetched (it was, and held room to the epoch's end)."""
    from fastload import convert
    local = tmp_path / "small-shards"
    convert(str(IMAGENET), local, format="tfrecord", shard_size=5, workers=2, progress=False)  # 40 shards
    url = upload(local, f"{s3}/t")
    loader = FastLoader(url, "validation", batch_size=32, backend="reference", order="sequential", drop_last=True,
                        epochs=1, num_workers=1, spec="imagenet:eval", cache_dir=tmp_path / "cache")
    assert sum(len(labels) for _, labels in loader) == 192  # of 200
    time.sleep(0.5)
    records, files = loader.reader.records, [f["path"] for f in loader.reader.info.files_with_role("data")]
    order = loader.epoch_plan(0)[0]
    read = {files[f] for f in records["file"][order[:192]]}
    unread = {files[f] for f in records["file"][order[192:]]} - read
    fetched = {e[1].rsplit("/", 1)[-1] for e in store.log() if e[0] == "GET" and ".tfrecord" in e[1]}
    assert unread and not unread & fetched and read <= fetched, (unread, fetched)


def test_a_loader_dropped_mid_epoch_stops_downloading(s3, store, imagenet_dirs, tmp_path, monkeypatch):
    """Its prefetch would otherwise fetch the rest of the epoch's units for no one (a job that
    moves on to another loader, a notebook that drops one)."""
    import gc
    from fastload.formats import cache
    from fastload import convert
    monkeypatch.setattr(cache, "FETCHERS", 1)  # one unit at a time: the plan takes seconds
    local = tmp_path / "small-shards"
    convert(str(IMAGENET), local, format="tfrecord", shard_size=5, workers=2, progress=False)  # 40 shards
    url = upload(local, f"{s3}/t")
    store.latency(100)
    loader = FastLoader(url, backend="reference", cache_dir=tmp_path / "cache", **{**KW, "num_workers": 1})
    it = iter(loader)
    next(it)
    del it, loader
    gc.collect()
    time.sleep(0.5)  # the unit at hand is finished

    fetched = store.bytes_read(".tfrecord")
    time.sleep(1.5)
    assert store.bytes_read(".tfrecord") == fetched < sum(f.stat().st_size for f in local.glob("*.tfrecord"))


def test_a_full_cache_keeps_the_samples_of_batches_in_flight(s3, store, tmp_path, monkeypatch):
    """A cache too small for the units the batches need (a .beton of 8 MB units, a cache of 5 MB):
    each batch's samples come by range while the decoders read the batches ahead; making room for
    the next batch must not punch out theirs (it did: 'does not match their checksum', twice, on
    a correct dataset)."""
    from conftest import IMAGENET
    from fastload import convert
    from fastload.formats import beton
    monkeypatch.setattr(beton, "CHUNK_BYTES", 1)  # one page a unit: several units in 22 MB
    local = tmp_path / "beton"
    convert(str(IMAGENET), local, format="beton", workers=2, progress=False)
    f = Manifest.read(local).split("validation").files[0]
    assert f["size"] // f["chunk_size"] >= 2
    url = upload(local, f"{s3}/b")
    store.latency(5)
    limit = 5 * 2**20
    loader = FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", cache_limit=limit, order="shards",
                        columns=("index",), drop_last=False, **{**KW, "batch_size": 16})
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert sorted(i for _, _, index in loader for i in index.tolist()) == list(range(200))
    assert loader.manifest.remote.used_bytes() <= limit + 4 * 16 * int(loader.reader.records["size"].max())


def test_samples_dropped_to_make_room_are_no_longer_ready(s3, store, imagenet_dirs, tmp_path, monkeypatch):
    """Range-read samples punched out to make room are fetched again when next needed, not read
    from the hole (zeros that fail their check; on a full tmpfs, a mapped read of a hole is SIGBUS)."""
    import numpy as np
    from fastload.formats import cache
    monkeypatch.setattr(cache, "WAIT_FOR_UNITS", 0)  # samples by range, their units not awaited
    monkeypatch.setattr(cache.RemoteSplit, "_prefetch_units", lambda *a: None)
    url = upload(imagenet_dirs["beton"], f"{s3}/b")
    loader = FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
    remote, files = loader.reader.remote, loader.reader.remote.files
    index = np.arange(0, 200, 25)
    remote.ensure(index)
    assert remote.ready[index].all() and files.loose
    held = files.used_bytes()
    remote._recent.clear()  # no batch in flight
    assert files._drop_samples_read_ahead() and files.used_bytes() < held
    assert not remote.ready[index].any()
    local = FastLoader(imagenet_dirs["beton"], backend="ffcv", **KW).reader
    for i in index:  # read again: fetched again, the stored bytes
        assert np.array_equal(loader.reader.stored(int(i)), local.stored(int(i)))


def test_two_ranks_share_one_cache_and_download_each_unit_once(s3, store, imagenet_dirs, tmp_path):
    url = upload(imagenet_dirs["tfrecord"], f"{s3}/t")
    store.clear_log()
    store.latency(20)
    env = {**os.environ, **store.env(), "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, url, str(cache), str(rank)],
                              env={**env, "RANK": str(rank), "WORLD_SIZE": "2"}, stdout=subprocess.PIPE, text=True)
             for rank in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    m = Manifest.read(next(cache.glob("*/*")))
    shards = [f for f in m.split("validation").files if f["role"] == "data"]
    for f in shards:  # each shard fetched whole once, by one rank or the other
        whole = [e for e in store.log() if e[0] == "GET" and e[1].endswith(f["path"]) and e[2] == f"bytes=0-{f['size'] - 1}"]
        assert len(whole) == 1, (f["path"], whole)
    assert sum(json.loads(o)["samples"] for o in outs) == 200


_RANK_SCRIPT = """
import json, sys
from fastload import FastLoader
url, cache, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
loader = FastLoader(url, "validation", batch_size=16, backend="ffcv" if False else "reference", num_workers=1,
                    cache_dir=cache, spec="imagenet:eval", drop_last=False)
n = sum(len(labels) for _, labels in loader)
print(json.dumps({"rank": rank, "samples": n}))
"""


# --------------------------------------------------------------------------- faults
@pytest.mark.parametrize("kind", ["500", "reset", "truncate", "flip"])
def test_store_faults_are_retried_and_change_nothing(s3, store, imagenet_dirs, local_batches, tmp_path, kind):
    url = upload(imagenet_dirs["beton"], f"{s3}/b")
    store.clear_log()
    store.faults([{"match": ".beton", "method": "GET", "kind": kind, "count": 3},
                  {"match": "records.npy", "method": "GET", "kind": kind, "count": 1}])
    loader = FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
    assert same(batches(loader), local_batches["beton", "ffcv"])
    log = store.log()
    statuses = [e[3] for e in log]
    if kind == "500":
        assert statuses.count(500) == 4
    if kind == "flip":  # the index fails its sha256 and comes again; damaged samples fail their CRC32C
        # as read and come again by range (a unit is checked by its samples' CRCs, not a second hash)
        assert [e[1].endswith("records.npy") for e in log if e[0] == "GET"].count(True) == 2
        chunk = Manifest.open(imagenet_dirs["beton"]).split("validation").files_with_role("data")[0]["chunk_size"]
        sizes = [_range_size(e[2]) for e in log if e[0] == "GET" and e[1].endswith(".beton")]
        assert any(n < chunk // 4 for n in sizes), sizes  # a sample's range, not a unit again


def _range_size(header: str) -> int:
    start, end = header[len("bytes="):].split("-")
    return int(end) - int(start) + 1


def test_a_store_whose_bytes_differ_from_the_manifest_is_one_error(s3, store, imagenet_dirs, tmp_path):
    """Stored files changed after their manifest was written (one byte of each): the index is
    refused by its sha256; a sample by its CRC32C, once its copy from the store fails too."""
    from fastload.formats.records import SampleDecodeError
    url = upload(imagenet_dirs["beton"], f"{s3}/b")
    reader = FastLoader(imagenet_dirs["beton"], **KW).reader

    def store_changed(name: str, at: int) -> None:
        data = bytearray((imagenet_dirs["beton"] / name).read_bytes())
        data[at] ^= 0xFF
        _fs().pipe(f"{url[len('s3://'):]}/{name}", bytes(data))
    store_changed("validation.records.npy", 200)
    with pytest.raises(DatasetError, match=rf"{url}/validation.records.npy: bytes 0..\d+ do not match their sha256 "
                                           r"in the manifest, 6 downloads in a row: .*convert it again"):
        FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
    upload(imagenet_dirs["beton"], url)
    store_changed("validation.beton", int(reader.records["offset"][40]) + 500)
    for backend in ("ffcv", "reference"):
        loader = FastLoader(url, backend=backend, cache_dir=tmp_path / backend, **KW)
        with pytest.raises(SampleDecodeError, match=r"split 'validation' sample 40 .* does not decode: .*checksum.*"
                                                    r"Run `fastload verify"):
            batches(loader)


def test_a_stalled_store_times_out_and_is_retried(s3, store, imagenet_dirs, local_batches, tmp_path, monkeypatch):
    url = upload(imagenet_dirs["tfrecord"], f"{s3}/t")
    monkeypatch.setattr(location, "TIMEOUT_S", 1.0)
    store.faults([{"match": "-00002-", "method": "GET", "kind": "stall", "count": 1}])
    t = time.perf_counter()
    loader = FastLoader(url, backend="reference", cache_dir=tmp_path / "cache", **KW)
    assert same(batches(loader), local_batches["tfrecord", "reference"])
    assert time.perf_counter() - t < 40


def test_a_store_that_keeps_failing_is_one_error_naming_the_url(s3, store, imagenet_dirs, tmp_path):
    url = upload(imagenet_dirs["beton"], f"{s3}/b")
    store.faults([{"match": "records.npy", "method": "GET", "kind": "500", "count": 100}])
    with pytest.raises(DatasetError, match=rf"{url}/validation.records.npy: reading .* failed 6 times"):
        FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
    store.faults([{"match": ".beton", "method": "GET", "kind": "500", "count": 10000}])
    loader = FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
    store.clear_log()
    with pytest.raises(DatasetError, match=rf"{url}/validation.beton: reading bytes .* failed 6 times"):
        batches(loader)
    # a unit: 6 tries by the prefetch, then by the first batch, in each process that reads (the
    # loader and its workers); batches waiting on a fetch that failed share its error, not 6 more tries
    from collections import Counter
    tries = Counter(e[2] for e in store.log() if e[1].endswith(".beton"))
    assert tries and max(tries.values()) <= 24, tries


def test_no_manifest_and_missing_extra_are_one_line(s3, tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=rf"{s3}/nothing has no manifest.json, so it is not a complete"):
        FastLoader(f"{s3}/nothing", cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if the extra were not installed
    with pytest.raises(DatasetError, match=r"gs://b/x: reading gs:// locations needs gcsfs: pip install 'fastload\[gcs\]'"):
        FastLoader("gs://b/x", cache_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"does not read ftp:// locations"):
        FastLoader("ftp://host/x", cache_dir=tmp_path)


def test_a_cached_file_changed_after_verification_is_fetched_again(s3, store, imagenet_dirs, local_batches, tmp_path):
    url = upload(imagenet_dirs["beton"], f"{s3}/b")
    cache = tmp_path / "cache"
    batches(FastLoader(url, backend="ffcv", cache_dir=cache, **KW))
    beton = next(cache.glob("*/*/validation.beton"))
    reader = FastLoader(imagenet_dirs["beton"], **KW).reader
    damaged = [int(reader.records["offset"][i]) + 700 for i in (5, 77, 150)]
    with open(beton, "r+b") as f:
        for at in damaged:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x5A]))
    store.clear_log()
    for backend in ("ffcv", "reference"):
        assert same(batches(FastLoader(url, backend=backend, cache_dir=cache, **KW)),
                    local_batches["beton", "ffcv"] if backend == "ffcv" else
                    batches(FastLoader(imagenet_dirs["beton"], backend=backend, **KW)))
    assert any(e[2] for e in store.log() if e[0] == "GET" and e[1].endswith(".beton")), "nothing was fetched again"


def test_full_cache_disk_evicts_then_is_one_error(s3, imagenet_dirs, local_batches, tmp_path):
    from test_faults import small_disk
    url = upload(imagenet_dirs["tfrecord"], f"{s3}/t")
    with small_disk(tmp_path / "small", "16m") as disk:  # the dataset is 22 MB: evicted as it goes
        assert same(batches(FastLoader(url, backend="reference", cache_dir=disk, cache_limit=4 * 2**20,
                                       order="random", **KW)),
                    local_batches["tfrecord", "reference"])
    url = upload(imagenet_dirs["beton"], f"{s3}/b")
    with small_disk(tmp_path / "tiny", "4m") as disk:  # its one 22 MB unit does not fit
        loader = FastLoader(url, backend="ffcv", cache_dir=disk, **KW)
        with pytest.raises(DatasetError, match=r"is on a full disk .* free space there"):
            batches(loader)


def test_a_full_tmpfs_cache_never_reads_a_punched_page(s3, tmp_path, monkeypatch):
    """Units of 8 MB on a 4 MB tmpfs: evicting to make room on the full disk must spare the units
    of batches being decoded: a mapped read of a page punched out of a full tmpfs is SIGBUS (it
    was, 1 run in 3), not zeros that fail their check."""
    from conftest import IMAGENET
    from fastload import convert
    from fastload.formats import beton
    from test_faults import small_disk
    monkeypatch.setattr(beton, "CHUNK_BYTES", 1)  # one 8 MB page a unit
    local = tmp_path / "beton"
    convert(str(IMAGENET), local, format="beton", workers=2, progress=False)
    url = upload(local, f"{s3}/b")
    for attempt in range(3):
        with small_disk(tmp_path / f"tiny{attempt}", "4m") as disk:
            r = subprocess.run([sys.executable, str(ROOT / "tests" / "full_disk_reader.py"), url, str(disk)],
                               capture_output=True, text=True, timeout=200)
        assert r.returncode == 0, f"rc={r.returncode}: {r.stdout[-1500:]} {r.stderr[-1500:]}"
        assert re.fullmatch(r"DatasetError: the cache directory .* is on a full disk .*\n", r.stdout), r.stdout


def test_kill_9_of_a_rank_mid_download_leaves_nothing_stale(s3, store, imagenet_dirs, local_batches, tmp_path):
    url = upload(imagenet_dirs["beton"], f"{s3}/b")
    cache = tmp_path / "cache"
    store.latency(300)  # slow enough to kill it mid-transfer
    env = {**os.environ, **store.env()}
    p = subprocess.Popen([sys.executable, "-c", "import sys; from fastload import FastLoader; "
                          "l = FastLoader(sys.argv[1], 'validation', backend='ffcv', cache_dir=sys.argv[2], "
                          "batch_size=32, num_workers=1); [0 for _ in l]", url, str(cache)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not any(e[0] == "GET" and e[1].endswith(".beton") for e in store.log()):
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    store.latency(0)
    assert same(batches(FastLoader(url, backend="ffcv", cache_dir=cache, **KW)), local_batches["beton", "ffcv"])


# --------------------------------------------------------------------------- writing
@pytest.mark.parametrize("fmt", ["tfrecord", "beton"])
def test_convert_to_s3_writes_the_local_conversions_bytes_manifest_last(s3, store, tmp_path, fmt, monkeypatch):
    from fastload import convert
    monkeypatch.setenv("FASTLOAD_CACHE_DIR", str(tmp_path / "cache"))
    local = convert(str(IMAGENET), tmp_path / "local", format=fmt, workers=2, shard_size=48, progress=False)
    store.clear_log()
    remote = convert(str(IMAGENET), f"{s3}/{fmt}", format=fmt, workers=2, shard_size=48, progress=False)
    files = lambda m: {f["path"]: f["sha256"] for s in m.split_names for f in m.split(s).files}  # noqa: E731
    assert files(remote) == files(local)
    puts = [e[1].rsplit("/", 1)[-1] for e in store.log() if e[0] == "PUT" and e[3] == 200]
    assert puts[-1] == MANIFEST and set(puts) == set(files(local)) | {MANIFEST}
    assert not any((tmp_path / "cache" / "convert").glob("*/*")), "the staging copy was left behind"
    loaded = FastLoader(f"{s3}/{fmt}", cache_dir=tmp_path / "read", **KW)
    local_loader = FastLoader(tmp_path / "local", **KW)
    assert same(batches(loaded), batches(local_loader))
    from fastload.converters.jobs import ConversionError
    with pytest.raises(ConversionError, match="already holds a complete dataset"):
        convert(str(IMAGENET), f"{s3}/{fmt}", format=fmt, workers=2, progress=False)


def test_convert_to_s3_killed_resumes_without_uploading_a_shard_twice(s3, store, tmp_path):
    env = {**os.environ, **store.env(), "FASTLOAD_CACHE_DIR": str(tmp_path / "cache")}
    url = f"{s3}/killed"
    cmd = [sys.executable, "-m", "fastload.cli", "convert", str(IMAGENET), "--format", "tfrecord", "--out", url,
           "--workers", "1", "--shard-size", "20"]
    store.latency(150)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and sum(e[0] == "PUT" and e[1].endswith(".idx") for e in store.log()) < 2:
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    staging = next((tmp_path / "cache" / "convert").glob("*"))
    marked = {Path(m).stem for m in staging.glob(".partial/*.uploaded")}
    assert marked, "no shard was uploaded before the kill"
    before = _shard_puts(store)
    assert not any(e[0] == "PUT" and e[1].endswith(MANIFEST) for e in store.log())
    store.latency(0)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    after = _shard_puts(store)[len(before):]
    again = [name for name in after if any(name.startswith(f"validation-{m.split('-')[1]}-") for m in marked)]
    assert not again, f"shards uploaded and recorded before the kill were uploaded again: {again}"
    assert len(after) + len(marked) >= 10  # 200 images / 20: every other shard, once
    m = Manifest.open(url, cache_dir=tmp_path / "read")
    assert m.split("validation").num_examples == 200


def _shard_puts(store) -> list[str]:
    return [e[1].rsplit("/", 1)[-1] for e in store.log() if e[0] == "PUT" and e[3] == 200 and e[1].endswith(".tfrecord")]


def test_verify_a_remote_dataset(s3, imagenet_dirs, tmp_path):
    url = upload(imagenet_dirs["tfrecord"], f"{s3}/t")
    r = subprocess.run([sys.executable, "-m", "fastload.cli", "verify", url, "--no-decode", "--cache-dir",
                        str(tmp_path / "c")], capture_output=True, text=True, env=os.environ, timeout=300)
    assert r.returncode == 0 and f"OK {url}" in r.stdout, r.stderr


def test_a_version_3_dataset_reads_remotely_one_file_a_unit(s3, store, imagenet_dirs, local_batches, tmp_path):
    """Format version 3 had no chunk hashes: its .beton is fetched whole, checked by its sha256."""
    import shutil
    from fastload.formats.manifest import CHECKSUM_KEY, manifest_checksum
    old = tmp_path / "v3"
    shutil.copytree(imagenet_dirs["beton"], old)
    data = json.loads((old / MANIFEST).read_text())
    data["format_version"] = 3
    for f in data["splits"]["validation"]["files"]:
        f.pop("chunk_size", None), f.pop("chunk_sha256", None)
    data[CHECKSUM_KEY] = manifest_checksum(data)
    (old / MANIFEST).write_text(json.dumps(data))
    url = upload(old, f"{s3}/v3")
    store.clear_log()
    assert same(batches(FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)),
                local_batches["beton", "ffcv"])
    size = (old / "validation.beton").stat().st_size
    assert [e for e in store.log() if e[1].endswith(".beton") and e[2] == f"bytes=0-{size - 1}"]


@pytest.mark.parametrize("fits", [True, False])
def test_two_nodes_of_two_ranks_under_torchrun(s3, store, tmp_path, fits):
    """Two `torchrun --nnodes 2 --node_rank 0/1 --nproc_per_node 2` on a local rendezvous, each
    node its own cache and its own view of the store (a proxy each, to count its bytes)."""
    from fastload import convert
    from store_proxy import free_port
    local = tmp_path / "data"
    convert(str(IMAGENET), local, format="tfrecord", workers=2, shard_size=5, progress=False, shuffle_seed=0)
    url = upload(local, f"{s3}/multi")
    shards = {f.name: f.stat().st_size for f in local.glob("*.tfrecord")}
    dataset = sum(shards.values())
    limit = 0 if fits else dataset // 4  # a node's share is half the dataset: a quarter does not hold it
    nodes = [store] + [StoreServers(moto_port=store.moto_port)]
    port = free_port()
    try:
        for n in nodes:
            n.clear_log()
        procs = []
        for node, view in enumerate(nodes):
            env = {**os.environ, **view.env(), "FASTLOAD_CACHE_DIR": str(tmp_path / f"cache{node}"),
                   "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            procs.append(subprocess.Popen(
                [*torchrun(2, nnodes=2, node_rank=node, port=port), str(ROOT / "tests" / "multinode_worker.py"), url, str(tmp_path), str(limit)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=200)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
        ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
        seen = [i for r in ranks for i in r["indices"]]
        assert sorted(seen) == list(range(200))  # disjoint and complete (200 = 4 x 50)
        assert {r["order"] for r in ranks} == {"random" if fits else "shards"}
        for view in nodes:
            prefix = "/" + url[len("s3://"):] + "/"  # (other tests' loaders may still be prefetching)
            log = [e for e in view.log() if e[0] == "GET" and prefix in e[1] and e[1].endswith(".tfrecord")]
            whole = {}
            for e in log:
                name = e[1].rsplit("/", 1)[-1]
                if e[2] == f"bytes=0-{shards[name] - 1}":
                    whole[name] = whole.get(name, 0) + 1
            got = sum(e[4] for e in log)
            if fits:
                assert max(whole.values()) == 1, whole  # each unit downloaded at most once per node
            else:  # its own half of the units, each about once (the 1.1x target: scripts/bench_multinode.py);
                # here also the next epoch's first 2 batches, fetched ahead: 0.2-0.3x of a 6-batch share
                print(f"node bytes {got / (dataset / 2):.2f}x its share")
                assert got < 1.5 * dataset / 2, (got, dataset, whole)
    finally:
        nodes[1].close()


def test_a_cold_start_over_large_units_reads_samples_by_range(s3, store, imagenet_dirs, local_batches, tmp_path,
                                                              monkeypatch):
    """Where the units a batch needs dwarf its samples (ImageNet's first batch needs most of its
    units), the batch's samples come by range, checked by CRC, while the units download."""
    from fastload.formats import cache
    monkeypatch.setattr(cache, "WAIT_FOR_UNITS", 0)  # as if the units were far larger than a batch
    monkeypatch.setattr(cache.RemoteSplit, "_prefetch_units", lambda *a: None)  # and far from arriving
    url = upload(imagenet_dirs["beton"], f"{s3}/b")
    store.clear_log()
    loader = FastLoader(url, backend="ffcv", cache_dir=tmp_path / "cache", **KW)
    assert same(batches(loader), local_batches["beton", "ffcv"])
    size = (imagenet_dirs["beton"] / "validation.beton").stat().st_size
    ranges = [e for e in store.log() if e[1].endswith(".beton") and e[2] != f"bytes=0-{size - 1}"]
    assert len(ranges) >= 32, "the first batch did not read its samples by range"


# the allocation pattern of 8 unit downloads received by one client thread, then freed together
# (formats/cache.py's _keep_unit_buffers_on_the_heap): page faults while it repeats
_UNIT_BUFFERS = """
import resource, sys
from fastload import FastLoader
if sys.argv[1:]:
    loader = FastLoader(sys.argv[1], "validation", batch_size=8, backend="reference", num_workers=0)
chunk = b"x" * (64 << 10)
units = lambda: [b"".join([chunk] * 128) for _ in range(8)]  # 8 MB bodies
units()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    units()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_streaming_process_keeps_its_unit_buffers_faulted_in(s3, imagenet_dirs, tmp_path):
    """glibc maps each fresh 8 MB buffer (or trims it off the heap once 8 are freed), so every
    unit's pages are faulted in again: a process that opens a remote dataset keeps them on the
    heap, unless the user tuned malloc (GLIBC_TUNABLES)."""
    url = upload(imagenet_dirs["tfrecord"], f"{s3}/heap")
    env = {**os.environ, "FASTLOAD_CACHE_DIR": str(tmp_path / "cache")}

    def faults(*args, **extra):
        out = subprocess.run([sys.executable, "-c", _UNIT_BUFFERS, *args], env={**env, **extra},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])
    pages = 10 * 8 * (8 << 20) // 4096
    plain = faults()
    assert plain > pages // 2  # glibc's own policy: faulted in again, about every page
    assert faults(url) < pages // 20
    assert faults(url, GLIBC_TUNABLES="glibc.malloc.arena_max=8") > pages // 2  # the user's malloc: left alone
