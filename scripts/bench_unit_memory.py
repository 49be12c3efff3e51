#!/usr/bin/env python
"""A streaming rank's memory while its fetchers download large units (#34): every data unit of a
TFRecord dataset fetched by the cache's FETCHERS threads, in pieces of ``cache.PIECE_BYTES`` (the
default) against whole units (as before), each in a fresh process on CPU 0, the store (s3rver)
on CPU 1.

    bash scripts/setup_streaming_peers.sh     # once: the s3rver server
    .venv/bin/python scripts/bench_unit_memory.py [--tile 200] [--rounds 2]

The ImageNet sample tiled ``--tile`` times (200: 40,000 photos, 4.1 GiB, units of 66 MiB; an
ImageNet TFRecord shard, 1,024 photos, is a ~110 MB unit). Reported: peak resident memory
(VmHWM) and seconds of the download.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "unit-memory"


def child(url: str, cache_dir: str, whole: bool) -> dict:
    from fastload.storage import cache, open_dataset
    os.sched_setaffinity(0, {0})
    if whole:
        cache.PIECE_BYTES = 1 << 40  # a unit in one request, as before pieces
    unit_cache = open_dataset(url, cache_dir=cache_dir).source.cache
    units = [u.index for u in unit_cache.units if u.evictable]
    t = time.perf_counter()
    with ThreadPoolExecutor(cache.FETCHERS) as pool:
        list(pool.map(unit_cache.fetch, units))
    return {"seconds": time.perf_counter() - t, "peak_mb": _hwm_mb(), "units": len(units),
            "largest_mib": max(unit_cache.units[u].size for u in units) / 2**20,
            "gib": sum(unit_cache.units[u].size for u in units) / 2**30}


def _hwm_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.child[2] == "whole")))
        return
    import s3fs
    from bench_convert import imagenet_source
    from fastload import convert
    from fastload.testing.store_proxy import S3RVER, StoreServers
    if not S3RVER.exists():
        raise SystemExit(f"{S3RVER} is missing: run bash scripts/setup_streaming_peers.sh")
    data = CACHE / f"tfrecord-x{args.tile}"
    if not (data / "manifest.json").exists():
        convert(str(imagenet_source(CACHE, args.tile)), data, format="tfrecord", workers=2, progress=False,
                overwrite=True)
    os.sched_setaffinity(0, {1})  # the servers inherit CPU 1
    servers = StoreServers(latency_ms=0, server="s3rver")
    os.sched_setaffinity(0, {0, 1})
    os.environ.update(servers.env())
    node_cache = CACHE / "node-cache"
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(f"{data}/", "bench/t/", recursive=True)
        print("| download | peak RSS | seconds |\n|---|---|---|")
        for _ in range(args.rounds):
            for mode in ("pieces", "whole"):
                shutil.rmtree(node_cache, ignore_errors=True)
                r = subprocess.run([sys.executable, __file__, "--child", "s3://bench/t", str(node_cache), mode],
                                   capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(r.stderr[-2000:])
                x = json.loads(r.stdout.strip().splitlines()[-1])
                what = "in pieces (default)" if mode == "pieces" else "whole units"
                print(f"| {x['units']} units of up to {x['largest_mib']:.0f} MiB ({x['gib']:.1f} GiB), {what} | "
                      f"{x['peak_mb']:.0f} MB | {x['seconds']:.1f} |", flush=True)
    finally:
        servers.close()
        shutil.rmtree(node_cache, ignore_errors=True)


if __name__ == "__main__":
    main()
