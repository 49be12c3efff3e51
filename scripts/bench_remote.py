#!/usr/bin/env python
"""FastLoader on a dataset in object storage against the same loader on a local directory.

    bash scripts/setup_streaming_peers.sh     # once: the s3rver server
    .venv/bin/python scripts/bench_remote.py [--tile 20] [--cifar-tile 5] [--latency-ms 20] [--workers 2]
                                             [--store s3rver|moto|http] [--pin] [--keep-freed-memory]

The store: s3rver (an S3-protocol server, npm) on 127.0.0.1 behind fastload.testing.store_proxy, which
adds ``--latency-ms`` to every request and counts the bytes it relays; ``--store moto`` for moto's
server (it copies a whole object to answer each range request: its cold figures are moto's, not
the loader's), ``--store http`` for a static HTTP server with range requests. Workloads: the ImageNet sample tiled ``--tile``
times (.beton, JPEG, ffcv backend) and the CIFAR-10 sample tiled ``--cifar-tile`` times (.beton,
raw pixels); train spec, ``--workers`` workers, cache large enough for the dataset. Each
measurement runs in a fresh process (its own page cache state, imports, JIT):
- local: epochs over the local directory (the first warms the page cache; img/s of the later ones);
- cold: an empty cache: seconds from ``FastLoader(url)`` to the first batch, the first epoch's
  img/s and the bytes read from the store during it, then the second epoch's;
- warm: a new process on the filled cache: an epoch's img/s and its bytes;
- before them, the store alone: every data file read in 4 MiB ranges by the loader's fetchers,
  nothing written: the rate the store serves the loader's core at most.
A first process, not measured, compiles and caches the kernels (numba's disk cache), so that no
measured process pays for it. Each epoch also reports the loader process's CPU seconds (its
threads, user + system), and the cold epoch the CPU its download and cache writes cost: its CPU
less the warm cache's first epoch's (a new process too, reading the same files from the node
cache), per GB downloaded. ``--pin``: the store's servers on CPU 1, the loaders (local runs too) on CPU 0, as
``bench_streaming.py`` does: on a 2-core machine the store otherwise takes a third of the
loader's CPU, which a store on another machine would not.
Targets (#21, #34): cold >= 90% of local img/s, warm >= 98%, first batch <= 3 s, second epoch's
bytes < 5% of the dataset.

A cold epoch brings the dataset into new page-cache pages, which on a VM whose host takes back
the guest's free memory (this development VM) are faulted in from the host: how much of a run
pays it depends on what was freed just before, so the figures swing. ``--keep-freed-memory``
measures the loader as on a machine whose free memory stays with it (``freed_memory.py``; root),
a file of twice the dataset written and deleted before each measured process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def store_rate(cfg: dict) -> dict:
    """Runs in its own process: the store alone, every data file read by the loader's fetchers
    in 4 MiB ranges (about this dataset's units), through fastload's Store; nothing written."""
    from concurrent.futures import ThreadPoolExecutor

    from fastload.storage.cache import FETCHERS
    from fastload.storage.location import Store
    if cfg.get("cpus"):
        os.sched_setaffinity(0, set(cfg["cpus"]))
    store, step = Store(cfg["location"]), 4 << 20
    ranges = [(name, a, min(size, a + step)) for name, size in cfg["files"] for a in range(0, size, step)]
    store.read(ranges[0][0], 0, 4096)  # the client set up (credentials, connection) before the clock starts
    t = time.perf_counter()
    with ThreadPoolExecutor(FETCHERS) as pool:
        n = sum(len(b) for b in pool.map(lambda r: store.read(*r), ranges))
    return {"bytes": n, "seconds": time.perf_counter() - t}


def child(cfg: dict) -> dict:
    """Runs in its own process: epochs of one loader, timed, with the store's bytes per epoch."""
    if cfg.get("kind") == "store_rate":
        return store_rate(cfg)
    from fastload.testing.store_proxy import store_bytes as read_log

    from fastload import FastLoader

    def store_bytes(clear=False):
        return read_log(cfg["endpoint"], clear) if cfg.get("endpoint") else 0
    import resource

    def cpu_s():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    if cfg.get("cpus"):
        os.sched_setaffinity(0, set(cfg["cpus"]))
    store_bytes(clear=True)
    t0 = time.perf_counter()
    loader = FastLoader(cfg["location"], "train", batch_size=cfg["batch_size"], spec=cfg["spec"],
                        backend="ffcv", num_workers=cfg["workers"], distributed=False,
                        cache_dir=cfg.get("cache_dir"))
    out = {"epochs": []}
    for e in range(cfg["epochs"]):
        loader.set_epoch(e)
        n, first = 0, None
        t, c = time.perf_counter(), cpu_s()
        for images, labels in loader:
            if first is None:
                first = time.perf_counter() - (t0 if e == 0 else t)
            n += len(labels)
        dt = time.perf_counter() - t
        out["epochs"].append({"img_s": n / dt, "seconds": dt, "first_batch_s": first, "images": n,
                              "cpu_s": cpu_s() - c, "bytes": store_bytes(clear=True)})
    return out


def run_child(cfg: dict) -> dict:
    if cfg.get("prime"):
        from freed_memory import prime_free_memory
        prime_free_memory(ROOT / ".cache", cfg["prime"])
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                       env={**os.environ, **cfg.get("env", {})})
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def prepare(args) -> dict:
    import datasets
    from bench_convert import cifar_png_source, imagenet_source
    from fastload import Manifest, convert
    from fastload.formats.manifest import CHUNK_HASHES_FROM_VERSION
    cache = ROOT / ".cache" / "remote"
    out = {}
    for name, source, codec, spec in (("imagenet", imagenet_source(cache, args.tile), "auto", "imagenet:train"),
                                      ("cifar", cifar_png_source(cache, args.cifar_tile), "raw", "cifar10:train")):
        d = cache / f"{name}-beton-{Path(source).name}"
        if not (d / "manifest.json").exists() or Manifest.read(d).data["format_version"] < CHUNK_HASHES_FROM_VERSION:
            convert(str(source), d, format="beton", workers=args.workers, progress=False, image_codec=codec,
                    overwrite=True)
        out[name] = {"dir": d, "spec": spec, "size": sum(f.stat().st_size for f in d.iterdir() if f.is_file()),
                     "images": Manifest.read(d).split("train").num_examples}
    del datasets
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, default=20)
    ap.add_argument("--cifar-tile", type=int, default=5)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--only", choices=["imagenet", "cifar"], default=None)
    ap.add_argument("--store", choices=["s3rver", "moto", "http"], default="s3rver",
                    help="s3rver: an S3-protocol server (scripts/setup_streaming_peers.sh installs it); moto: moto's "
                         "S3 server (which copies a whole object to answer a range request); http: a static HTTP "
                         "server with range requests (https://-style locations)")
    ap.add_argument("--pin", action="store_true", help="the store's servers on CPU 1, the loaders on CPU 0")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="as on a machine whose free memory stays with it (root; see above)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import s3fs
    from fastload.testing.store_proxy import S3RVER, StoreServers
    data = prepare(args)
    from freed_memory import describe, keep_freed_memory
    if describe():
        print(describe())
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.store == "s3rver" and not S3RVER.exists():
        raise SystemExit(f"{S3RVER} is missing: run bash scripts/setup_streaming_peers.sh (or pass --store moto)")
    if args.pin:  # the servers inherit CPU 1
        os.sched_setaffinity(0, {1})
    if args.store == "http":
        servers = StoreServers(latency_ms=args.latency_ms, directory=str(ROOT / ".cache" / "remote"))
    else:
        servers = StoreServers(latency_ms=args.latency_ms, server=args.store)
        os.environ.update(servers.env())
    if args.pin:
        os.sched_setaffinity(0, {0, 1})
    results = {}
    try:
        if args.store != "http":
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("bench")
        for name, w in data.items():
            if args.only and name != args.only:
                continue
            if args.store != "http":
                servers.latency(0)
                fs.put(f"{w['dir']}/", f"bench/{name}/", recursive=True)
                servers.latency(args.latency_ms)
                url = f"s3://bench/{name}"
            else:
                url = f"{servers.endpoint}/{w['dir'].name}"
            base = {"batch_size": args.batch_size, "workers": args.workers, "spec": w["spec"],
                    "endpoint": servers.endpoint, "cpus": [0] if args.pin else None,
                    "prime": 2 * w["size"] if args.keep_freed_memory else 0}
            cache_dir = ROOT / ".cache" / "remote" / "node-cache"
            shutil.rmtree(cache_dir, ignore_errors=True)
            run_child({**base, "location": str(w["dir"]), "epochs": 1, "endpoint": None})  # compiles: not measured
            # what the store serves the loader's core at most
            files = [(f.name, f.stat().st_size) for f in w["dir"].iterdir() if f.suffix == ".beton"]
            rate = run_child({**base, "kind": "store_rate", "location": url, "files": files, "prime": 0})
            print(f"\n{name}: the store alone serves {rate['bytes'] / 1e6:.0f} MB in {rate['seconds']:.2f} s "
                  f"({rate['bytes'] / 1e6 / rate['seconds']:.0f} MB/s) to the loader's fetchers")
            r = {"local": run_child({**base, "location": str(w["dir"]), "epochs": 3, "endpoint": None}),
                 "cold": run_child({**base, "location": url, "epochs": 2, "cache_dir": str(cache_dir)}),
                 "warm": run_child({**base, "location": url, "epochs": 2, "cache_dir": str(cache_dir)})}
            results[name] = {"dataset_bytes": w["size"], "images": w["images"], **r}
            report(name, results[name])
    finally:
        servers.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def report(name: str, r: dict) -> None:
    local = max(e["img_s"] for e in r["local"]["epochs"][1:])
    local_first = r["local"]["epochs"][0]
    cold, warm = r["cold"]["epochs"], r["warm"]["epochs"]
    size = r["dataset_bytes"]
    print(f"\n{name}: {r['images']} images, {size / 1e6:.0f} MB, local {local:,.0f} img/s (a new process's first "
          f"epoch: {local_first['img_s']:,.0f} img/s, first batch {local_first['first_batch_s']:.2f} s)")
    # a new process's first epoch (imports done: JIT compiles, pools, the page cache) is compared with
    # the local directory's first epoch in a new process too, the later ones with its later ones
    print("| run | img/s | vs local, same epoch | vs local, later epochs | first batch | bytes from the store | "
          "CPU ms / image |")
    print("|---|---|---|---|---|---|---|")
    rows = [("local, epoch 1", local_first, local_first), ("cold cache, epoch 1", cold[0], local_first),
            ("cold cache, epoch 2", cold[1], None), ("warm cache (new process), epoch 1", warm[0], local_first),
            ("warm cache, epoch 2", warm[1], None)]
    for label, e, same in rows:
        same_ratio = e["img_s"] / (same["img_s"] if same else local)
        print(f"| {label} | {e['img_s']:,.0f} | {same_ratio:.2f}x | {e['img_s'] / local:.2f}x | "
              f"{e['first_batch_s']:.2f} s | {e['bytes'] / 1e6:.1f} MB ({e['bytes'] / size:.1%}) | "
              f"{e['cpu_s'] / e['images'] * 1e3:.2f} |")
    e = cold[0]
    if e["bytes"]:  # the cold first epoch's CPU beyond the warm first epoch's, per GB it downloaded
        per_gb = (e["cpu_s"] - warm[0]["cpu_s"]) / (e["bytes"] / 2**30)
        print(f"the cold epoch's download and cache writes: {per_gb:.2f} CPU s per GB "
              f"({e['cpu_s']:.2f} - {warm[0]['cpu_s']:.2f} s over {e['bytes'] / 2**30:.3f} GB)")


if __name__ == "__main__":
    main()
