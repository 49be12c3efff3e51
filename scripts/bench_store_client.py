#!/usr/bin/env python
"""The reader's CPU per GB downloaded, by S3 client (#34, item 3): fastload's ``Store`` (what the
node cache fetches units with: obstore by default, ``fastload-fsspec`` its s3fs/aiohttp path as
before) against obstore called bare (object_store in Rust, what litdata reads through), on the
same object in one S3-protocol server.

    bash scripts/setup_streaming_peers.sh            # once: the s3rver server
    .venv/bin/pip install --no-deps litdata          # optional: litdata's S3Downloader beside (its
                                                     # torchvision does not import beside torch here)
    .venv/bin/python scripts/bench_store_client.py [--mb 512] [--unit-mb 8] [--concurrency 8] [--latency-ms 20]
                                                   [--repeats 3] [--keep-freed-memory]

s3rver behind fastload.testing.store_proxy (``--latency-ms`` added to every request) runs on CPU 1;
each client runs in a fresh process on CPU 0, as a loader's fetchers share its decoding cores.
A client downloads a ``--mb`` object in ``--unit-mb`` ranges, ``--concurrency`` at a time (the
cache's 8 fetchers), twice: the bytes alone, then each also written into a sparse file at its
offset (the cache's write). litdata's downloader fetches whole objects into files (its chunks), so
it downloads the same bytes as ``--unit-mb`` objects, ``--concurrency`` at a time, each through
its ``S3Downloader.download_file`` (obstore, a temporary file, a rename): the second row only.
Reported, best of ``--repeats``: MB/s, and the client process's CPU
seconds (user + system) per GB: what the download takes from the cores that decode.
``--keep-freed-memory``: as on a machine whose free memory stays with it (``freed_memory.py``:
on this VM, writes into new pages are faulted in from its host, and the write column swung 2-5x).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

CLIENTS = ("fastload", "fastload-fsspec", "obstore", "litdata")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reader(client: str, endpoint: str):
    """``read(start, end) -> bytes-like`` of the object ``s3://bench/blob``."""
    if client.startswith("fastload"):
        from fastload.storage.location import Store
        if client == "fastload-fsspec":
            os.environ["FASTLOAD_S3_CLIENT"] = "fsspec"  # every read through s3fs, as before obstore
        store = Store("s3://bench")  # (the heap set as a streaming loader sets it: storage/heap.py)
        assert store.client == ("fsspec" if client == "fastload-fsspec" else "obstore"), store.client
        return lambda start, end: store.read("blob", start, end)
    import obstore
    from obstore.store import S3Store
    store = S3Store("bench", endpoint=endpoint, access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                    secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                    client_options={"allow_http": True})
    return lambda start, end: obstore.get_range(store, "blob", start=start, end=end)


