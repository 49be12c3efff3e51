#!/usr/bin/env python
"""fastload against litdata's and Mosaic's StreamingDataset, in one run, on one S3-protocol server (#22).

    bash scripts/setup_streaming_peers.sh            # once: the peers' venv and the s3rver server
    .venv/bin/python scripts/bench_streaming.py [--tile 20] [--latency-ms 20] [--workers 2] [--batch-size 256]
                                                [--caches 1.0,0.25] [--systems fastload,fastload-sorted,litdata,mosaic,...]
                                                [--pin] [--repeats 3] [--epochs-unknown]

The data: the ImageNet sample tiled ``--tile`` times as an image folder (train/<class>/<file>),
so sorted by class, as image-folder sources are. Each system converts it with its own writer
(fastload: ``convert --format beton`` (its rows in a seeded random order), and ``--keep-order`` for ``fastload-sorted``;
litdata: ``optimize``; Mosaic: ``MDSWriter``; each peer also with 16 MB chunks or shards, which
its docs advise for a small cache), the result is uploaded to s3rver (an S3-protocol
server; moto copies a whole object to answer a range request) behind fastload.testing.store_proxy, which
adds ``--latency-ms`` to every request and counts the bytes it relays.

Each system then reads it in a fresh process from an empty cache limited to each fraction of
``--caches`` of its own dataset's bytes: train spec (RandomResizedCrop(224) + flip + normalize),
shuffled, ``--workers`` DataLoader workers (fastload: decoding threads), 2 epochs (fastload is told
so, ``epochs=2``, as a training script that knows its epoch count tells it; ``--epochs-unknown``:
not, and its last epoch also fetches a third one's first batches). Reported: img/s
per epoch, the first batch (seconds from constructing the loader), bytes from the store per epoch
(x its dataset), distinct labels per batch (against a global permutation's, computed over the same
labels). fastload is also timed on the local directory, epoch by epoch (the ">= 85% of local" target:
each epoch against the same epoch on the local directory, the first with the loader's start-up),
in a run just before each of its runs from the store: this machine's speed drifts by 10% between
runs, so each ratio is of a pair, and ``--repeats`` pairs give their median (each pair is listed). With
``--pin`` the store's servers get one core and the readers the other: on a 2-core machine the
store otherwise takes a third of the loader's CPU, which a store on another machine would not.

Targets (#22, at 25%): fastload >= 85% of its local img/s, <= 1.1x the dataset's bytes per epoch,
>= 90% of a global permutation's labels per batch, ahead of both peers on img/s, first batch and
labels per batch, and no worse on bytes.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "streaming"
PEERS_PY = ROOT / ".cache" / "streaming-peers" / "bin" / "python"
SYSTEMS = ("fastload", "fastload-sorted", "litdata", "mosaic", "litdata-16mb", "mosaic-16mb")


# --------------------------------------------------------------------------- the data
def image_folder(tile: int) -> Path:
    """The ImageNet sample, tiled, as root/train/<class>/<file>.JPEG: its files' own bytes."""
    import datasets
    from bench_convert import SHARED
    out = CACHE / f"imagenet-x{tile}-folder"
    if (out / ".done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    ds = datasets.load_dataset(str(SHARED / "imagenet-1k-sample"), split="validation")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    for k, row in enumerate(ds):
        d = out / "train" / f"n{row['label']:05d}"
        d.mkdir(parents=True, exist_ok=True)
        for t in range(tile):
            (d / f"{k:05d}-{t:03d}.JPEG").write_bytes(row["image"]["bytes"])
    (out / ".done").touch()
    return out


def write(system: str, folder: Path, workers: int) -> tuple[Path, float | None]:
    """The system's dataset of ``folder`` (cached), and the seconds its writer took (None: cached)."""
    out = CACHE / f"{system}-{folder.name}"
    if (out / ".done").exists():
        return out, None
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    if system.startswith("fastload"):
        from fastload import convert
        convert(str(folder), out, format="beton", workers=workers, progress=False,
                shuffle_seed=None if system == "fastload-sorted" else 0)
    else:
        peer({"system": system, "phase": "write", "folder": str(folder), "out": str(out), "workers": workers})
    seconds = time.perf_counter() - t
    (out / ".done").touch()
    return out, seconds


RUN_TIMEOUT_S = 300  # a reading run that has not finished by then is recorded as hung (--run-timeout)


def _run(what: str, cmd: list[str], env: dict, timed: bool = True) -> dict:
    """A system's process and the JSON line it ends with. A failure, or a reading run that hangs
    (Mosaic at a small cache, seen), is a RuntimeError: a result, not the end of the run."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S if timed else None)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no result in {RUN_TIMEOUT_S:.0f} s (killed)") from None
    if r.returncode:
        raise RuntimeError(f"{what} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def peer(cfg: dict, env: dict | None = None) -> dict:
    if not PEERS_PY.exists():
        raise SystemExit(f"{PEERS_PY} is missing: run bash scripts/setup_streaming_peers.sh")
    return _run(f"{cfg['system']} {cfg['phase']}", [str(PEERS_PY), str(ROOT / "scripts" / "streaming_peers.py"),
                                                    json.dumps(cfg)],
                {**os.environ, **(env or {})}, timed=cfg["phase"] == "read")


def dataset_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and f.name != ".done")


def global_labels_per_batch(labels, batch_size: int, rounds: int = 20) -> float:
    """Mean distinct labels per batch of a global random permutation of ``labels``."""
    rng = np.random.default_rng(0)
    labels = np.asarray(labels)
    nb = len(labels) // batch_size
    return float(np.mean([len(np.unique(row)) for _ in range(rounds)
                          for row in labels[rng.permutation(len(labels))[:nb * batch_size]].reshape(nb, -1)]))


# --------------------------------------------------------------------------- fastload's reader
def fastload_child(cfg: dict) -> dict:
    """Runs in its own process: epochs of one FastLoader, as bench_remote's, with labels per batch."""
    import warnings

    from epoch_meter import measure_epoch

    from fastload import FastLoader
    from fastload.testing.store_proxy import store_bytes
    if os.environ.get("FASTLOAD_CACHE_LOG"):  # the cache's fetches and evictions, for a look at bytes
        import logging
        handler = logging.FileHandler(os.environ["FASTLOAD_CACHE_LOG"])
        handler.setFormatter(logging.Formatter("%(relativeCreated)d %(threadName)s %(message)s"))
        logging.getLogger("fastload.cache").addHandler(handler)
        logging.getLogger("fastload.cache").setLevel(logging.DEBUG)
    endpoint = cfg.get("endpoint")
    if endpoint:
        store_bytes(endpoint, clear=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = FastLoader(cfg["location"], "train", batch_size=cfg["batch_size"], spec="imagenet:train",
                            backend="ffcv", num_workers=cfg["workers"], distributed=False,
                            cache_dir=cfg.get("cache_dir"), cache_limit=cfg.get("cache_limit"),
                            epochs=cfg["epochs"] if cfg.get("epochs_known", True) else None)
    out = {"epochs": [], "order": loader.order, "warnings": [str(w.message) for w in caught]}
    for e in range(cfg["epochs"]):
        loader.set_epoch(e)
        out["epochs"].append(measure_epoch(loader, t0 if e == 0 else time.perf_counter(),
                                           (lambda: store_bytes(endpoint, clear=True)) if endpoint else None))
    return out


def fastload_run(cfg: dict, env: dict) -> dict:
    return _run("fastload", [sys.executable, __file__, "--child", json.dumps(cfg)], {**os.environ, **env})


# --------------------------------------------------------------------------- the run
def main():
    global RUN_TIMEOUT_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, default=20)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--caches", default="1.0,0.25", help="cache limits, as fractions of each dataset's bytes")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--pin", action="store_true",
                    help="the store's servers on CPU 1, every reader on CPU 0: a store on another machine, "
                         "emulated on 2 cores (the local baseline runs on CPU 0 too)")
    ap.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT_S, help="seconds a system's reading run may take")
    ap.add_argument("--epochs-unknown", action="store_true",
                    help="fastload not told the epoch count (FastLoader(epochs=None)), as a plain loop may not")
    ap.add_argument("--repeats", type=int, default=1,
                    help="fastload's (local, store) pairs per cache: the img/s target is their median ratio")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    RUN_TIMEOUT_S = args.run_timeout
    if args.child:
        print(json.dumps(fastload_child(json.loads(args.child))))
        return
    import s3fs
    from fastload.testing.store_proxy import StoreServers
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; allowed {SYSTEMS}")
    caches = [float(c) for c in args.caches.split(",")]
    folder = image_folder(args.tile)
    labels = [int(p.parent.name[1:]) for p in sorted((folder / "train").glob("*/*.JPEG"))]
    reference = global_labels_per_batch(labels, args.batch_size)
    datasets_ = {}
    for s in systems:
        d, seconds = write(s, folder, args.workers)
        datasets_[s] = {"dir": d, "bytes": dataset_bytes(d), "write_s": seconds}
        print(f"{s}: {datasets_[s]['bytes'] / 1e6:.0f} MB" + (f", written in {seconds:.1f} s" if seconds else ""),
              flush=True)
    cpus = os.sched_getaffinity(0)
    if args.pin:  # the servers inherit CPU 1; the readers, started later, CPU 0
        os.sched_setaffinity(0, {1})
    servers = StoreServers(latency_ms=0, server="s3rver")
    if args.pin:
        os.sched_setaffinity(0, {0})
    env = {**servers.env(), "AWS_ALLOW_HTTP": "true", "S3_ENDPOINT_URL": servers.endpoint}
    results = {"images": len(labels), "global_labels_per_batch": reference, "args": vars(args), "runs": []}
    try:
        os.environ.update(servers.env())
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        for s, d in datasets_.items():
            files = [f for f in d["dir"].rglob("*") if f.is_file() and f.name != ".done"]
            for f in files:
                fs.put_file(str(f), f"bench/{s}/{f.relative_to(d['dir'])}")
        servers.latency(args.latency_ms)
        base = {"batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs,
                "epochs_known": not args.epochs_unknown,
                "endpoint": servers.endpoint}
        for fraction in caches:
            for s in systems:
                for repeat in range(args.repeats if s == "fastload" else 1):
                    r = {"repeat": repeat}
                    if s == "fastload":  # its local pair, just before: the same machine's speed now
                        local = fastload_run({**base, "location": str(datasets_[s]["dir"]), "endpoint": None}, env)
                        # per epoch: the first includes the loader's start-up, on a local directory as from a store
                        r["local_img_s"] = [e["img_s"] for e in local["epochs"]]
                        print(f"fastload on the local directory: {per_epoch(r['local_img_s'])}", flush=True)
                    r.update(read(s, fraction, base, datasets_, env))
                    results["runs"].append(r)
                    print(row(r, reference), flush=True)
    finally:
        servers.close()
        os.sched_setaffinity(0, cpus)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def read(s: str, fraction: float, base: dict, datasets_: dict, env: dict) -> dict:
    """System ``s``'s reading run from the store, from an empty cache of ``fraction`` of its dataset."""
    cache_dir = CACHE / "node-cache" / s
    shutil.rmtree(cache_dir, ignore_errors=True)
    cfg = {**base, "cache_dir": str(cache_dir), "cache_limit": int(d_bytes(datasets_, s) * fraction)}
    try:
        if s.startswith("fastload"):
            r = fastload_run({**cfg, "location": f"s3://bench/{s}"}, env)
        else:
            r = peer({**cfg, "system": s, "phase": "read", "url": f"s3://bench/{s}"}, env)
    except RuntimeError as e:  # a system that fails at this cache is a result too
        last = [line for line in str(e).splitlines() if line.strip()][-1]
        r = {"epochs": [], "error": last[:300]}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    r.update(system=s, cache=fraction, dataset_bytes=d_bytes(datasets_, s))
    return r


