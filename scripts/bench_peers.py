#!/usr/bin/env python
"""FastLoader against raw FFCV and raw DALI written as their own docs write them, same images.

    .venv/bin/python scripts/bench_peers.py [--data DIR] [--tile 10] [--workers 2] [--rounds 2]

Images: the ImageNet sample tiled ``--tile`` times (an epoch lasts seconds), and the CIFAR-10
sample tiled 5x (50,000 images, the size of CIFAR-10 train; fastload stores it as raw pixels, as
the hub's PNGs convert, and as raw FFCV's example stores it). Every system gets its own
process (its own threads, JIT and page cache state), is warmed up, and then the systems take
turns, ``--rounds`` times, each timing ``--epochs`` whole epochs: img/s is the median over
rounds. Output is float32 NCHW normalized everywhere (plus FastLoader's uint8 output, and
FastLoader without its per-sample checks, ``check_samples=False``, to show what they cost).

Peers, with no fastload code in their path:
- raw FFCV: ffcv's ``DatasetWriter`` (``RGBImageField``, its defaults: JPEG at quality 90 for
  ImageNet-size images, raw pixels for CIFAR), ``Loader`` with ``RandomResizedCropRGBImageDecoder``
  / ``CenterCropRGBImageDecoder`` (ratio 224/256) / ``SimpleRGBImageDecoder`` + ``RandomTranslate``,
  ``RandomHorizontalFlip``, ``NormalizeImage``, ``ToTensor``, ``ToTorchImage``;
- raw DALI: ``fn.readers.tfrecord`` over the TFRecord shards, ``decoders.image_random_crop`` +
  ``resize`` / ``decoders.image`` + ``resize(resize_shorter=256)``, ``crop_mirror_normalize``;
- PIL + DataLoader: what a torchvision user writes (PIL decode, RandomResizedCrop / Resize +
  CenterCrop by torchvision's rules, flip, to tensor, normalize), no fastload code.
First batch: seconds from a fresh process's start (imports included) to its first batch.
Decode limit: libjpeg-turbo full decode of these images (accurate DCT; the fast DCT runs at the
same speed here) per core x workers.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from fastload.spec import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


# --------------------------------------------------------------------------- systems (built in their process)
def fastload_system(cfg):
    from fastload import FastLoader, PreprocessSpec
    spec = PreprocessSpec.preset(cfg["preset"], train=cfg["train"])
    if cfg.get("uint8"):
        spec = spec.replace(dtype="uint8")
    loader = FastLoader(cfg["path"], cfg["split"], batch_size=cfg["batch_size"], spec=spec, backend=cfg["backend"],
                        num_workers=cfg["workers"], drop_last=False, order="random", distributed=False,
                        check_samples=cfg.get("check_samples", True))
    return lambda: iter(loader)


def raw_ffcv_system(cfg):
    import torch
    threads = torch.get_num_threads()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                       SimpleRGBImageDecoder)
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import (NormalizeImage, RandomHorizontalFlip, RandomTranslate, Squeeze, ToTensor,
                                 ToTorchImage)
    if cfg["preset"] == "cifar10":
        ops = [SimpleRGBImageDecoder()] + ([RandomHorizontalFlip(), RandomTranslate(padding=4)] if cfg["train"] else [])
        mean, std = np.array(cfg["stats"]["mean"]) * 255, np.array(cfg["stats"]["std"]) * 255
    else:
        ops = ([RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip()] if cfg["train"]
               else [CenterCropRGBImageDecoder((224, 224), 224 / 256)])
        mean, std = MEAN * 255, STD * 255
    # ffcv's docs: NormalizeImage before ToTensor on CPU (the other order hangs there)
    ops += [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]  # its docs: channels_last memory
    loader = Loader(cfg["path"], batch_size=cfg["batch_size"], num_workers=cfg["workers"], order=OrderOption.RANDOM,
                    drop_last=False, os_cache=True,
                    pipelines={"image": ops, "label": [IntDecoder(), ToTensor(), Squeeze()]})
    torch.set_num_threads(threads)
    return lambda: iter(loader)


def raw_dali_system(cfg):
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.tfrecord as tfrec
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    shards = sorted(Path(cfg["path"]).glob(f"{cfg['split']}-*.tfrecord"))
    cifar = cfg["preset"] == "cifar10"
    mean, std = ((np.array(cfg["stats"]["mean"]), np.array(cfg["stats"]["std"])) if cifar else (MEAN, STD))
    raw = cfg.get("raw", False)  # raw pixels: DALI's docs read the bytes and reshape them, no decoder

    @pipeline_def(batch_size=cfg["batch_size"], num_threads=cfg["workers"], device_id=None, seed=0)
    def graph():
        features = {"image/class/label": tfrec.FixedLenFeature([1], tfrec.int64, -1)}
        if raw:
            features["image/raw"] = tfrec.FixedLenFeature((), tfrec.string, "")
        else:
            features["image/encoded"] = tfrec.FixedLenFeature((), tfrec.string, "")
        f = fn.readers.tfrecord(path=[str(s) for s in shards], index_path=[str(s.with_suffix(".idx")) for s in shards],
                                features=features, random_shuffle=True, pad_last_batch=True, name="reader")
        mirror, crop = (fn.random.coin_flip() if cfg["train"] else 0), None
        if cifar:
            images = (fn.reshape(f["image/raw"], shape=[32, 32, 3], layout="HWC") if raw
                      else fn.decoders.image(f["image/encoded"], output_type=types.RGB))
            if cfg["train"]:  # RandomCrop(32, padding=4): a window anywhere in the zero-padded image
                anchor = fn.random.uniform(values=[float(v) for v in range(-4, 5)], shape=[2])
                images = fn.slice(images, anchor, [32.0, 32.0], axes=[0, 1], normalized_anchor=False,
                                  normalized_shape=False,
                                  out_of_bounds_policy="pad", fill_values=0)
        elif cfg["train"]:
            images = fn.decoders.image_random_crop(f["image/encoded"], output_type=types.RGB)
            images = fn.resize(images, resize_x=224, resize_y=224)
        else:
            images = fn.decoders.image(f["image/encoded"], output_type=types.RGB)
            images = fn.resize(images, resize_shorter=256)
            crop = (224, 224)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=crop,
                                          mean=(mean * 255).tolist(), std=(std * 255).tolist(), mirror=mirror)
        return images, f["image/class/label"]

    pipe = graph()
    pipe.build()
    it = DALIGenericIterator(pipe, ["x", "y"], reader_name="reader", last_batch_policy=LastBatchPolicy.PARTIAL,
                             auto_reset=True)

    def epoch():
        for batch in it:
            yield batch[0]["x"], batch[0]["y"]
    return epoch


class _PILDataset:
    """torchvision's RandomResizedCrop / Resize+CenterCrop / RandomCrop rules on PIL, written out."""

    def __init__(self, jpegs, labels, preset, train, stats):
        self.jpegs, self.labels, self.preset, self.train = jpegs, labels, preset, train
        mean, std = (np.array(stats["mean"]), np.array(stats["std"])) if preset == "cifar10" else (MEAN, STD)
        import torch
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1).float(), torch.tensor(std).view(3, 1, 1).float()

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, i):
        import io
        import torch
        from PIL import Image, ImageOps
        im = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
        w, h = im.size
        if self.preset == "cifar10":
            if self.train:
                im = ImageOps.expand(im, 4)
                top, left = random.randint(0, 8), random.randint(0, 8)
                im = im.crop((left, top, left + 32, top + 32))
        elif self.train:
            for _ in range(10):
                area = h * w * random.uniform(0.08, 1.0)
                ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
                if 0 < cw <= w and 0 < ch <= h:
                    top, left = random.randint(0, h - ch), random.randint(0, w - cw)
                    break
            else:
                ch, cw, top, left = h, w, 0, 0
            im = im.resize((224, 224), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        else:
            nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
            im = im.resize((nw, nh), Image.BILINEAR)
            top, left = int(round((nh - 224) / 2)), int(round((nw - 224) / 2))
            im = im.crop((left, top, left + 224, top + 224))
        if self.train and random.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, self.labels[i]


def _png(pixels: np.ndarray) -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pil_system(cfg):
    import torch
    from fastload import Manifest
    from fastload.formats.records import SplitReader
    reader = SplitReader(Manifest.read(cfg["path"]), cfg["split"])
    # what a torchvision user starts from: encoded files (CIFAR as the hub's PNGs)
    jpegs = [_png(reader.pixels(i)) if reader.codec == "raw" else reader.stored(i).tobytes()
             for i in range(len(reader))]
    ds = _PILDataset(jpegs, reader.labels.tolist(), cfg["preset"], cfg["train"], cfg["stats"])
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size"], shuffle=True, num_workers=cfg["workers"],
                                         persistent_workers=True)
    return lambda: iter(loader)


