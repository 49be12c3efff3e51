#!/usr/bin/env python
"""Conversion throughput: `fastload convert` (both formats, the local and the Ray engine) against
ffcv's own writer, same images.

    .venv/bin/python scripts/bench_convert.py [--only cifar,cifar-jpeg,imagenet] [--workers 2] [--repeats 3]
    .venv/bin/python scripts/bench_convert.py --no-ray                  # the local engine and ffcv only
    .venv/bin/python scripts/bench_convert.py --memory 130000,1300000   # peak RSS at scale
    .venv/bin/python scripts/bench_convert.py --ray-overhead            # Ray's per-task cost and tasks/s

Workloads (sources cached in .cache/convert-bench):
- cifar: the shared CIFAR-10 sample's 10k images re-saved as PNG (the hub's form) and tiled 5x,
  50,000 images like CIFAR-10 train; fastload's default codec stores them raw, and so does
  ffcv's CIFAR example (``RGBImageField()``, its default: raw pixels for small images);
- cifar-jpeg: the same 50,000 as 32 px JPEG files in class folders (an image-folder copy of
  CIFAR); fastload opens the folder itself, ffcv's writer reads it as torchvision's
  ``ImageFolder`` would (scandir, ``PIL.Image.open(path).convert('RGB')``), both storing raw pixels;
- imagenet: the shared ImageNet sample tiled ``--tile`` times (4,000 images); fastload passes the JPEGs through,
  ffcv's ImageNet example decodes and re-encodes them (``RGBImageField(write_mode='jpg')``).
ffcv's writer is fed decoded PIL images (``ds[i]`` of a Hugging Face dataset), as its docs do.
Each run happens in a fresh process: img/s of the conversion call (imports and dataset opening
done), img/s of the whole process (what a user waits for: importing ffcv alone takes seconds),
output size, and the peak RSS: of the process and its workers together (sampled every 50 ms),
and of the largest one of them (what GNU time's maximum resident set size reports). The Ray
engine runs on a cluster of this machine started once beforehand (``ray start --head``, as a
cluster is up before a job), with ``--workers`` CPUs, on loopback.
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


def cifar_parquet_source(cache: Path, tile: int, files: int = 8) -> Path:
    """The PNG rows of :func:`cifar_png_source` as ``files`` parquet files in the hub's layout
    (``data/train-0000k-of-0000n.parquet``, row groups of 100 rows as ``datasets`` writes images)."""
    import datasets
    out = cache / f"cifar-parquet-x{tile}"
    if not (out / ".complete").exists():
        ds = datasets.load_from_disk(str(cifar_png_source(cache, tile)))["train"]
        (out / "data").mkdir(parents=True, exist_ok=True)
        for k in range(files):
            ds.shard(files, k, contiguous=True).to_parquet(
                str(out / "data" / f"train-{k:05d}-of-{files:05d}.parquet"), batch_size=100)
        (out / ".complete").touch()
    return out


def cifar_jpeg_folder(cache: Path, tile: int) -> Path:
    """The CIFAR sample's JPEGs as files in class folders, tiled (copies: each a file of its own)."""
    import datasets
    out = cache / f"cifar-jpeg-folder-x{tile}"
    if not (out / ".complete").exists():
        ds = datasets.load_dataset(str(SHARED / "cifar10-sample"), split="test")
        names = ds.features["label"].names
        raw = ds.cast_column("img", datasets.Image(decode=False))
        for t in range(tile):
            for i, row in enumerate(raw):
                d = out / names[row["label"]]
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{t:02d}_{i:05d}.jpg").write_bytes(row["img"]["bytes"])
        (out / ".complete").touch()
    return out


def imagenet_source(cache: Path, tile: int) -> Path:
    import datasets
    out = cache / f"imagenet-x{tile}"
    if not (out / "dataset_dict.json").exists():
        ds = datasets.load_dataset(str(SHARED / "imagenet-1k-sample"), split="validation")
        datasets.DatasetDict({"train": datasets.concatenate_datasets([ds] * tile)}).save_to_disk(str(out))
    return out