def per_epoch(img_s: list[float]) -> str:
    return " / ".join(f"{x:,.0f}" for x in img_s) + " img/s per epoch"


def d_bytes(datasets_: dict, s: str) -> int:
    return datasets_[s]["bytes"]


def row(r: dict, reference: float) -> str:
    if r.get("error"):
        return f"| {r['system']} | {r['cache']:.0%} | failed: {r['error']} |"
    cells = []
    for e in r["epochs"]:
        cells.append(f"{e['img_s']:,.0f} img/s, {e['bytes'] / r['dataset_bytes']:.2f}x bytes, "
                     f"{e['labels_per_batch']:.1f} labels ({e['labels_per_batch'] / reference:.0%})")
    extra = f" [order={r['order']}]" if "order" in r else ""
    return (f"| {r['system']}{extra} | {r['cache']:.0%} | {r['epochs'][0]['first_batch_s']:.2f} s | "
            + " | ".join(cells) + " |")


def report(results: dict) -> None:
    ref = results["global_labels_per_batch"]
    print(f"\n{results['images']} images; a global permutation: {ref:.1f} distinct labels per batch")
    print("| system | cache | first batch | epoch 1 img/s | epoch 2 img/s | of local (its pair) | "
          "bytes / epoch (x dataset) | labels / batch (vs global) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        e = r["epochs"]
        name = (r["system"] + (f" ({r['order']})" if "order" in r else "")
                + (f" #{r['repeat'] + 1}" if r["repeat"] else ""))
        if r.get("error"):
            print(f"| {name} | {r['cache']:.0%} | failed: {r['error']} | | | | | |")
            continue
        of_local = " / ".join(f"{x:.0%}" for x in _of_local(r)) if "local_img_s" in r else ""
        print(f"| {name} | {r['cache']:.0%} | {e[0]['first_batch_s']:.2f} s | {e[0]['img_s']:,.0f} | "
              f"{e[-1]['img_s']:,.0f} | {of_local} | " + " / ".join(f"{x['bytes'] / r['dataset_bytes']:.2f}" for x in e)
              + f" | {e[-1]['labels_per_batch']:.1f} ({e[-1]['labels_per_batch'] / ref:.0%}) |")
    for cache in sorted({r["cache"] for r in results["runs"] if r["system"] == "fastload" and r["cache"] < 1}):
        ours = [r for r in results["runs"] if r["system"] == "fastload" and r["cache"] == cache and not r.get("error")]
        peers = [p for p in results["runs"] if p["cache"] == cache and p["system"].startswith(("litdata", "mosaic"))]
        print(f"\ntargets at a {cache:.0%} cache:")
        for text, ok in _checks(ours, peers, ref):
            print(f"  {'met' if ok else 'MISSED'}: {text}")


def _of_local(r: dict) -> list[float]:
    """Each epoch's img/s against the same epoch of the local run just before it."""
    return [x["img_s"] / loc for x, loc in zip(r["epochs"], r["local_img_s"])]


def _checks(ours: list[dict], peers: list[dict], ref: float) -> list[tuple[str, bool]]:
    """#22's targets over fastload's runs at one cache (their repeats: img/s and first batch by
    the median, bytes by the most, labels by the fewest), each said on its own with its figures."""
    if not ours:
        return [("fastload completed", False)]
    ratios = np.median([_of_local(r) for r in ours], axis=0)  # per epoch, the median pair
    spread = "" if len(ours) == 1 else " (median of {} pairs; per epoch {})".format(len(ours), ", ".join(
        f"{min(x):.0%}-{max(x):.0%}" for x in zip(*[_of_local(r) for r in ours])))
    img_s = float(np.median([min(x["img_s"] for x in r["epochs"]) for r in ours]))
    first = float(np.median([r["epochs"][0]["first_batch_s"] for r in ours]))
    labels = min(x["labels_per_batch"] for r in ours for x in r["epochs"])
    per_epoch_bytes = max(x["bytes"] / r["dataset_bytes"] for r in ours for x in r["epochs"])
    total_bytes = max(sum(x["bytes"] for x in r["epochs"]) / r["dataset_bytes"] for r in ours)
    epochs = len(ours[0]["epochs"])
    checks = [("img/s " + " / ".join(f"{x:.0%}" for x in ratios) + f" of local per epoch{spread} (>= 85%)",
               bool(min(ratios) >= 0.85)),
              (f"bytes {per_epoch_bytes:.2f}x of the dataset per epoch (<= 1.1x)", per_epoch_bytes <= 1.1),
              (f"labels/batch {labels / ref:.0%} of global (>= 90%)", labels >= 0.9 * ref)]
    for p in peers:
        pe = p["epochs"]
        if p.get("error"):  # a peer that fails at this cache: fastload, which completes, is ahead
            checks.append((f"ahead of {p['system']} (which failed: {p['error'][:80]})", True))
            continue
        theirs = sum(x["bytes"] for x in pe) / p["dataset_bytes"]
        for what, ok, figures in (  # each criterion said on its own: which one is missed, with its figures
                ("img/s", img_s > max(x["img_s"] for x in pe), f"{img_s:.0f} vs {max(x['img_s'] for x in pe):.0f}"),
                ("first batch", first < pe[0]["first_batch_s"], f"{first:.2f} vs {pe[0]['first_batch_s']:.2f} s"),
                ("labels/batch", labels > max(x["labels_per_batch"] for x in pe),
                 f"{labels:.1f} vs {max(x['labels_per_batch'] for x in pe):.1f}"),
                ("bytes", total_bytes <= theirs,
                 f"{total_bytes:.2f} vs {theirs:.2f}x the dataset over {epochs} epochs")):
            checks.append((f"ahead of {p['system']} on {what} ({figures})", ok))
    return checks


if __name__ == "__main__":
    main()
