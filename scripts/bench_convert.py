#!/usr/bin/env python
"""Conversion throughput: `fastload convert` (both formats) against ffcv's own writer, same images.

    .venv/bin/python scripts/bench_convert.py [--only cifar,imagenet] [--workers 2] [--repeats 3]
    .venv/bin/python scripts/bench_convert.py --memory 130000,1300000   # peak RSS at scale

Workloads (sources cached in .cache/convert-bench):
- cifar: the shared CIFAR-10 sample's 10k images re-saved as PNG (the hub's form) and tiled 5x,
  50,000 images like CIFAR-10 train; fastload's default codec stores them raw, and so does
  ffcv's CIFAR example (``RGBImageField()``, its default: raw pixels for small images);
- imagenet: the shared ImageNet sample tiled ``--tile`` times (4,000 images); fastload passes the JPEGs through,
  ffcv's ImageNet example decodes and re-encodes them (``RGBImageField(write_mode='jpg')``).
ffcv's writer is fed decoded PIL images (``ds[i]`` of a Hugging Face dataset), as its docs do.
Each run happens in a fresh process: img/s of the conversion call (imports and dataset opening
done), img/s of the whole process (what a user waits for: importing ffcv alone takes seconds),
output size, and the peak RSS of the process and its workers together (sampled every 50 ms).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import shutil
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def cifar_png_source(cache: Path, tile: int) -> Path:
    """The CIFAR sample as PNGs (lossless, as the hub stores CIFAR), tiled."""
    import datasets
    out = cache / f"cifar-png-x{tile}"
    if not (out / "dataset_dict.json").exists():
        ds = datasets.load_dataset(str(SHARED / "cifar10-sample"), split="test")

        def as_png(row):
            buf = io.BytesIO()
            row["img"].convert("RGB").save(buf, format="PNG")
            return {"img": {"bytes": buf.getvalue(), "path": None}}
        png = ds.map(as_png, features=ds.features, desc="PNG")
        datasets.DatasetDict({"train": datasets.concatenate_datasets([png] * tile)}).save_to_disk(str(out))
    return out


def imagenet_source(cache: Path, tile: int) -> Path:
    import datasets
    out = cache / f"imagenet-x{tile}"
    if not (out / "dataset_dict.json").exists():
        ds = datasets.load_dataset(str(SHARED / "imagenet-1k-sample"), split="validation")
        datasets.DatasetDict({"train": datasets.concatenate_datasets([ds] * tile)}).save_to_disk(str(out))
    return out


def _run_fastload(source, out, fmt, workers) -> float:
    from fastload import convert
    t0 = time.perf_counter()
    convert(source, out, format=fmt, workers=workers, progress=False)
    return time.perf_counter() - t0


def _run_ffcv(source, out, column, mode, workers) -> float:
    import datasets
    from fastload.formats.beton import import_ffcv
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    ds = datasets.load_from_disk(source)["train"]

    class Pairs:  # what ffcv's examples feed its writer
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            row = ds[i]
            return row[column].convert("RGB"), row["label"]
    field = RGBImageField() if mode == "raw" else RGBImageField(write_mode="jpg")
    t0 = time.perf_counter()
    DatasetWriter(str(out), {"image": field, "label": IntField()}, num_workers=workers).from_indexed_dataset(Pairs())
    return time.perf_counter() - t0


def _tree_rss(pid: int) -> int:
    import psutil
    try:
        root = psutil.Process(pid)
        total = root.memory_info().rss
        for child in root.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def _child(target, args, answer):
    import faulthandler
    faulthandler.dump_traceback_later(600, exit=True)  # a hang prints where, and ends the run
    mp.set_start_method("fork", force=True)  # a spawned child inherits 'spawn'; ffcv's writer forks
    answer.send(target(*args))


def measure(target, args) -> dict:
    """Run ``target(*args)`` in a fresh process: its wall time (imports included), the seconds
    of the conversion call itself (``target``'s answer), and the peak RSS of it and its workers."""
    ctx = mp.get_context("spawn")  # fresh: no inherited imports or page state
    receive, answer = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(target, args, answer))
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(p.pid))
            time.sleep(0.05)
    t0 = time.perf_counter()
    p.start()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    p.join()
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    if p.exitcode != 0 or not receive.poll():
        raise RuntimeError(f"{target.__name__} exited with code {p.exitcode}")
    return {"wall_seconds": seconds, "seconds": receive.recv(), "peak_rss_mb": peak[0] / 2**20}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--only", default="cifar,imagenet")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=20, help="ImageNet sample repeats (200 images each)")
    ap.add_argument("--memory", help="comma-separated sizes: convert that many CIFAR PNGs (the sample "
                                     "repeated) in both formats and report peak RSS, instead of the comparison")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    cache = ROOT / ".cache" / "convert-bench"
    cache.mkdir(parents=True, exist_ok=True)
    import datasets
    results = []
    if args.memory:
        for n in [int(v) for v in args.memory.split(",")]:
            source = cifar_png_source(cache, -(-n // 10_000))
            for fmt in ("tfrecord", "beton"):
                tmp = Path(tempfile.mkdtemp(dir=cache))
                m = measure(_run_fastload, (str(source), tmp / "out", fmt, args.workers))
                m["bytes"] = _size(tmp / "out")
                shutil.rmtree(tmp)
                rows = len(datasets.load_from_disk(str(source))["train"])
                print(f"{rows:>9} CIFAR PNGs --format {fmt:<8}: peak RSS {m['peak_rss_mb']:5.0f} MB (process and "
                      f"workers), {rows / m['seconds']:6.0f} img/s, {m['bytes'] / 2**30:.2f} GiB", flush=True)
                results.append({"images": rows, "format": fmt, **m})
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return
    for workload in args.only.split(","):
        if workload == "cifar":
            source, column, mode = cifar_png_source(cache, 5), "img", "raw"
        else:
            source, column, mode = imagenet_source(cache, args.tile), "image", "jpg"
        n = len(datasets.load_from_disk(str(source))["train"])
        print(f"{workload}: {n} images, {args.workers} workers, best of {args.repeats} (each in a fresh process)")
        systems = {f"fastload convert --format {fmt}": (_run_fastload, fmt) for fmt in ("tfrecord", "beton")}
        systems[f"ffcv DatasetWriter ({mode})"] = (_run_ffcv, None)
        best = {}
        for r in range(args.repeats):  # systems take turns: drift hits all alike
            for name, (target, fmt) in systems.items():
                tmp = Path(tempfile.mkdtemp(dir=cache))
                out = tmp / ("out" if fmt else "ffcv.beton")
                call = (str(source), out, fmt, args.workers) if fmt else (str(source), out, column, mode, args.workers)
                m = measure(target, call)
                m["bytes"] = _size(out)
                shutil.rmtree(tmp)
                if name not in best or m["seconds"] < best[name]["seconds"]:
                    best[name] = m
        peer = best[f"ffcv DatasetWriter ({mode})"]
        print(f"  {'':<34} {'the call':>18} {'whole process':>26}")
        for name, m in best.items():
            print(f"  {name:<34} {n / m['seconds']:7.0f} img/s {peer['seconds'] / m['seconds']:5.2f}x  "
                  f"{n / m['wall_seconds']:7.0f} img/s {peer['wall_seconds'] / m['wall_seconds']:5.2f}x ffcv  "
                  f"{m['bytes'] / 2**20:7.1f} MB  peak RSS {m['peak_rss_mb']:5.0f} MB")
            results.append({"workload": workload, "system": name, "images": n, **m,
                            "images_per_s": n / m["seconds"], "x_ffcv": peer["seconds"] / m["seconds"],
                            "x_ffcv_whole_process": peer["wall_seconds"] / m["wall_seconds"]})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