def _run_fastload(source, out, fmt, workers, address=None) -> float:
    from fastload import convert
    t0 = time.perf_counter()
    convert(source, out, format=fmt, workers=workers, progress=False,
            **({"engine": "ray", "address": address} if address else {}))
    return time.perf_counter() - t0


class _Folder:
    """torchvision.datasets.ImageFolder's reading, which cannot be imported beside this torch:
    class folders sorted, files listed by scandir, each opened with PIL and converted to RGB."""

    def __init__(self, root):
        import os
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = [(os.path.join(root, c, f), k) for k, c in enumerate(classes)
                        for f in sorted(os.listdir(os.path.join(root, c)))]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB"), label


def _run_ffcv(source, out, column, mode, workers) -> float:
    import datasets
    from fastload.formats.beton import import_ffcv
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    if column is None:  # an image folder, read as torchvision's ImageFolder reads it
        pairs = _Folder(source)
    else:
        ds = datasets.load_from_disk(source)["train"]

        class Pairs:  # what ffcv's examples feed its writer
            def __len__(self):
                return len(ds)

            def __getitem__(self, i):
                row = ds[i]
                return row[column].convert("RGB"), row["label"]
        pairs = Pairs()
    field = RGBImageField() if mode == "raw" else RGBImageField(write_mode="jpg")
    t0 = time.perf_counter()
    DatasetWriter(str(out), {"image": field, "label": IntField()}, num_workers=workers).from_indexed_dataset(pairs)
    return time.perf_counter() - t0


def _tree_rss(pid: int, ray_workers: bool = False) -> tuple[int, int]:
    """(the sum, the largest) of the RSS of ``pid`` and its descendants; with ``ray_workers``,
    the Ray cluster's task workers (``ray::`` processes) count as descendants."""
    import psutil
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0, 0
    if ray_workers:
        procs += [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::")]
    sizes = []
    for p in procs:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:
            pass
    return sum(sizes), max(sizes, default=0)


def _child(target, args, answer):
    import faulthandler
    faulthandler.dump_traceback_later(600, exit=True)  # a hang prints where, and ends the run
    mp.set_start_method("fork", force=True)  # a spawned child inherits 'spawn'; ffcv's writer forks
    answer.send(target(*args))


def measure(target, args, ray_workers: bool = False) -> dict:
    """Run ``target(*args)`` in a fresh process: its wall time (imports included), the seconds
    of the conversion call itself (``target``'s answer), and the peak RSS of it and its workers
    (summed, and the largest one)."""
    ctx = mp.get_context("spawn")  # fresh: no inherited imports or page state
    receive, answer = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(target, args, answer))
    peak, largest, stop = [0], [0], threading.Event()

    def sample():
        while not stop.is_set():
            total, big = _tree_rss(p.pid, ray_workers)
            peak[0], largest[0] = max(peak[0], total), max(largest[0], big)
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
    return {"wall_seconds": seconds, "seconds": receive.recv(), "peak_rss_mb": peak[0] / 2**20,
            "largest_rss_mb": largest[0] / 2**20}


class RayCluster:
    """``ray start --head`` on loopback with ``cpus`` CPUs, stopped on exit (``ray stop``)."""

    def __init__(self, cpus: int):
        import os
        import subprocess
        import sys
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process on loopback
        self.port = 26379
        ray = str(Path(sys.executable).with_name("ray"))
        self.stop_cmd = [ray, "stop", "--force"]
        subprocess.run(self.stop_cmd, capture_output=True)
        subprocess.run([ray, "start", "--head", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
                        f"--port={self.port}", "--include-dashboard=false", "--disable-usage-stats"],
                       check=True, capture_output=True)
        # on this machine: found through the session ray start wrote (its auth token included)
        self.address = "auto"

    def close(self):
        import subprocess
        subprocess.run(self.stop_cmd, capture_output=True)


