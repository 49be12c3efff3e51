#!/usr/bin/env python
"""FastLoader vs the raw library it wraps, doing the same work, on the ImageNet sample.

    .venv/bin/python scripts/bench_loaders.py [--data ../shared/data/imagenet-1k-sample] [--workers 2]

Converts the sample at original resolution (cached under .cache/bench), then for the
train spec (RRC 224 + flip + normalize, float32) and the eval spec (Resize 256 +
CenterCrop 224 + normalize) prints images/s of: FastLoader on each backend, plain ffcv,
plain DALI (CPU), and the reference (PIL + torch DataLoader). Each configuration runs in
its own process; warm-up epochs are excluded; figures are medians of repeats.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from fastload.bench import run_in_process, timed_epochs

ROOT = Path(__file__).resolve().parents[1]
MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


def fastload_iter(path, backend, spec, bs, workers):
    from fastload import FastLoader, PreprocessSpec
    name, _, variant = spec.partition(":")
    # the same output as the raw library: ffcv's ToTorchImage gives channels_last memory,
    # DALI's crop_mirror_normalize(output_layout='CHW') contiguous NCHW
    spec = PreprocessSpec.preset(name, train=variant == "train").replace(
        layout="channels_last" if backend == "ffcv" else "NCHW")
    loader = FastLoader(path, "validation", batch_size=bs, spec=spec, backend=backend, num_workers=workers,
                        drop_last=False, order="random", distributed=False)
    return lambda: iter(loader)


def plain_ffcv_iter(path, train, bs, workers):
    from fastload.beton import import_ffcv
    import_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage
    decoder = RandomResizedCropRGBImageDecoder((224, 224)) if train else CenterCropRGBImageDecoder((224, 224), 224 / 256)
    ops = [decoder] + ([RandomHorizontalFlip()] if train else [])
    # NormalizeImage must come before ToTensor on CPU (the other order hangs)
    ops += [NormalizeImage(MEAN, STD, np.float32), ToTensor(), ToTorchImage()]
    loader = Loader(str(Path(path) / "validation.beton"), batch_size=bs, num_workers=workers,
                    order=OrderOption.RANDOM, drop_last=False, os_cache=True,
                    pipelines={"image": ops, "label": [IntDecoder(), ToTensor(), Squeeze()]})
    return lambda: iter(loader)


def plain_dali_iter(path, train, bs, workers):
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.tfrecord as tfrec
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    shards = sorted(Path(path).glob("validation-*.tfrecord"))

    @pipeline_def(batch_size=bs, num_threads=workers, device_id=None, seed=0)
    def graph():
        f = fn.readers.tfrecord(path=[str(s) for s in shards], index_path=[str(s.with_suffix(".idx")) for s in shards],
                                features={"image/encoded": tfrec.FixedLenFeature((), tfrec.string, ""),
                                          "image/class/label": tfrec.FixedLenFeature([1], tfrec.int64, -1)},
                                random_shuffle=True, pad_last_batch=True, name="reader")
        if train:
            images = fn.decoders.image_random_crop(f["image/encoded"], output_type=types.RGB)
            images = fn.resize(images, resize_x=224, resize_y=224)
            mirror = fn.random.coin_flip()
            crop = None
        else:
            images = fn.decoders.image(f["image/encoded"], output_type=types.RGB)
            images = fn.resize(images, resize_shorter=256)
            mirror, crop = 0, (224, 224)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=crop,
                                          mean=MEAN.tolist(), std=STD.tolist(), mirror=mirror)
        return images, f["image/class/label"]

    pipe = graph()
    pipe.build()
    it = DALIGenericIterator(pipe, ["x", "y"], reader_name="reader", last_batch_policy=LastBatchPolicy.PARTIAL,
                             auto_reset=True)

    def epoch():
        for batch in it:
            yield batch[0]["x"], batch[0]["y"]
    return epoch


def run_config(kind, backend, path, train, bs, workers, epochs, repeats):
    import torch
    torch.set_num_threads(workers)
    spec = "imagenet:train" if train else "imagenet:eval"
    if kind == "fastload":
        make = fastload_iter(path, backend, spec, bs, workers)
    elif backend == "ffcv":
        make = plain_ffcv_iter(path, train, bs, workers)
    else:
        make = plain_dali_iter(path, train, bs, workers)
    timed_epochs(make, 2)  # warm-up: JIT compile, pipeline build, page cache
    rates = [n / dt for dt, n in (timed_epochs(make, epochs) for _ in range(repeats))]
    return statistics.median(rates), min(rates), max(rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/imagenet-1k-sample"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5, help="epochs per repeat (the sample is 200 images)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from fastload import convert
    cache = ROOT / ".cache" / "bench"
    dirs = {}
    for fmt in ("beton", "tfrecord"):
        d = cache / f"imagenet-sample-{fmt}"
        if not (d / "manifest.json").exists():
            convert(args.data, d, format=fmt, workers=args.workers, progress=False)
        dirs[fmt] = str(d)
    rows = []
    for train in (True, False):
        name = "train (RRC224+flip+norm)" if train else "eval (R256+CC224+norm)"
        for kind, backend, fmt in (("fastload", "ffcv", "beton"), ("plain", "ffcv", "beton"),
                                   ("fastload", "dali", "tfrecord"), ("plain", "dali", "tfrecord"),
                                   ("fastload", "reference", "tfrecord")):
            # fork: this parent runs no loader itself
            med, lo, hi = run_in_process(run_config, kind, backend, dirs[fmt], train, args.batch_size, args.workers,
                                         args.epochs, args.repeats, context="fork")
            rows.append((name, f"{kind} {backend}", med, lo, hi))
            print(f"{name:<26} {kind + ' ' + backend:<20} {med:8.0f} img/s  (min {lo:.0f}, max {hi:.0f})", flush=True)
    print()
    for train_name in sorted({r[0] for r in rows}):
        by = {r[1]: r[2] for r in rows if r[0] == train_name}
        for b in ("ffcv", "dali"):
            ratio = by[f"fastload {b}"] / by[f"plain {b}"]
            print(f"{train_name:<26} FastLoader {b} / plain {b}: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
