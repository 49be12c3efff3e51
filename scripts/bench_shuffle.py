#!/usr/bin/env python
"""Shuffle quality and bytes of a dataset streamed through a small cache (#34, items 1 and 2).

    .venv/bin/python scripts/bench_shuffle.py [--tile 10] [--batch-size 64] [--cache-fraction 0.25] [--epochs 4]

Sources sorted by label, as image folders are: the ImageNet sample tiled ``--tile`` times and the
CIFAR-10 sample. Each is converted with fastload's defaults (a seeded random write order; shards
as many as the size gives: 8 for a dataset under 8,192 images) and with ``--keep-order``, to
TFRecord shards and to a .beton, and also the ImageNet sample alone (200 photos) to a .beton: a
single small file. Each is then streamed by FastLoader, as a training job would with
no other argument than ``cache_limit``, from an object store (fastload.testing.memory_store:
the real store client, cache and prefetch over an in-memory store) with a cache of
``--cache-fraction`` of the dataset's bytes, for ``--epochs`` epochs (the loader told so).

Reported per dataset: the order the loader chose, its shuffle window (units), the distinct labels
per batch of the batches it gave, against a global permutation's (the same labels, the same batch
size), and the bytes read from the store per epoch as a multiple of the dataset's data bytes
(each epoch also fetches the next one's first batches, but the last, as the loader knows the
epoch count), and their mean.
Targets (#34): >= 90% of a global permutation's labels, <= 1.1x the bytes, at a 25% cache.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def sorted_source(cache: Path, name: str, tile: int) -> Path:
    import datasets
    out = cache / f"{name}-sorted-x{tile}"
    if not (out / "dataset_dict.json").exists():
        path, split = {"imagenet": (SHARED / "imagenet-1k-sample", "validation"),
                       "cifar": (SHARED / "cifar10-sample", "test")}[name]
        ds = datasets.load_dataset(str(path), split=split)
        ds = datasets.concatenate_datasets([ds] * tile).sort("label")
        datasets.DatasetDict({"train": ds}).save_to_disk(str(out))
    return out


def streamed(directory: Path, split: str, fraction: float, batch_size: int, epochs: int, tmp: Path) -> dict:
    """One dataset streamed through a cache of ``fraction`` of its bytes (see the docstring)."""
    import warnings

    from fastload import FastLoader, Manifest
    from fastload.pipelines.orders import order_quality
    from fastload.testing.memory_store import memory_store
    m = Manifest.read(directory)
    data = sum(f["size"] for f in m.split(split).files_with_role("data"))
    total = sum(f["size"] for f in m.split(split).files)
    with memory_store() as store, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loader's 'outgrows its cache' notice: expected here
        url = store.upload(directory, directory.name)
        loader = FastLoader(url, split, batch_size=batch_size, num_workers=2, epochs=epochs,
                            spec="imagenet:eval" if m.preset != "cifar10" else None, columns=("index",),
                            cache_dir=tmp / directory.name, cache_limit=int(fraction * total))
        labels, per_epoch, seen = loader.reader.labels, [], []
        before = 0  # (the first epoch's first batches come while the loader is made)
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for _, _, index in loader:
                seen.append(index.numpy())
            now = loader.schedule.store_counters()[0]
            per_epoch.append((now - before) / data)
            before = now
    order = np.concatenate(seen)
    full = len(order) // batch_size * batch_size
    got = order_quality(order[:full], labels, labels, batch_size)["labels_per_batch"]
    rng = np.random.default_rng(0)
    ref = np.mean([order_quality(rng.permutation(len(labels))[:full], labels, labels, batch_size)["labels_per_batch"]
                   for _ in range(3)])
    units = len(np.unique(loader.reader.units))
    return {"order": loader.order, "window": loader.window_units, "units": units, "labels": got, "global": ref,
            "bytes": per_epoch}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cache-fraction", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    import tempfile

    from fastload import convert
    cache = ROOT / ".cache" / "shuffle"
    print(f"batch {args.batch_size}, cache {args.cache_fraction:.0%} of the dataset's bytes, {args.epochs} epochs\n")
    print("| dataset | written | storage | order (window / units) | labels / batch | vs global | bytes / epoch | mean |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [("imagenet", args.tile, fmt, keep) for fmt in ("tfrecord", "beton") for keep in (False, True)]
    cases += [("imagenet", 1, "beton", False), ("cifar", 1, "tfrecord", False)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, tile, fmt, keep in cases:
            source = sorted_source(cache, name, tile)
            out = cache / f"{name}-x{tile}-{fmt}-{'kept' if keep else 'defaults'}"
            if not (out / "manifest.json").exists():
                convert(str(source), out, format=fmt, workers=2, progress=False,
                        **({"shuffle_seed": None} if keep else {}))
            r = streamed(out, "train", args.cache_fraction, args.batch_size, args.epochs, Path(tmp))
            order = f"{r['order']} ({r['window']} / {r['units']})" if r["order"] == "shards" else r["order"]
            print(f"| {name} x{tile}, sorted | {'--keep-order' if keep else 'defaults'} | {fmt} | "
                  f"{order} | {r['labels']:.1f} | {r['labels'] / r['global']:.0%} | "
                  f"{' / '.join(f'{b:.2f}x' for b in r['bytes'])} | {np.mean(r['bytes']):.2f}x |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
