#!/usr/bin/env python
"""Conversion throughput on the ImageNet sample: fastload convert (both formats) vs plain ffcv.

    .venv/bin/python scripts/bench_convert.py [--data ../shared/data/imagenet-1k-sample] [--workers 2]

Plain ffcv is the usual recipe: ``DatasetWriter`` with ``RGBImageField(write_mode='jpg')`` fed
decoded PIL images (it re-encodes every image at quality 90).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Decoded:
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[i]
        return row["image"].convert("RGB"), row["label"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/imagenet-1k-sample"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=5,
                    help="concatenate the sample this many times, so fixed costs (process start, "
                         "ffcv's writer polling) do not dominate 200 images")
    args = ap.parse_args()
    import datasets
    from fastload import convert
    tmp = Path(tempfile.mkdtemp())
    base = datasets.load_dataset(args.data, split="validation")
    tiled = datasets.concatenate_datasets([base] * args.tile)
    datasets.DatasetDict({"validation": tiled}).save_to_disk(str(tmp / "source"))
    args.data = str(tmp / "source")
    n = len(tiled)
    print(f"{n} real ImageNet JPEGs ({len(base)} x {args.tile}), {args.workers} workers")
    try:
        for fmt in ("tfrecord", "beton"):
            for workers in sorted({1, args.workers}):
                rates = []
                for r in range(args.repeats):
                    out = tmp / f"{fmt}-{workers}-{r}"
                    t0 = time.perf_counter()
                    convert(args.data, out, format=fmt, workers=workers, progress=False)
                    rates.append(n / (time.perf_counter() - t0))
                print(f"fastload convert --format {fmt:<8} --workers {workers}: {max(rates):6.0f} img/s (best of {args.repeats})")
        from fastload.beton import import_ffcv
        import_ffcv()
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
        ds = datasets.load_from_disk(args.data)["validation"]
        rates = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            DatasetWriter(str(tmp / f"plain-{r}.beton"), {"image": RGBImageField(write_mode="jpg"), "label": IntField()},
                          num_workers=args.workers).from_indexed_dataset(_Decoded(ds))
            rates.append(n / (time.perf_counter() - t0))
        print(f"plain ffcv DatasetWriter (jpg q90) --workers {args.workers}: {max(rates):6.0f} img/s (best of {args.repeats})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
