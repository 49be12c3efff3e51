#!/usr/bin/env python
"""Images/s of the train spec alone and with each augmentation added, per backend.

    .venv/bin/python scripts/bench_augment.py [--data ../shared/data/imagenet-1k-sample] [--workers 2]

Uses the ImageNet sample converted at original resolution (cached under .cache/bench); each
configuration runs in its own process, warm-up excluded, median of repeats.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from fastload.bench import run_in_process, timed_epochs

ROOT = Path(__file__).resolve().parents[1]


def configs():
    from fastload.spec import AutoAugment, ColorJitter, Mixup, RandAugment, TrivialAugmentWide
    return {
        "train spec": {},
        "+ ColorJitter(0.4, 0.4, 0.4, 0.1)": {"color_jitter": ColorJitter(0.4, 0.4, 0.4, 0.1)},
        "+ AutoAugment(imagenet)": {"auto_augment": AutoAugment()},
        "+ RandAugment rand-m9-mstd0.5": {"auto_augment": RandAugment(2, 27.0, 1.5)},
        "+ TrivialAugmentWide": {"auto_augment": TrivialAugmentWide()},
        "+ MixUp(0.8)": {"mixup": Mixup(mixup_alpha=0.8)},
        "+ CutMix(1.0)": {"mixup": Mixup(cutmix_alpha=1.0)},
        "+ MixUp/CutMix + smoothing 0.1": {"mixup": Mixup(0.8, 1.0, label_smoothing=0.1)},
    }


def run(path, backend, name, workers, bs, epochs, repeats):
    import torch
    from fastload import FastLoader, PreprocessSpec
    torch.set_num_threads(workers)
    spec = PreprocessSpec.preset("imagenet", train=True).replace(**configs()[name])
    loader = FastLoader(path, "validation", batch_size=bs, spec=spec, backend=backend, num_workers=workers,
                        drop_last=False, distributed=False, order="random")
    timed_epochs(lambda: iter(loader), 2)  # warm-up
    return statistics.median(n / dt for dt, n in (timed_epochs(lambda: iter(loader), epochs)
                                                  for _ in range(repeats)))


def main():
    ap = argparse.ArgumentParser()
    shared = ROOT.parent / "shared" / "data" / "imagenet-1k-sample"
    ap.add_argument("--data", default=str(shared if shared.exists() else ROOT / "fastload/sample/imagenet-sample"),
                    help="ImageNet-style source (default: ../shared/data's sample, else the bundled one)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="ffcv,dali,reference")
    args = ap.parse_args()
    from fastload import convert
    dirs = {}
    for fmt in ("beton", "tfrecord"):
        d = ROOT / ".cache" / "bench" / f"imagenet-sample-{fmt}"
        if not (d / "manifest.json").exists():
            convert(args.data, d, format=fmt, workers=args.workers, progress=False)
        dirs[fmt] = str(d)
    backends = args.backends.split(",")
    print(f"{'images/s, ' + str(args.workers) + ' workers':<36}" + "".join(f"{b:>11}" for b in backends), flush=True)
    for name in configs():
        row = [run_in_process(run, dirs["beton" if b == "ffcv" else "tfrecord"], b, name, args.workers,
                              args.batch_size, args.epochs, args.repeats, context="fork")  # parent runs no loader
               for b in backends]
        print(f"{name:<36}" + "".join(f"{r:>11.0f}" for r in row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