def _ray_overhead(address, n=2000) -> dict:
    """Ray's own cost, apart from any image: a no-op task's round trip one at a time (per-task
    overhead), and ``n`` no-op tasks submitted at once (the driver's sustained tasks/s)."""
    import ray
    ray.init(address=address, logging_level="WARNING")

    @ray.remote(num_cpus=1)
    def noop(x):
        return x
    ray.get([noop.remote(i) for i in range(50)])  # workers started
    t0 = time.perf_counter()
    for i in range(200):
        ray.get(noop.remote(i))
    latency = (time.perf_counter() - t0) / 200
    t0 = time.perf_counter()
    ray.get([noop.remote(i) for i in range(n)])
    rate = n / (time.perf_counter() - t0)
    return {"task_round_trip_ms": latency * 1e3, "tasks_per_s": rate}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def linked_jpeg_folder(cache: Path, n: int) -> Path:
    """``n`` CIFAR JPEG files in class folders: hard links to cifar-jpeg's 50,000 files (each its
    own path, as a copy would be, without the disk)."""
    import os
    base = cifar_jpeg_folder(cache, 5)
    out = cache / f"cifar-jpeg-links-{n}"
    if not (out / ".complete").exists():
        files = sorted(p for p in base.rglob("*.jpg"))
        for k in range(n):
            src = files[k % len(files)]
            d = out / src.parent.name
            d.mkdir(parents=True, exist_ok=True)
            dst = d / f"{k // len(files):03d}_{src.name}"
            if not dst.exists():
                os.link(src, dst)
        (out / ".complete").touch()
    return out