def _litdata(cfg: dict):
    """litdata's downloader: ``fetch((start, end))`` downloads the part object that holds those bytes into its file."""
    from litdata.streaming import downloader as litdata_downloader
    from litdata.streaming.downloader import S3Downloader
    # its obstore client options have no allow_http: the local server speaks plain http
    litdata_downloader._OBSTORE_CLIENT_OPTIONS = {**litdata_downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": True}
    parts = [{"filename": f"part-{s // cfg['unit']:05d}", "chunk_bytes": min(cfg["unit"], cfg["size"] - s)}
             for s in range(0, cfg["size"], cfg["unit"])]
    downloader = S3Downloader("s3://bench/parts", cfg["tmp"], parts)

    def fetch(r):
        name = f"part-{r[0] // cfg['unit']:05d}"
        downloader.download_file(f"s3://bench/parts/{name}", os.path.join(cfg["tmp"], name))
        return os.path.getsize(os.path.join(cfg["tmp"], name))
    return fetch


def child(cfg: dict) -> dict:
    """One client in this process: (seconds, CPU seconds) of a download of the whole object."""
    os.sched_setaffinity(0, {0})
    size, unit = cfg["size"], cfg["unit"]
    if cfg["client"] == "litdata":
        fetch = _litdata(cfg)
        fetch((size - 1, size))  # connections, credentials, imports: not timed (one part, downloaded again below)
        os.remove(os.path.join(cfg["tmp"], f"part-{(size - 1) // unit:05d}"))
        c0, t0 = _cpu_s(), time.perf_counter()
        with ThreadPoolExecutor(cfg["concurrency"]) as pool:
            got = sum(pool.map(fetch, [(s, min(size, s + unit)) for s in range(0, size, unit)]))
        assert got == size, (got, size)
        return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0}
    read = _reader(cfg["client"], cfg["endpoint"])
    if cfg["client"].startswith("fastload"):
        from fastload.storage.heap import keep_unit_buffers_on_the_heap
        keep_unit_buffers_on_the_heap(unit, cfg["concurrency"])
    ranges = [(s, min(size, s + unit)) for s in range(0, size, unit)]
    read(0, 4096)  # connections, credentials, imports: not timed
    out = None
    if cfg["write"]:
        out = os.open(os.path.join(cfg["tmp"], "cache"), os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(out, size)

    def fetch(r):
        data = read(*r)
        if out is not None:
            os.pwrite(out, memoryview(data), r[0])
        return len(memoryview(data))
    c0, t0 = _cpu_s(), time.perf_counter()
    with ThreadPoolExecutor(cfg["concurrency"]) as pool:
        got = sum(pool.map(fetch, ranges))
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - c0
    assert got == size, (got, size)
    if out is not None:
        os.close(out)
    return {"seconds": seconds, "cpu_s": cpu}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--unit-mb", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="as on a machine whose free memory stays with it (root; freed_memory.py)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import s3fs
    from fastload.testing.store_proxy import S3RVER, StoreServers
    if not S3RVER.exists():
        raise SystemExit(f"{S3RVER} is missing: run bash scripts/setup_streaming_peers.sh")
    clients = [c for c in CLIENTS if c not in ("obstore", "litdata") or _has(c)]
    from freed_memory import describe, keep_freed_memory, prime_free_memory
    if describe():
        print(describe())
    if args.keep_freed_memory:
        keep_freed_memory()
    os.sched_setaffinity(0, {1})  # the servers inherit CPU 1
    servers = StoreServers(latency_ms=0, server="s3rver")
    os.sched_setaffinity(0, {0, 1})
    os.environ.update(servers.env())
    size = args.mb << 20
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "blob"), "wb") as f:
                f.write(os.urandom(size))
            fs.put(os.path.join(tmp, "blob"), "bench/blob")
            if "litdata" in clients:  # the same bytes as objects of --unit-mb: litdata's chunks
                with open(os.path.join(tmp, "blob"), "rb") as f:
                    for i, start in enumerate(range(0, size, args.unit_mb << 20)):
                        fs.pipe(f"bench/parts/part-{i:05d}", f.read(args.unit_mb << 20))
        servers.latency(args.latency_ms)
        print(f"{args.mb} MB in {args.unit_mb} MB ranges, {args.concurrency} at a time, {args.latency_ms:g} ms a "
              f"request; s3rver and the proxy on CPU 1, the client on CPU 0; best of {args.repeats}\n")
        print("| client | what | MB/s | CPU s per GB |")
        print("|---|---|---|---|")
        for write in (False, True):
            for client in clients:
                if client == "litdata" and not write:
                    continue  # it writes every download into a file
                runs = []
                for _ in range(args.repeats):
                    _drop_page_cache()
                    if args.keep_freed_memory:
                        prime_free_memory(tempfile.gettempdir(), 2 * size)
                    with tempfile.TemporaryDirectory() as tmp:
                        cfg = {"client": client, "endpoint": servers.endpoint, "size": size,
                               "unit": args.unit_mb << 20, "concurrency": args.concurrency, "write": write, "tmp": tmp}
                        r = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True,
                                           text=True)
                    if r.returncode:
                        raise SystemExit(f"{client}: {r.stderr[-2000:]}")
                    runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
                mbs = max(size / 2**20 / x["seconds"] for x in runs)
                cpu = min(x["cpu_s"] for x in runs) / (size / 2**30)
                what = "download + write into the cache file" if write else "download"
                print(f"| {client} | {what} | {mbs:,.0f} | {cpu:.2f} |", flush=True)
        for missing in {"obstore", "litdata"} - set(clients):
            print(f"\n({missing} is not installed: .venv/bin/pip install --no-deps {missing})")
    finally:
        servers.close()


def _drop_page_cache() -> None:
    """Every run from the same state: the page cache written back and dropped (as root; a run's
    cache writes otherwise pay for reclaiming the last run's pages, a swing of 5x here)."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
