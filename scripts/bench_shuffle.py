#!/usr/bin/env python
"""Shuffle quality of fastload's epoch orders, measured: distinct labels and distinct units
(TFRecord shards) per batch, for the global permutation and the shard-aware order, on sources
sorted by class (as image-folder conversions are), written as they are and with --shuffle-seed.

    .venv/bin/python scripts/bench_shuffle.py [--tile 20] [--world 4] [--batch-size 256] [--cache-fraction 0.25]

Datasets: the ImageNet sample tiled ``--tile`` times and the CIFAR-10 sample, each sorted by
label, converted to TFRecord shards of ``--shard-size`` images. The shard-aware order's window is
what FastLoader picks for a cache of ``--cache-fraction`` of the dataset with ``--local-ranks``
ranks per node. Batches: one rank's, of ``batch-size / world`` samples (the global batch split).
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", type=int, default=20)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--local-ranks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch")
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--cache-fraction", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    from fastload import Manifest, convert
    from fastload.formats.records import SplitReader
    from fastload.pipelines.orders import global_order, order_quality
    cache = ROOT / ".cache" / "shuffle"
    print(f"world {args.world} ranks ({args.local_ranks} a node), global batch {args.batch_size} "
          f"({args.batch_size // args.world} a rank), shards of {args.shard_size} images, cache "
          f"{args.cache_fraction:.0%} of the dataset\n")
    print("| dataset | written | order | labels / batch | vs global | units / batch |")
    print("|---|---|---|---|---|---|")
    for name, tile in (("imagenet", args.tile), ("cifar", 1)):
        source = sorted_source(cache, name, tile)
        for written, seed in (("as sorted", None), ("--shuffle-seed 0", 0)):
            out = cache / f"{name}-x{tile}-{'shuffled' if seed is not None else 'sorted'}-s{args.shard_size}"
            if not (out / "manifest.json").exists():
                convert(str(source), out, format="tfrecord", workers=2, shard_size=args.shard_size, progress=False,
                        shuffle_seed=seed)
            reader = SplitReader(Manifest.read(out), "train")
            units, labels = reader.units, reader.labels
            n_units = len(np.unique(units))
            # FastLoader's window: a node's ranks' windows fill half its cache
            window = max(2, int(args.cache_fraction * n_units / 2 / args.local_ranks))
            per_rank = args.batch_size // args.world
            results = {}
            for kind in ("random", "shards"):
                q = [order_quality(global_order(len(reader), kind=kind, shuffle=True, seed=0, epoch=e,
                                                world_size=args.world, drop_last=True, units=units,
                                                window_units=window)[r::args.world], labels, units, per_rank)
                     for e in range(args.epochs) for r in range(args.world)]
                results[kind] = (np.mean([x["labels_per_batch"] for x in q]), np.mean([x["units_per_batch"] for x in q]))
            for kind, (lab, uni) in results.items():
                label = kind if kind == "random" else f"shards (window {window} of {n_units} units)"
                print(f"| {name} x{tile} ({len(reader)}) | {written} | {label} | {lab:.1f} | "
                      f"{lab / results['random'][0]:.0%} | {uni:.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
