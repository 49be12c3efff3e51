"""Epoch orders across ranks (#22): the global sequence, the shard-aware order, and an elastic
resume on another number of ranks, against real loaders on the real ImageNet sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastload import FastLoader
from fastload.pipelines.orders import global_order, order_quality, remainder
from fastload.pipelines.sampling import ORDER_STREAM, rng_for


def distributed_sampler(order: np.ndarray, rank: int, world: int, drop_last: bool) -> np.ndarray:
    """torch's own DistributedSampler's share of rank ``rank``, over a dataset in ``order``."""
    from torch.utils.data import DistributedSampler
    positions = list(DistributedSampler(range(len(order)), num_replicas=world, rank=rank, shuffle=False,
                                        drop_last=drop_last))
    return order[positions]


@pytest.mark.parametrize("n,world,drop_last", [(200, 4, False), (203, 4, False), (203, 3, True), (10, 1, False)])
def test_random_global_order_is_distributed_samplers(n, world, drop_last):
    g = global_order(n, kind="random", shuffle=True, seed=5, epoch=2, world_size=world, drop_last=drop_last)
    for r in range(world):
        permutation = rng_for(5, 2, ORDER_STREAM).permutation(n)
        assert np.array_equal(g[r::world], distributed_sampler(permutation, r, world, drop_last))
    plain = global_order(n, kind="random", shuffle=False, seed=5, epoch=2, world_size=world, drop_last=drop_last)
    for r in range(world):
        assert np.array_equal(plain[r::world], distributed_sampler(np.arange(n), r, world, drop_last))


def test_shard_aware_order_reads_a_share_of_the_units_and_every_sample():
    n, units_count, world = 4000, 40, 4
    units = np.repeat(np.arange(units_count), n // units_count)
    g = global_order(n, kind="shards", shuffle=True, seed=1, epoch=0, world_size=world, drop_last=False,
                     units=units, window_units=2)
    assert sorted(g.tolist()) == list(range(n))  # every sample once (n divides)
    for r in range(world):
        touched = np.unique(units[g[r::world]])
        assert len(touched) <= units_count // world + 1  # its own block of units (+1 where blocks meet)
    q_shards = order_quality(g[0::world], units, units, 64)
    assert q_shards["units_per_batch"] <= 3  # a window of 2 units (3 where windows meet)
    g2 = global_order(n, kind="shards", shuffle=True, seed=1, epoch=1, world_size=world, drop_last=False,
                      units=units, window_units=2)
    assert not np.array_equal(g, g2)  # a new order each epoch


@pytest.mark.parametrize("kind", ["random", "shards"])
@pytest.mark.parametrize("old,new,consumed", [(4, 2, 64), (2, 3, 96), (4, 1, 0), (3, 4, 150)])
def test_remainder_deals_every_unseen_sample_once(kind, old, new, consumed):
    n = 300
    units = np.arange(n) // 30
    g = global_order(n, kind=kind, shuffle=True, seed=0, epoch=0, world_size=old, drop_last=False, units=units)
    rest = remainder(g, consumed, new, drop_last=False)
    seen = set(g[:consumed].tolist())
    unique = list(dict.fromkeys(x for x in rest.tolist()))
    assert set(unique) == set(range(n)) - seen and len(rest) % new == 0
    assert len(rest) - len(unique) < new  # only the remainder rule's padding repeats


def _indices(loader) -> list[int]:
    return [i for _, _, index in loader for i in index.tolist()]


def _loaders(path, world, batch, monkeypatch, **kw):
    out = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        out.append(FastLoader(path, "validation", batch_size=batch, backend="ffcv", num_workers=1, seed=7,
                              spec="imagenet:train", columns=("index",), drop_last=False, **kw))
    return out


@pytest.mark.parametrize("order", ["random", "shards"])
def test_elastic_resume_on_another_number_of_ranks_sees_each_sample_once(imagenet_dirs, monkeypatch, order):
    path = imagenet_dirs["beton"]
    four = _loaders(path, 4, 8, monkeypatch, order=order)  # global batch 32
    consumed = []
    for loader in four:  # three steps on every rank, then a checkpoint
        it = iter(loader)
        for _ in range(3):
            consumed += next(it)[2].tolist()
    states = [loader.state_dict() for loader in four]
    assert all(s["samples_done"] == 96 for s in states)
    two = _loaders(path, 2, 16, monkeypatch, order=order)  # the same global batch on 2 ranks
    for loader in two:
        loader.load_state_dict(states[0])  # any one rank's state serves every new rank
        # the epoch keeps its length and the 3 steps done, as a trainer counting steps expects
        assert (len(loader), loader.state_dict()["batches_done"]) == (7, 3)  # 200 / 32, rounded up
    rest = [_indices(loader) for loader in two]
    assert len(rest[0]) == len(rest[1]) == 52  # (200 - 96) / 2: 4 batches, the last short
    assert not set(rest[0]) & set(rest[1])
    assert sorted(consumed + rest[0] + rest[1]) == list(range(200))
    # a sample's crop is the uninterrupted run's: crops are functions of (seed, epoch, sample)
    first = {int(i): img for full in _loaders(path, 4, 8, monkeypatch, order=order)
             for x, _, index in full for img, i in zip(x, index.tolist())}
    resumed = _loaders(path, 2, 16, monkeypatch, order=order)[1]
    resumed.load_state_dict(states[3])
    it = iter(resumed)
    x, _, index = next(it)
    assert any(i in first for i in index.tolist())
    for img, i in zip(x, index.tolist()):
        if i in first:
            assert torch.equal(img, first[i])
    # its own state, one step on, resumes again elsewhere: the global sequence is still 4 ranks'
    again = resumed.state_dict()
    assert again["samples_done"] == 96 + 32 and again["order_world_size"] == 4
    one = _loaders(path, 1, 32, monkeypatch, order=order)[0]
    one.load_state_dict(again)
    assert len(_indices(one)) == 200 - 128


def test_elastic_resume_refuses_another_global_batch_by_name(imagenet_dirs, monkeypatch):
    four = _loaders(imagenet_dirs["beton"], 4, 8, monkeypatch)
    state = four[0].state_dict()
    two = _loaders(imagenet_dirs["beton"], 2, 8, monkeypatch)[0]  # global 16, not 32
    with pytest.raises(ValueError, match=r"global batch size is 8 x 4 ranks, this loader's 8 x 2"):
        two.load_state_dict(state)


def test_a_class_sorted_source_converted_with_the_defaults_streams_as_varied_as_a_global_shuffle(tmp_path):
    """An image-folder-like source (sorted by class): kept in its order (--keep-order), its
    shards hold a class or two and a shard-aware order draws ~2 classes a batch; converted with
    the defaults (a seeded random write order), then streamed from a store with a cache of a
    quarter of its bytes (the loader then reads shard-aware), as many as a global permutation."""
    import datasets
    from conftest import CIFAR10
    from fastload import convert
    from fastload.testing.memory_store import memory_store
    if not CIFAR10.exists():
        pytest.skip("../shared/data is absent")
    ds = datasets.load_dataset(str(CIFAR10), split="test").sort("label").select(range(0, 10000, 10))
    src = tmp_path / "sorted"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(src))
    quality = {}
    for name, seed in (("as is", None), ("defaults", 0)):
        kw = {"shuffle_seed": None} if seed is None else {}
        m = convert(str(src), tmp_path / name, format="tfrecord", workers=2, shard_size=100, progress=False, **kw)
        assert m.data["write_order"] == {"shuffled": seed is not None, "seed": seed, "by": None if seed is None else "row"}
        loader = FastLoader(tmp_path / name, "train", batch_size=50, backend="reference", num_workers=0)
        reader = loader.reader
        labels, units = reader.labels, reader.units
        for kind in ("random", "shards"):
            g = global_order(len(reader), kind=kind, shuffle=True, seed=0, epoch=0, world_size=2, drop_last=False,
                             units=units, window_units=2)
            quality[name, kind] = order_quality(g[0::2], labels, units, 50)["labels_per_batch"]
        # each stored sample is its source row (source_index), label included
        src_labels = np.asarray(ds["label"])
        assert np.array_equal(src_labels[np.asarray(reader.records["source_index"])], labels)
        assert m.split("train").num_examples == 1000
    assert quality["as is", "shards"] < 0.5 * quality["as is", "random"]
    assert quality["defaults", "shards"] >= 0.9 * quality["defaults", "random"]
    # a loader that reads the sorted rows shard-aware says so, with the remedy; the shuffled, not
    with pytest.warns(RuntimeWarning, match=r"order='shards' gives \S+ distinct labels a batch, a global order "
                                            r"\S+: its rows are sorted by class\. Convert it again without --keep-order"):
        sorted_ = FastLoader(tmp_path / "as is", "train", batch_size=50, backend="reference", order="shards")
    assert sorted_.order_quality["labels_per_batch"] < 0.9 * sorted_.order_quality["global_labels_per_batch"]
    import warnings
    with memory_store() as store:
        url = store.upload(tmp_path / "defaults", "d")
        quarter = sum(f.stat().st_size for f in (tmp_path / "defaults").iterdir()) // 4
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            mixed = FastLoader(url, "train", batch_size=50, backend="reference", cache_dir=tmp_path / "cache",
                               cache_limit=quarter)
        assert mixed.order == "shards" and [str(w.message) for w in said if "outgrows its cache" in str(w.message)]
        assert not [w for w in said if "distinct labels" in str(w.message)]
    assert mixed.order_quality["labels_per_batch"] >= 0.9 * mixed.order_quality["global_labels_per_batch"]
