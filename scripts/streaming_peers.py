#!/usr/bin/env python
"""litdata and Mosaic streaming, each written as its own docs write it: run by
scripts/bench_streaming.py in the peers' venv (scripts/setup_streaming_peers.sh), one process per
measurement. Not importable beside fastload: it needs torchvision.

    .cache/streaming-peers/bin/python scripts/streaming_peers.py '<json config>'

Config: ``{"system": "litdata" | "mosaic" [+ "-16mb"], "phase": "write" | "read", ...}``.
- write: ``folder`` (an image folder, root/train/<class>/<file>) to ``out``, a local directory,
  with the system's own writer and its documented defaults (litdata's ``optimize`` with
  ``chunk_bytes="64MB"``, as its README; Mosaic's ``MDSWriter`` with ``jpeg`` and ``int`` columns,
  as its ImageNet conversion, and its default 64 MB ``size_limit``). ``-16mb``: 16 MB chunks or
  shards, the knob their docs give for a small cache (Mosaic refuses a cache under 4 shards).
- read: ``url`` (s3://) through the system's ``StreamingDataset`` with ``shuffle=True``, a cache
  of ``cache_limit`` bytes at ``cache_dir``, torchvision's RandomResizedCrop(224) + flip +
  normalize in ``__getitem__`` (their docs' pattern), their DataLoader with ``workers`` workers
  (Mosaic's workers each with a fresh S3 client: see _mosaic_fresh_s3_clients_in_workers);
  ``epochs`` epochs, each one's img/s, first batch, bytes from the store and labels per batch.
The last line printed is the result, as JSON.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from epoch_meter import measure_epoch  # beside this file


def _store_bytes():
    """fastload.testing.store_proxy's reader of the proxy's log, loaded from its file: this runs in
    the peers' own venv, which has no fastload."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "testing" / "store_proxy.py"
    spec = importlib.util.spec_from_file_location("store_proxy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.store_bytes


store_bytes = _store_bytes()

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_files(folder: str) -> list[tuple[str, int]]:
    """(path, label) of an image folder's train split, classes sorted (torchvision's ImageFolder)."""
    root = Path(folder) / "train"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(str(root / c / f), k) for k, c in enumerate(classes) for f in sorted(os.listdir(root / c))]


def train_transform():
    """RandomResizedCrop(224) + flip + normalize: torchvision's ImageNet recipe (transforms v2,
    which takes a PIL image or a decoded tensor alike)."""
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    def rgb(x):  # a CMYK or grayscale JPEG decoded by PIL: RGB, as ImageFolder's loader does
        return x.convert("RGB") if isinstance(x, Image.Image) and x.mode != "RGB" else x
    return v2.Compose([rgb, v2.ToImage(), v2.RGB(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


# --------------------------------------------------------------------------- litdata
def litdata_prepare(item):
    from PIL import Image
    path, label = item
    return {"image": Image.open(path), "class": label}


def library(system: str) -> str:
    return system.split("-")[0]


def chunk_mb(system: str) -> int:
    return 16 if system.endswith("-16mb") else 64


def litdata_write(cfg: dict) -> None:
    import litdata as ld
    ld.optimize(fn=litdata_prepare, inputs=image_files(cfg["folder"]), output_dir=cfg["out"],
                chunk_bytes=f"{chunk_mb(cfg['system'])}MB",
                num_workers=cfg.get("workers", os.cpu_count()))


def litdata_loader(cfg: dict):
    import litdata as ld
    transform = train_transform()

    class ImageNetStreaming(ld.StreamingDataset):
        def __getitem__(self, index):
            data = super().__getitem__(index)
            return transform(data["image"]), data["class"]
    dataset = ImageNetStreaming(cfg["url"], shuffle=True, drop_last=False, max_cache_size=cfg["cache_limit"],
                                cache_dir=cfg["cache_dir"])
    return ld.StreamingDataLoader(dataset, batch_size=cfg["batch_size"], num_workers=cfg["workers"]), dataset


# --------------------------------------------------------------------------- Mosaic streaming
def mosaic_write(cfg: dict) -> None:
    from PIL import Image
    from streaming import MDSWriter
    with MDSWriter(out=cfg["out"], columns={"x": "jpeg", "y": "int"}, size_limit=chunk_mb(cfg["system"]) << 20) as out:
        for path, label in image_files(cfg["folder"]):
            out.write({"x": Image.open(path), "y": label})


def _mosaic_fresh_s3_clients_in_workers() -> None:
    """The one change to Mosaic's documented use: streaming 0.13.0 keeps the boto3 client it made
    in the parent (to fetch index.json) in every forked DataLoader worker, so the workers share its
    keep-alive sockets and read each other's responses: shards arrive corrupt (IndexError "Relative
    sample index ... not present", PIL UnidentifiedImageError; measured on this bench's plain-HTTP
    endpoint, and gone with this reset). Each worker makes its own client, as litdata's do."""
    import gc

    from streaming.base.storage.download import S3Downloader

    def reset():
        for o in gc.get_objects():
            if isinstance(o, S3Downloader):
                o._s3_client = None
    os.register_at_fork(after_in_child=reset)


def mosaic_loader(cfg: dict):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader
    transform = train_transform()
    clean_stale_shared_memory()  # their FAQ's remedy for shared memory a previous run left behind
    if not cfg.get("mosaic_as_is"):
        _mosaic_fresh_s3_clients_in_workers()

    class ImageNetStreaming(StreamingDataset):
        def __getitem__(self, index):
            obj = super().__getitem__(index)
            return transform(obj["x"]), obj["y"]
    dataset = ImageNetStreaming(remote=cfg["url"], local=cfg["cache_dir"], shuffle=True, batch_size=cfg["batch_size"],
                                cache_limit=cfg["cache_limit"])
    # their docs: a plain DataLoader (or their StreamingDataLoader) with persistent workers off by default
    return DataLoader(dataset, batch_size=cfg["batch_size"], num_workers=cfg["workers"]), dataset


# --------------------------------------------------------------------------- measuring
def read(cfg: dict) -> dict:
    store_bytes(cfg["endpoint"], clear=True)
    t0 = time.perf_counter()
    loader, dataset = (litdata_loader if library(cfg["system"]) == "litdata" else mosaic_loader)(cfg)
    out = {"epochs": []}
    for e in range(cfg["epochs"]):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(e)
        out["epochs"].append(measure_epoch(loader, t0 if e == 0 else time.perf_counter(),
                                           lambda: store_bytes(cfg["endpoint"], clear=True)))
    return out


def main():
    cfg = json.loads(sys.argv[1])
    if cfg["phase"] == "write":
        t = time.perf_counter()
        (litdata_write if library(cfg["system"]) == "litdata" else mosaic_write)(cfg)
        print(json.dumps({"seconds": time.perf_counter() - t}))
    else:
        print(json.dumps(read(cfg)))


if __name__ == "__main__":
    main()
