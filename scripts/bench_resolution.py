#!/usr/bin/env python
"""The pause a resolution change costs: seconds from an epoch's start to its first batch, for
epochs whose output size changed (the backend is rebuilt) and epochs whose size did not.

    .venv/bin/python scripts/bench_resolution.py [--beton DIR] [--tfrecord DIR] [--workers 2]

Defaults: the tiled ImageNet sample `make bench` leaves in .cache/peers. The schedule changes
size every other epoch (160, 160, 192, 192, 224, 224); each backend runs it in its own process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "peers" / "imagenet-imagenet-1k-sample-x10"


def pauses(path: str, backend: str, workers: int) -> dict:
    from fastload import FastLoader, PreprocessSpec
    sizes = [160, 160, 192, 192, 224, 224]
    loader = FastLoader(path, "train", batch_size=64, spec=PreprocessSpec.preset("imagenet"), backend=backend,
                        num_workers=workers, distributed=False)
    for images, _ in loader:  # warm-up epoch: compile, page cache
        pass
    changed, same = [], []
    for epoch, size in enumerate(sizes, start=1):
        loader.set_resolution(size)
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        it = iter(loader)
        images, _ = next(it)
        (changed if epoch == 1 or size != sizes[epoch - 2] else same).append(time.perf_counter() - t0)
        assert images.shape[-1] == size
        for _ in it:
            pass
    return {"changed": statistics.median(changed), "same": statistics.median(same)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--beton", default=str(CACHE / "beton"))
    ap.add_argument("--tfrecord", default=str(CACHE / "tfrecord"))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    for p in (args.beton, args.tfrecord):
        if not (Path(p) / "manifest.json").exists():
            print(f"error: {p} is not a fastload dataset: run `make bench` once (it builds the tiled sample), "
                  "or pass --beton/--tfrecord", file=sys.stderr)
            return 2
    from fastload.bench import run_in_process
    print(f"{'backend':<10}{'first batch, size changed':>28}{'size unchanged':>17}")
    for backend, path in (("ffcv", args.beton), ("dali", args.tfrecord), ("reference", args.tfrecord)):
        r = run_in_process(pauses, path, backend, args.workers)
        print(f"{backend:<10}{r['changed']:>26.3f} s{r['same']:>15.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