SYSTEMS = {"fastload": fastload_system, "raw_ffcv": raw_ffcv_system, "raw_dali": raw_dali_system, "pil": pil_system}


def _serve(cfg, conn, started):
    """A system's process: build, time the first batch, warm up, then run epochs on request."""
    try:
        import torch
        torch.set_num_threads(cfg["workers"])
        from fastload.bench import timed_epochs
        make = SYSTEMS[cfg["kind"]](cfg)
        it = make()
        next(it)
        first_batch = time.time() - started
        for _ in it:
            pass
        timed_epochs(make, 1)  # warm-up: JIT, caches
    except BaseException as e:  # tell the parent instead of leaving it waiting
        conn.send(RuntimeError(f"{cfg['kind']}: {type(e).__name__}: {e}"))
        raise
    conn.send(first_batch)
    while True:
        epochs = conn.recv()
        if epochs is None:
            return
        dt, n = timed_epochs(make, epochs)
        conn.send(n / dt)


# --------------------------------------------------------------------------- data
def prepare(args):
    import datasets
    from fastload import Manifest, convert
    from fastload.formats.beton import import_ffcv
    cache = ROOT / ".cache" / "peers"
    out = {}
    for name, src, column, tile, split in (("imagenet", args.data, "image", args.tile, "validation"),
                                           ("cifar", args.cifar, "img", 5, "test")):
        if src is None or (name == "cifar" and "cifar" not in args.only_workloads):
            continue
        d = cache / f"{name}-{Path(src).name}-x{tile}"
        source = d / "source"
        if not (source / "dataset_dict.json").exists():
            ds = datasets.load_dataset(src, split=split)
            datasets.DatasetDict({"train": datasets.concatenate_datasets([ds] * tile)}).save_to_disk(str(source))
        # the default codec: CIFAR's 32 px images (the shared sample's JPEGs, or the hub's PNGs) are
        # stored as raw pixels, the storage raw FFCV's CIFAR example uses; photos as JPEG
        expected = "raw" if name == "cifar" else "jpeg"
        for fmt in ("beton", "tfrecord"):
            if not (d / fmt / "manifest.json").exists() or Manifest.read(d / fmt).split("train").image_codec != expected:
                convert(str(source), d / fmt, format=fmt, workers=args.workers, progress=False, overwrite=True)
                assert Manifest.read(d / fmt).split("train").image_codec == expected
        raw = d / "ffcv-writer.beton"
        if not raw.exists():  # ffcv's own writer, as its docs write it
            import_ffcv()
            from ffcv.fields import IntField, RGBImageField
            from ffcv.writer import DatasetWriter
            ds = datasets.load_from_disk(str(source))["train"]

            class Pairs:
                def __len__(self):
                    return len(ds)

                def __getitem__(self, i):
                    row = ds[i]
                    return row[column].convert("RGB"), row["label"]
            tmp = raw.with_suffix(".tmp")
            # ffcv's examples: raw pixels for CIFAR (the field's default), JPEG for ImageNet
            field = RGBImageField() if name == "cifar" else RGBImageField(write_mode="jpg")
            DatasetWriter(str(tmp), {"image": field, "label": IntField()},
                          num_workers=args.workers).from_indexed_dataset(Pairs())
            tmp.rename(raw)
        out[name] = {"beton": str(d / "beton"), "tfrecord": str(d / "tfrecord"), "raw_beton": str(raw),
                     "size": Manifest.read(d / "beton").split("train").num_examples}
    return out


