"""``FastLoader``: what a training loop iterates. One interface over the ffcv, DALI and reference backends.

Data flows one way: the dataset directory (manifest + records index) -> an epoch's order
and geometry rows (shared, seeded) -> the backend's decode + geometry -> shared batch ops
(labels, augmentations, MixUp/CutMix, normalization) on ``device`` -> ``(images, labels)``.
"""
from __future__ import annotations

import os
import time
import weakref
from typing import Iterator

import numpy as np
import torch

from .arguments import call_batch_transform, check_loader_arguments, distributed_rank_world, resolve_device
from .columns import ExtraColumns
from .formats.manifest import DatasetError
from .formats.records import DEFAULT_MAX_PIXELS, SplitReader
from .pipelines import registry
from .pipelines.orders import shard_order_quality
from .spec import PRESETS, PreprocessSpec, resolve_spec
from .stats import LoaderStats, LoopMeter
from .storage import heap, open_dataset
from .storage.schedule import DEFAULT_WINDOW_UNITS, schedule_for
from .subset import select_samples, subset_digest


class FastLoader:
    """Iterate ``(images, labels)`` batches of one split of a fastload dataset directory.

    >>> loader = FastLoader("data/imagenet", "train", batch_size=256)   # doctest: +SKIP
    >>> for epoch in range(90):
    ...     loader.set_epoch(epoch)
    ...     for images, labels in loader: ...

    ``spec``: a :class:`PreprocessSpec`, a preset name (``'imagenet'``, ``'cifar10:eval'``), or
    None for the dataset's preset (train variant for the split named ``train``, eval otherwise).
    ``distributed``: 'auto' shards by rank when a process group or torchrun environment exists.
    ``order``: 'auto' (default) reads splits other than 'train' in order ('sequential', as torchvision and
    timm evaluate); for 'train' it is 'random', a global permutation, or where this node's share of a remote
    dataset outgrows its cache 'shards' (each rank reads its own units, a window at a time, pipelines/orders.py),
    with a warning. ``loader.order`` says which;
    under 'shards', ``loader.order_quality`` gives its distinct labels per batch against a global
    order's, and a warning says when rows sorted by class make it mix poorly.
    A checkpoint resumes on another number of ranks with the same global batch size.
    The remainder rule is ``DistributedSampler``'s (see :func:`fastload.pipelines.sampling.rank_share`).

    ``indices`` / ``classes``: train on a subset (sample indices of the split, or the samples with
    one of these labels) without converting again; labels keep their ids.
    ``repeated_augmentation=k``: each drawn sample k times per epoch with independent crops and
    augmentations, split across ranks as timm's ``RepeatAugSampler`` (DeiT) does.
    ``columns``: extra per-sample columns to return, e.g. ``("index", "coarse_label")``; batches
    are then named tuples ``(images, labels, *columns)``. The default output is ``(images, labels)``.
    ``batch_transform``: ``f(images, labels) -> (images, labels)``, run on ``device`` after
    fastload's own batch ops, for what the spec does not cover (its randomness is yours to seed).
    ``check_samples``: each sample's bytes are checked as they are read (their CRC32C, a JPEG's
    structure and size) before any decoder sees them; False skips that (a few % faster on raw
    CIFAR; a damaged file then reaches the decoders). ``max_pixels``: the most pixels an image of
    the dataset may have (a decompression-bomb guard; PIL's limit by default).

    ``path`` is a dataset directory or URL: ``s3://``, ``gs://``, ``hf://``, ``https://`` datasets
    are read through a node-local cache at ``cache_dir`` (default ``$FASTLOAD_CACHE_DIR``, else
    ``~/.cache/fastload``), shared by the node's ranks, holding at most ``cache_limit`` bytes
    (None: the disk's room). Their batches are the local dataset's, bit for bit. Each epoch's
    first batches download during the epoch before; ``epochs``, the job's epoch count where it is
    known (FastDataModule passes the trainer's), spares the last epoch that download.
    ``loader.stats()``: how long the training loop waited for data this epoch, and why (stats.py).
    """

    def __init__(self, path, split: str = "train", batch_size: int = 256, spec=None, backend: str = "auto",
                 device="cpu", num_workers: int | None = None, seed: int = 0, drop_last: bool | None = None,
                 order: str = "auto", distributed="auto", *, indices=None, classes=None,
                 repeated_augmentation: int = 1, columns=(), batch_transform=None, check_samples: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir=None, cache_limit: int | None = None,
                 epochs: int | None = None):
        check_loader_arguments(batch_size=batch_size, num_workers=num_workers, seed=seed, order=order,
                               repeated_augmentation=repeated_augmentation, batch_transform=batch_transform,
                               backend=backend, epochs=epochs, check_samples=check_samples, drop_last=drop_last)
        self.manifest = open_dataset(path, cache_dir=cache_dir, cache_limit=cache_limit)
        self.split = split
        self.reader = SplitReader(self.manifest, split, max_pixels=max_pixels)
        weakref.finalize(self, self.reader.close)  # a loader dropped mid-epoch stops its downloads
        if spec is None and self.manifest.preset not in PRESETS:
            raise DatasetError(f"{self.manifest.name}: its manifest names preset {self.manifest.preset!r}, which this "
                               f"fastload does not have ({sorted(PRESETS)}): pass spec=...")
        self.spec: PreprocessSpec = resolve_spec(spec, self.manifest.preset, train=split == "train")
        self.device = resolve_device(device)
        self.batch_size, self.seed, self.epochs = batch_size, int(seed), epochs
        order = "sequential" if order == "auto" and split != "train" else order  # evaluation reads in order
        self.shuffle = order != "sequential"
        self.drop_last = (split == "train") if drop_last is None else bool(drop_last)
        self.num_workers = num_workers if num_workers is not None else max(1, (os.cpu_count() or 1))
        self.rank, self.world_size = distributed_rank_world(distributed)
        self.repeats = repeated_augmentation
        self.indices = select_samples(self.reader, indices, classes)
        # storage/schedule.py: a remote dataset's prefetch, asking this loader through a weak proxy: a dropped
        # loader is freed at once (a collector may close a DataLoader's queues before its workers stop: 5 s each)
        self.schedule = schedule_for(self.reader, weakref.proxy(self), rank=self.rank, world_size=self.world_size,
                                     batch_size=batch_size, drop_last=self.drop_last, repeats=self.repeats,
                                     epochs=epochs)
        self.order = self.schedule.choose_order(order, self.manifest.name)
        self._elastic = None  # (epoch, samples consumed, world size that ordered it): an elastic resume
        self._global_order = {}  # key -> order, of the last two epochs ordered
        # the shuffle window is part of the order: sized once, from the cache, and kept in the state
        self.window_units = self.schedule.window_units(self.reader.units[self.indices]) if self.order == "shards" \
            else None
        self.order_quality = shard_order_quality(
            self.global_order(0)[self.rank::self.world_size], self.reader.labels[self.indices],
            self.reader.units[self.indices], self.batch_size, self.seed, self.manifest.name) \
            if self.order == "shards" and self.shuffle else None
        self.columns, self.batch_transform = ExtraColumns(self.reader, columns), batch_transform
        self.epoch = 0
        self._batches_done = 0   # batches of `epoch` handed out (state_dict)
        self._resume_batch = 0   # where the next iteration starts (load_state_dict)
        self._resolution = None  # set_resolution's override of the spec's schedule
        self.schedule.start(self.epoch, 0)  # a remote dataset's first batches arrive while the backend is set up
        entry = registry.resolve_backend(backend, self.manifest.storage, self.manifest.root)
        self.backend = entry.name
        from fastload.pipelines.base import BackendOptions
        from fastload.pipelines.batch_ops import BatchTransform
        try:  # 'dataset' normalization reads the manifest: a problem there is the dataset's
            self.spec.normalize.resolve(self.reader.info.stats)
        except ValueError as e:
            raise DatasetError(f"{self.manifest.name}: split {split!r} cannot be normalized as the spec asks: {e}; "
                               "give a spec with normalize=Normalize('imagenet', 'imagenet') or values") from None
        self.transform = BatchTransform(self.spec, self.reader.labels, self.manifest.num_classes,
                                        self.manifest.multi_label, self.reader.info.stats, self.device)
        # backends that fuse normalization do it in their last pass when no op needs 0..255 levels
        fused = self.transform.normalize_params if self.transform.backend_may_normalize else None
        self._options = BackendOptions(batch_size=batch_size, num_workers=self.num_workers, drop_last=self.drop_last,
                                       device=self.device, seed=self.seed, normalize=fused,
                                       fallback_to_cpu=device in (None, "auto"), check_samples=check_samples)
        self._make_backend = entry.load()
        self.pipeline = self._make_backend(self.reader, self.spec_for_epoch(self.epoch), self._options)
        self.meter = LoopMeter(num_workers=self.num_workers, rank=self.rank, cache_limit=cache_limit,
                               dataset_bytes=sum(self.manifest.source.units.sizes.values()),
                               hints={"augment_on_cpu": self.device.type == "cpu" and not self.transform.light})

    def stats(self) -> LoaderStats | None:
        """The current (or last) epoch as the training loop saw it: its wait and step times, img/s,
        the store's share, and a verdict (fastload/stats.py); ``.to_dict()`` for a logger."""
        return self.meter.stats()

    # ------------------------------------------------------------------ torch-like surface
    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose order and augmentations the next iteration uses (as DistributedSampler).
        Setting the epoch a checkpoint was taken in keeps its resume point."""
        if int(epoch) != self.epoch:
            self._resume_batch = 0
        self.epoch = int(epoch)
        self.schedule.start(self.epoch, self._resume_batch)

    # ------------------------------------------------------------------ resolution
    def set_resolution(self, size) -> None:
        """Output size from the next epoch on (an int or (height, width)), overriding the spec's
        ``resolution`` schedule; None returns to the schedule. Eval geometry keeps its crop fraction."""
        if size is not None:
            self.spec.at_size(size)  # validates
        self._resolution = size

    def spec_for_epoch(self, epoch: int):
        """The spec an epoch runs: the set resolution, else the schedule's, else the spec's own."""
        return self.spec.for_epoch(epoch) if self._resolution is None else self.spec.at_size(self._resolution)

    @property
    def resolution(self) -> tuple[int, int]:
        """Output (height, width) of the current epoch."""
        return self.spec_for_epoch(self.epoch).size

    def _backend_for(self, spec):
        """The backend for an epoch's spec: rebuilt when its output size changed (progressive
        resolution), kept otherwise."""
        if spec.geometry != self.pipeline.spec.geometry:
            self.pipeline.close()
            self.pipeline = self._make_backend(self.reader, spec, self._options)
        return self.pipeline

    # ------------------------------------------------------------------ checkpointing
    STATE_FORMAT = "fastload-loader/1"

    def state_dict(self) -> dict:
        """Where this loader is, as torchdata's ``StatefulDataLoader`` reports it: save it with the
        model after a training step, and :meth:`load_state_dict` makes the next batch the one that
        would have come next (bit-identical: order, crops and augmentations are functions of the
        seed, the epoch and the batch's position, so no skipped batch is decoded)."""
        elastic = self._elastic if self._elastic is not None and self._elastic[0] == self.epoch else None
        consumed = self._batches_done * self.batch_size * self.world_size  # the global batch is the same
        return {"format": self.STATE_FORMAT, "epoch": self.epoch, "batches_done": self._batches_done,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                # where the epoch's global sequence stands (elastic resume): samples consumed across
                # all ranks, and the world size that ordered the epoch
                "samples_done": consumed, "order_world_size": elastic[2] if elastic else self.world_size,
                "global_batch_size": self.batch_size * self.world_size, "order": self.order,
                "window_units": self.window_units,
                "batch_size": self.batch_size, "num_samples": self.num_samples, "dataset_size": len(self.reader),
                "drop_last": self.drop_last, "shuffle": self.shuffle, "spec": self.spec.to_dict(),
                "subset": subset_digest(self.indices, len(self.reader)), "repeated_augmentation": self.repeats,
                "resolution": None if self._resolution is None else list(self.resolution)}

    def load_state_dict(self, state: dict) -> None:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        if fmt != self.STATE_FORMAT:
            raise ValueError(f"not a FastLoader state (format {fmt!r}, expected {self.STATE_FORMAT!r}): pass what "
                             "state_dict() returned")
        mine = self.state_dict()
        old_world = state.get("world_size", mine["world_size"])
        if state.get("global_batch_size", state.get("batch_size", 0) * old_world) != mine["global_batch_size"]:
            raise ValueError(f"the checkpoint's global batch size is {state.get('batch_size')} x {old_world} ranks, "
                             f"this loader's {self.batch_size} x {self.world_size}: resume with the same global batch "
                             f"size (per-rank batch_size = global / world size)")
        elastic = old_world != self.world_size or state.get("order_world_size", old_world) != self.world_size
        same = ("seed", "dataset_size", "drop_last", "shuffle", "spec", "subset", "repeated_augmentation", "order")
        differ = [k for k in same + (() if elastic else ("batch_size",)) if state.get(k, mine[k]) != mine[k]]
        if differ:
            diffs = ", ".join(f"{k}={state.get(k)!r} (this loader: {mine[k]!r})" for k in differ if k != "spec")
            raise ValueError(f"the checkpoint's loader differs from this one in {differ}: {diffs or 'the spec'}; "
                             "resume with the same dataset, seed, global batch size and spec")
        if elastic and self.repeats > 1:
            raise ValueError(f"the checkpoint was taken on {old_world} ranks, this loader runs on {self.world_size}: "
                             "resuming repeated_augmentation on another number of ranks is not supported")
        self._elastic = None
        window = state.get("window_units")
        if window is not None and self.order == "shards":
            if not (isinstance(window, int) and window >= 1):
                raise ValueError(f"window_units={window!r} is invalid: a state_dict() holds a positive integer")
            self.window_units = window  # the order the checkpoint's ranks read, whatever room this cache has now
        if elastic:  # the epoch's global sequence, from where all ranks stood, dealt to this world
            done = state.get("samples_done", int(state["batches_done"]) * state["global_batch_size"])
            if not (isinstance(done, int) and done >= 0 and done % mine["global_batch_size"] == 0):
                raise ValueError(f"samples_done={done!r} is invalid: a state_dict() at a step boundary holds a "
                                 f"multiple of the global batch size {mine['global_batch_size']}")
            self._elastic = (int(state["epoch"]), done, int(state.get("order_world_size", old_world)))
            # as many batches done as the old ranks had (global_order keeps what they consumed first),
            # so a trainer that counts steps (Lightning) counts the epoch's length as before
            self.epoch, self._resume_batch = int(state["epoch"]), done // mine["global_batch_size"]
        else:
            self.epoch, self._resume_batch = int(state["epoch"]), int(state["batches_done"])
        if not 0 <= self._resume_batch <= len(self):
            raise ValueError(f"batches_done={state['batches_done']!r} is invalid: allowed 0..{len(self)}")
        self._batches_done = self._resume_batch
        if state.get("resolution") is not None:
            self._resolution = tuple(state["resolution"])
        self.schedule.start(self.epoch, self._resume_batch)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (before drop_last on the final batch); in an epoch
        resumed on another number of ranks, its share of that epoch's sequence (global_order)."""
        from fastload.pipelines.sampling import rank_share, repeated_share
        if self._elastic is not None and self._elastic[0] == self.epoch:
            return len(self.global_order(self.epoch)) // self.world_size
        if self.repeats > 1:
            return repeated_share(len(self.indices), self.world_size)
        return rank_share(len(self.indices), self.world_size, self.drop_last)

    def __len__(self) -> int:
        from fastload.pipelines.sampling import num_batches
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's global sequence over the selected samples (pipelines/orders.py): rank r
        reads ``[r::world_size]``. An epoch resumed on another number of ranks: what the old ranks
        consumed, then what was left of it dealt to this world (each rank skips its part of the
        first, as in any resume)."""
        from fastload.pipelines.orders import global_order, remainder
        elastic = self._elastic if self._elastic is not None and self._elastic[0] == epoch else None
        world = elastic[2] if elastic else self.world_size
        units = self.reader.units[self.indices] if self.order == "shards" else None
        key = (epoch, elastic, self.seed, self.window_units)
        if key in self._global_order:  # the start-up's quality check; this epoch's and the next's prefetch
            return self._global_order[key]
        g = global_order(len(self.indices), kind="shards" if self.order == "shards" else "random",
                         shuffle=self.shuffle, seed=self.seed, epoch=epoch, world_size=world,
                         drop_last=self.drop_last, units=units, window_units=self.window_units or DEFAULT_WINDOW_UNITS)
        if elastic:
            g = np.concatenate([g[:elastic[1]], remainder(g, elastic[1], self.world_size, self.drop_last)])
        g.flags.writeable = False  # one copy, shared by every caller of this epoch
        self._global_order = {**dict(list(self._global_order.items())[-1:]), key: g}  # this epoch's and the next's
        return g

    def epoch_plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(this rank's sample order, a geometry row per position) of an epoch: pure functions of the
        seed. A sample's crop does not depend on the subset or world size, except under repeated
        augmentation, where each copy draws its own."""
        from fastload.pipelines.sampling import geometry_params
        e = self.epoch if epoch is None else epoch
        spec = self.spec_for_epoch(e)
        order = self.rank_order(e)
        if self.repeats > 1:
            params = geometry_params(spec.geometry, spec.hflip, self.reader.heights[order], self.reader.widths[order],
                                     self.seed, e, stream=(self.rank,))
        else:
            params = geometry_params(spec.geometry, spec.hflip, self.reader.heights, self.reader.widths,
                                     self.seed, e)[order]
        return order, params

    def global_samples(self, epoch: int) -> np.ndarray:
        """The epoch's global sequence as sample indices of the split."""
        return self.indices[self.global_order(epoch)]

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's samples of an epoch, in order."""
        from fastload.pipelines.sampling import repeated_epoch_indices
        if self.repeats > 1:
            return self.indices[repeated_epoch_indices(len(self.indices), self.repeats, shuffle=self.shuffle,
                                                       seed=self.seed, epoch=epoch, rank=self.rank,
                                                       world_size=self.world_size)]
        return self.indices[self.global_order(epoch)[self.rank::self.world_size]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self._resume_batch
        self._resume_batch = 0
        order, params = self.epoch_plan(epoch)
        threads = torch.get_num_threads()
        # ffcv/DALI decode on their own threads; on CPU, torch's threads in light batch ops only fight them for
        # cores (-10..40% on 2 cores). Augmentations on CPU can be the bottleneck: they keep the caller's threads.
        light = self.device.type == "cpu" and self.backend != "reference" and self.transform.light
        batch_threads = 1 if light else threads
        self._batches_done = start
        skip = start * self.batch_size  # resume: later batches only
        self.schedule.begin_epoch(epoch, order, skip)
        batches = self._backend_for(self.spec_for_epoch(epoch)).run_epoch(order[skip:], params[skip:])
        yield from self.meter.metered(self._batches(batches, epoch, start, batch_threads, threads), epoch,
                                      self.schedule.store_counters, len(self) - start)
        self.epoch, self._batches_done = epoch + 1, 0  # a completed pass moves on, as ffcv's Loader does
        heap.release_free_pages()  # an epoch's freed heap back to the system (storage/heap.py)

    def _batches(self, batches, epoch, start, batch_threads, threads):
        from fastload.pipelines.sampling import augment_rng
        for b, (images, index) in enumerate(batches, start):
            # restored before the yield: a generator left suspended there (a `break`, then exit)
            # has nothing to undo when the interpreter closes it
            torch.set_num_threads(batch_threads)
            t = time.perf_counter()
            try:  # one random stream per batch: a resumed epoch draws what the uninterrupted one drew
                images, labels = self.transform(images, index, augment_rng(self.seed, epoch, self.rank, b))
            finally:
                torch.set_num_threads(threads)
            self.meter.current.batch_ops_s += time.perf_counter() - t
            if self.batch_transform is not None:
                images, labels = call_batch_transform(self.batch_transform, images, labels)
            self._batches_done = b + 1
            self.schedule.advance(b + 1 - start)
            yield self.columns.batch(images, labels, index)

    def __repr__(self) -> str:
        return (f"FastLoader({self.manifest.name!r}, split={self.split!r}, backend={self.backend!r}, "
                f"batch_size={self.batch_size}, device={str(self.device)!r}, batches={len(self)}, "
                f"rank={self.rank}/{self.world_size})")
