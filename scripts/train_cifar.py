#!/usr/bin/env python
"""A real client: a small CNN trained through FastLoader on real CIFAR-10 images.

    .venv/bin/python scripts/train_cifar.py --backend ffcv           # or dali / reference
    torchrun --nproc_per_node 2 scripts/train_cifar.py --backend dali  # DDP over gloo on CPU

Holds out --holdout images of ../shared/data/cifar10-sample (the CIFAR-10 test split,
stored sorted by class, so shuffled once with a fixed seed) for evaluation, converts the rest once (cached under --cache), trains with the
cifar10 preset (RandomCrop 32 padding 4 + flip + the dataset's own mean/std) and prints
held-out accuracy. It fails loudly when labels detach from images or normalization is
wrong: accuracy then stays at chance (10%).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def make_model() -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                             nn.MaxPool2d(2))
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10))


def prepare(data: str, cache: Path, train_images: int, holdout: int, fmt: str, workers: int) -> Path:
    """save_to_disk a train/test split of the sample, then convert it (once; cached)."""
    out = cache / f"cifar10-{train_images}-{holdout}-shuffled-{fmt}"
    if (out / "manifest.json").exists():
        return out
    import datasets
    from fastload import convert
    src = cache / f"cifar10-{train_images}-{holdout}-shuffled-source"
    if not (src / "dataset_dict.json").exists():
        # the sample is stored sorted by class: shuffle once (fixed seed) before holding out
        ds = datasets.load_dataset(data, split="test").shuffle(seed=1234)
        n = len(ds)
        if train_images + holdout > n:
            raise SystemExit(f"--train-images {train_images} + --holdout {holdout} exceed the {n} images of {data}")
        datasets.DatasetDict({"train": ds.select(range(train_images)),
                              "test": ds.select(range(n - holdout, n))}).save_to_disk(str(src))
    convert(str(src), out, format=fmt, workers=workers, progress=False)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="Train a small CNN on CIFAR-10 through FastLoader.")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-sample"))
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "train_cifar"))
    from fastload.pipelines.registry import backend_names, entry
    ap.add_argument("--backend", default="ffcv", choices=backend_names())
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--train-images", type=int, default=9000)
    ap.add_argument("--holdout", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        sys.exit(f"error: no CIFAR-10 source at {args.data}: pass --data DIR (a CIFAR-10 parquet folder such as "
                 "../shared/data/cifar10-sample, with a 'test' split)")

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    torch.manual_seed(args.seed)

    fmt = entry(args.backend).storages[0]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        path = prepare(args.data, cache, args.train_images, args.holdout, fmt, args.workers)
    if distributed:
        torch.distributed.barrier()
        path = prepare(args.data, cache, args.train_images, args.holdout, fmt, args.workers)

    from fastload import FastLoader
    train = FastLoader(path, "train", batch_size=args.batch_size, backend=args.backend, num_workers=args.workers,
                       seed=args.seed)
    test = FastLoader(path, "test", batch_size=256, backend=args.backend, num_workers=args.workers,
                      distributed=False, order="sequential")
    model = make_model()
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * len(train)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr * 2, total_steps=steps, pct_start=0.25)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        model.train()
        for images, labels in train:
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, test)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  held-out acc {acc:.3f}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            print(f"  data: {train.stats().verdict}", flush=True)  # is the loop waiting for data?
    result = {"backend": args.backend, "accuracy": acc, "seconds": time.perf_counter() - t0, "epochs": args.epochs,
              "data": train.stats().to_dict(),
              "train_images": args.train_images, "holdout": args.holdout, "world_size": train.world_size}
    if rank == 0:
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result))
    if distributed:
        torch.distributed.destroy_process_group()
    return result


@torch.no_grad()
def evaluate(model, loader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += labels.numel()
    return correct / total


if __name__ == "__main__":
    main()
    sys.exit(0)