def _receive(conn, process, name):
    """A system's answer; an error naming it if its process died without one (a crash in native
    code sends nothing: waiting on the pipe would hang the benchmark)."""
    while not conn.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"{name}: its process exited with code {process.exitcode} before answering")
    return conn.recv()


def decode_limit(path, workers):
    from fastload import Manifest
    from fastload.bench import decode_limit as measure
    from fastload.formats.records import SplitReader
    limit = measure(SplitReader(Manifest.read(path), "train"), max_images=200)
    return limit["per_core_images_per_s"] * workers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    shared = ROOT.parent / "shared" / "data"
    bundled = ROOT / "fastload" / "sample" / "imagenet-sample"  # 29 photos, shipped in the package
    ap.add_argument("--data", default=str(shared / "imagenet-1k-sample" if shared.exists() else bundled),
                    help="ImageNet-style source (default: ../shared/data's sample, else the bundled one)")
    ap.add_argument("--cifar", default=str(shared / "cifar10-sample") if shared.exists() else None,
                    help="CIFAR-10 source (default: ../shared/data's; the cifar workload is skipped without one)")
    ap.add_argument("--tile", type=int, default=10, help="ImageNet sample repeats (200 images each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per timed turn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated workloads: train,eval,cifar")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.only_workloads = (args.only or "train,eval,cifar").split(",")
    if args.cifar is None and "cifar" in args.only_workloads:
        print("no CIFAR-10 source (--cifar): the cifar workload is skipped")
        args.only_workloads.remove("cifar")
    data = prepare(args)
    from fastload import Manifest
    from fastload.pipelines.registry import backend_names, entry
    workloads = {"train": ("imagenet", "imagenet", True), "eval": ("imagenet", "imagenet", False),
                 "cifar": ("cifar", "cifar10", True)}
    workloads = {k: v for k, v in workloads.items() if k in args.only_workloads}
    report = {"workers": args.workers, "batch_size": args.batch_size, "rounds": args.rounds, "workloads": {}}
    ctx = mp.get_context("spawn")
    for wname, (dname, preset, train) in workloads.items():
        d = data[dname]
        stats = Manifest.read(d["beton"]).split("train").stats
        base = {"split": "train", "batch_size": args.batch_size, "workers": args.workers, "preset": preset,
                "train": train, "stats": stats}
        systems = {f"FastLoader {b}": {**base, "kind": "fastload", "backend": b,
                                       "path": d[entry(b).storages[0] if b != "reference" else "tfrecord"]}
                   for b in backend_names()}
        if train:
            for b in ("ffcv", "dali"):
                systems[f"FastLoader {b} uint8"] = {**systems[f"FastLoader {b}"], "uint8": True}
        for b in ("ffcv", "dali"):  # the per-sample checks' cost (CRC32C, JPEG structure), side by side
            systems[f"FastLoader {b} no checks"] = {**systems[f"FastLoader {b}"], "check_samples": False}
        systems["raw FFCV"] = {**base, "kind": "raw_ffcv", "path": d["raw_beton"]}
        systems["raw DALI"] = {**base, "kind": "raw_dali", "path": d["tfrecord"],
                               "raw": Manifest.read(d["tfrecord"]).split("train").image_codec == "raw"}
        systems["PIL + DataLoader"] = {**base, "kind": "pil", "path": d["tfrecord"]}
        procs, first = {}, {}
        for name, cfg in systems.items():  # one at a time: start-up measured on a quiet machine
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(cfg, child, time.time()))
            p.start()
            first[name] = _receive(parent, p, name)
            if isinstance(first[name], Exception):
                raise first[name]
            procs[name] = (p, parent)
        rates = {name: [] for name in systems}
        for _ in range(args.rounds):
            for name, (p, conn) in procs.items():
                conn.send(args.epochs)
                rates[name].append(_receive(conn, p, name))
        for p, conn in procs.values():
            conn.send(None)
            p.join()
        limit = decode_limit(d["tfrecord"], args.workers) if dname == "imagenet" else None
        med = {n: statistics.median(r) for n, r in rates.items()}
        peer = max(med["raw FFCV"], med["raw DALI"])
        print(f"\n== {wname} ({d['size']} images, {preset} {'train' if train else 'eval'} spec, "
              f"{args.workers} workers, batch {args.batch_size}"
              + (f", decode limit {limit:.0f} img/s" if limit else "") + ")")
        print(f"{'system':<26}{'img/s':>9}{'min':>8}{'max':>8}{'1st batch s':>13}{'/ best peer':>13}"
              f"{'/ own raw':>11}{'% limit':>9}")
        rows = {}
        for name in systems:
            own = ("raw FFCV" if "ffcv" in name else "raw DALI" if "dali" in name else None)
            own_ratio = med[name] / med[own] if (own and name.startswith("FastLoader")) else None
            row = {"images_per_s": med[name], "all": rates[name], "first_batch_s": first[name],
                   "vs_best_peer": med[name] / peer, "vs_own_raw": own_ratio,
                   "fraction_of_decode_limit": (med[name] / limit) if limit else None}
            rows[name] = row
            print(f"{name:<26}{med[name]:>9.0f}{min(rates[name]):>8.0f}{max(rates[name]):>8.0f}{first[name]:>13.1f}"
                  f"{row['vs_best_peer']:>12.2f}x" + (f"{own_ratio:>10.2f}x" if own_ratio else f"{'':>11}")
                  + (f"{100 * row['fraction_of_decode_limit']:>8.0f}%" if limit else ""), flush=True)
        report["workloads"][wname] = {"images": d["size"], "decode_limit": limit, "systems": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
