"""FastLoader.stats(): what the training loop waited for, checked against loops whose times are
known, and each cause of the verdict made to happen (a slow rank: test_loader.py's torchrun job)."""
from __future__ import annotations

import json
import time

import pytest

from fastload import FastLoader
from fastload.cpu import usable_cores
from fastload.spec import PreprocessSpec, RandAugment
from fastload.stats import LoaderStats, verdict
from fastload.testing.memory_store import memory_store

pytestmark = pytest.mark.serial  # measures the cores and times of this machine: runs alone (Makefile)


def run(loader, step_s: float = 0.0):
    """One epoch with a model whose step lasts ``step_s``; (the loader's stats, the loop's wall time)."""
    t = time.perf_counter()
    for _ in loader:
        if step_s:
            time.sleep(step_s)
    return loader.stats(), time.perf_counter() - t


def test_wait_and_step_times_match_a_loop_whose_times_are_known(imagenet_dirs):
    """A model step of 100 ms a batch: the step time is that, within a few percent; a loader that
    works 40 ms a batch more (batch_transform) for a model with no step: the loop's whole time is
    wait. Margins hold on a loaded machine: a sleep only ever lasts longer."""
    loader = FastLoader(imagenet_dirs["beton"], "validation", batch_size=8, backend="ffcv", num_workers=2)
    s, wall = run(loader, step_s=0.1)
    assert s.batches == 25 and s.images == 200 and s.done
    assert 2.5 <= s.step_s <= 2.5 * 1.05 + 0.05, s.step_s
    assert s.seconds == pytest.approx(wall, rel=0.03)
    assert s.wait_fraction < 0.10 and s.verdict.startswith("compute-bound: training waited for data"), s.verdict
    slow = FastLoader(imagenet_dirs["beton"], "validation", batch_size=8, backend="ffcv", num_workers=2,
                      batch_transform=lambda x, y: (time.sleep(0.04), (x, y))[1])
    s, wall = run(slow)
    assert s.wait_s >= 25 * 0.04 and s.wait_s == pytest.approx(wall, rel=0.03) and s.step_s < 0.03 * wall
    assert s.wait_fraction > 0.95 and s.verdict.startswith("input-bound: training waited for data")
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d and d["wait_fraction"] == s.wait_fraction and d["slowest_rank"] is None


def test_an_epoch_in_progress_is_reported_and_kept_per_epoch(imagenet_dirs):
    loader = FastLoader(imagenet_dirs["beton"], "validation", batch_size=50, backend="ffcv", num_workers=1)
    assert loader.stats() is None
    it = iter(loader)
    next(it)
    next(it)
    s = loader.stats()
    assert (s.epoch, s.batches, s.images, s.done) == (0, 2, 100, False) and s.verdict
    it.close()
    run(loader)
    assert [(h.epoch, h.done) for h in loader.meter.history] == [(0, False), (0, True)]  # a broken epoch is kept


@pytest.mark.skipif(usable_cores() < 2, reason="needs 2 cores: one worker must leave one idle")
def test_one_worker_of_two_cores_is_named(imagenet_dirs):
    loader = FastLoader(imagenet_dirs["beton"], "validation", batch_size=16, backend="ffcv", num_workers=1)
    run(loader)
    s, _ = run(loader)  # a warm epoch
    assert s.wait_fraction > 0.10, s
    assert f"num_workers=1 of {usable_cores()} cores" in s.verdict and "raise num_workers" in s.verdict, s.verdict


def test_decoding_at_the_machines_limit_names_the_cores_it_would_take(imagenet_dirs):
    cores = usable_cores()
    loader = FastLoader(imagenet_dirs["beton"], "validation", batch_size=16, backend="ffcv", num_workers=cores)
    run(loader)
    s, _ = run(loader, step_s=0.001)  # a model of 16,000 img/s
    assert s.wait_fraction > 0.5, s
    assert "cores busy, the machine's limit: the model could take" in s.verdict, s.verdict
    assert "which would take about" in s.verdict


def test_augmentations_on_the_cpu_are_named(cifar_dirs):
    spec = PreprocessSpec.preset("cifar10", train=True).replace(auto_augment=RandAugment())
    loader = FastLoader(cifar_dirs["beton"], "train", batch_size=64, backend="ffcv", num_workers=2, spec=spec)
    s, _ = run(loader)
    assert s.batch_ops_s > 0.5 * s.wait_s, s
    assert "fastload's augmentations took" in s.verdict and "device='cuda'" in s.verdict, s.verdict


def test_a_cold_cache_and_a_cache_too_small_are_named(imagenet_dirs, tmp_path, monkeypatch):
    from fastload.storage import prefetch
    monkeypatch.setattr(prefetch, "FETCHERS", 1)  # a store that serves one unit at a time
    with memory_store() as mem:
        url = mem.upload(imagenet_dirs["tfrecord"], "t")
        mem.delay(0.3)  # and slowly: 300 ms a request
        cold = FastLoader(url, "validation", batch_size=32, backend="reference", num_workers=2,
                          cache_dir=tmp_path / "roomy", order="random")
        s, _ = run(cold)
        assert s.store_bytes > 0.9 * sum(cold.manifest.source.units.sizes.values()) and s.store_wait_s > 0.5
        assert "reading waited on the store" in s.verdict and "the cache was cold" in s.verdict, s.verdict
        s, _ = run(cold)  # warm: the store is not waited on
        assert s.store_bytes == 0 and s.store_wait_s == 0 and "store" not in s.verdict
        mem.delay(0.05)
        small = FastLoader(url, "validation", batch_size=32, backend="reference", num_workers=2,
                           cache_dir=tmp_path / "small", cache_limit=6 * 2**20, order="random")
        s, _ = run(small)  # a cache of 2 shards for a random order over 7: units come and go all epoch
        assert s.store_wait_s > 0.5 * s.wait_s, s
        assert "holds less than the dataset" in s.verdict and "raise cache_limit" in s.verdict, s.verdict


def test_the_verdict_of_a_slow_rank_names_it():
    """The rule alone (the torchrun job in test_loader.py makes it happen)."""
    s = LoaderStats(epoch=0, batches=10, images=320, wait_s=1.0, step_s=9.0, rank_wait_fractions=[0.1, 0.6, 0.05])
    assert verdict(s).startswith("input-bound on rank 1: it waited for data 60% of the time, the others 10% at most")
    even = LoaderStats(epoch=0, batches=10, images=320, wait_s=0.1, step_s=9.9, rank_wait_fractions=[0.01, 0.02])
    assert verdict(even).startswith("compute-bound")


def test_the_verdict_of_a_short_epochs_start_and_of_idle_cores():
    """Rules alone: an epoch whose first batch is most of its wait; cores idle with enough workers."""
    start = LoaderStats(epoch=0, batches=4, images=200, wait_s=0.4, first_wait_s=0.3, step_s=1.0, cpu_s=1.0,
                        cores=2, num_workers=2)
    assert "most of it is the epoch's start (0.30 s for its first batch, 4 batches an epoch)" in verdict(start)
    idle = LoaderStats(epoch=0, batches=40, images=2000, wait_s=2.0, first_wait_s=0.1, step_s=1.0, cpu_s=0.6,
                       cores=2, num_workers=2)
    assert "only 0.2 of 2 cores are busy: reading waits on the disk" in verdict(idle)