def _count(source: Path) -> int:
    import datasets
    if (source / "dataset_dict.json").exists():
        return len(datasets.load_from_disk(str(source))["train"])
    if (source / "data").is_dir():
        import pyarrow.parquet as pq
        return sum(pq.ParquetFile(f).metadata.num_rows for f in (source / "data").glob("*.parquet"))
    return sum(1 for _ in source.rglob("*.jpg"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--only", default="cifar,cifar-jpeg,imagenet")
    ap.add_argument("--workers", type=int, default=2, help="local workers, and the Ray cluster's CPUs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=20, help="ImageNet sample repeats (200 images each)")
    ap.add_argument("--no-ray", action="store_true", help="leave the Ray engine out")
    ap.add_argument("--memory", help="comma-separated sizes: convert that many CIFAR images (the sample "
                                     "repeated) and report peak RSS, instead of the comparison")
    ap.add_argument("--memory-source", choices=["png", "parquet", "jpeg-folder"], default="jpeg-folder",
                    help="--memory's source: PNGs saved with save_to_disk, the same rows in 8 parquet files (as "
                         "the hub stores them: the local engine opens them through datasets' cache, the Ray "
                         "engine reads them where they lie), or JPEG files in class folders")
    ap.add_argument("--memory-engines", default="local,ray", help="--memory's engines (comma-separated)")
    ap.add_argument("--ray-overhead", action="store_true", help="Ray's per-task round trip and tasks/s, then exit")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    cache = ROOT / ".cache" / "convert-bench"
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    cluster = None if args.no_ray else RayCluster(args.workers)
    try:
        if args.ray_overhead:
            m = measure(_ray_overhead, (cluster.address,))["seconds"]
            print(f"Ray, {args.workers} CPUs: no-op task round trip {m['task_round_trip_ms']:.2f} ms; "
                  f"2000 no-op tasks at once: {m['tasks_per_s']:.0f} tasks/s")
            return
        if args.memory:
            _memory(args, cache, cluster, results)
        else:
            _compare(args, cache, cluster, results)
    finally:
        if cluster is not None:
            cluster.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _memory(args, cache, cluster, results):
    for n in [int(v) for v in args.memory.split(",")]:
        if args.memory_source == "png":
            source, formats = cifar_png_source(cache, -(-n // 10_000)), ("tfrecord", "beton")
        elif args.memory_source == "parquet":
            source, formats = cifar_parquet_source(cache, -(-n // 10_000)), ("tfrecord",)
        else:
            source, formats = linked_jpeg_folder(cache, n), ("tfrecord",)
        rows = _count(source)
        engines = [("local", None)] + ([("ray", cluster.address)] if cluster else [])
        engines = [e for e in engines if e[0] in args.memory_engines.split(",")]
        for fmt in formats:
            for engine, address in engines:
                tmp = Path(tempfile.mkdtemp(dir=cache))
                m = measure(_run_fastload, (str(source), tmp / "out", fmt, args.workers, address),
                            ray_workers=address is not None)
                m["bytes"] = _size(tmp / "out")
                shutil.rmtree(tmp)
                print(f"{rows:>9} CIFAR {args.memory_source} --format {fmt:<8} --engine {engine:<5}: largest process "
                      f"{m['largest_rss_mb']:5.0f} MB, all together {m['peak_rss_mb']:5.0f} MB, {rows / m['seconds']:6.0f} "
                      f"img/s, whole process {m['wall_seconds']:.0f} s, {m['bytes'] / 2**30:.2f} GiB", flush=True)
                results.append({"images": rows, "format": fmt, "engine": engine, **m})


def _compare(args, cache, cluster, results):
    for workload in args.only.split(","):
        if workload == "cifar":
            source, column, mode = cifar_png_source(cache, 5), "img", "raw"
        elif workload == "cifar-jpeg":
            source, column, mode = cifar_jpeg_folder(cache, 5), None, "raw"
        else:
            source, column, mode = imagenet_source(cache, args.tile), "image", "jpg"
        n = _count(source)
        print(f"{workload}: {n} images, {args.workers} workers, best of {args.repeats} (each in a fresh process)")
        systems = {f"fastload convert --format {fmt}": (_run_fastload, fmt, None) for fmt in ("tfrecord", "beton")}
        if cluster is not None:
            systems["fastload convert --engine ray (tfrecord)"] = (_run_fastload, "tfrecord", cluster.address)
        systems[f"ffcv DatasetWriter ({mode})"] = (_run_ffcv, None, None)
        best = {}
        for r in range(args.repeats):  # systems take turns: drift hits all alike
            for name, (target, fmt, address) in systems.items():
                tmp = Path(tempfile.mkdtemp(dir=cache))
                out = tmp / ("out" if fmt else "ffcv.beton")
                call = ((str(source), out, fmt, args.workers, address) if fmt else
                        (str(source), out, column, mode, args.workers))
                m = measure(target, call, ray_workers=address is not None)
                m["bytes"] = _size(out)
                shutil.rmtree(tmp)
                if name not in best or m["seconds"] < best[name]["seconds"]:
                    best[name] = m
        peer = best[f"ffcv DatasetWriter ({mode})"]
        local = best["fastload convert --format tfrecord"]
        print(f"  {'':<40} {'the call':>18} {'whole process':>26}")
        for name, m in best.items():
            vs_local = f"  {local['seconds'] / m['seconds']:4.2f}x local" if "ray" in name else ""
            print(f"  {name:<40} {n / m['seconds']:7.0f} img/s {peer['seconds'] / m['seconds']:5.2f}x  "
                  f"{n / m['wall_seconds']:7.0f} img/s {peer['wall_seconds'] / m['wall_seconds']:5.2f}x ffcv  "
                  f"{m['bytes'] / 2**20:7.1f} MB  peak RSS {m['peak_rss_mb']:5.0f} MB (largest "
                  f"{m['largest_rss_mb']:4.0f}){vs_local}")
            results.append({"workload": workload, "system": name, "images": n, **m,
                            "images_per_s": n / m["seconds"], "x_ffcv": peer["seconds"] / m["seconds"],
                            "x_ffcv_whole_process": peer["wall_seconds"] / m["wall_seconds"]})


if __name__ == "__main__":
    main()
