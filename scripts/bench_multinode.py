#!/usr/bin/env python
"""Two nodes of two ranks reading one remote dataset, each node through its own cache (#22, item 4).

    bash scripts/setup_streaming_peers.sh     # once: the s3rver server (and bench_streaming's data)
    .venv/bin/python scripts/bench_multinode.py [--tile 20] [--cache 0.25] [--latency-ms 20] [--epochs 2]

The data: bench_streaming.py's (the ImageNet sample tiled ``--tile`` times as a class-sorted image
folder, converted with the defaults: a seeded random write order), on s3rver behind one proxy per node
(fastload.testing.store_proxy), which adds ``--latency-ms`` to every request and counts that node's bytes.
Two ``torchrun --nnodes 2 --node_rank 0/1 --nproc_per_node 2`` on a local rendezvous; each node's
cache is limited to ``--cache`` of the dataset (a node's share is half of it: at 0.25 the share
does not fit), train spec, per-rank batch 64 (global 256), a barrier per step as DDP's all-reduce.

Reported per node and epoch: bytes from the store against the node's share (target: at most
1.1x), and whether the ranks' samples were disjoint and complete. All four ranks share 2 cores
here, so the img/s it prints says nothing about a real node's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rank_main(url: str, out: str, limit: int, epochs: int) -> None:
    """One rank under torchrun: its indices per epoch, and (local rank 0) its node's bytes."""
    import torch.distributed as dist

    from fastload.testing.store_proxy import store_bytes

    from fastload import FastLoader
    dist.init_process_group("gloo")
    loader = FastLoader(url, "train", batch_size=64, backend="ffcv", num_workers=1, spec="imagenet:train",
                        columns=("index",), cache_limit=limit)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    if os.environ["LOCAL_RANK"] == "0":
        store_bytes(endpoint, clear=True)
    report = {"order": loader.order, "window_units": loader.window_units, "epochs": []}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t, seen = time.perf_counter(), []
        for _, _, index in loader:
            seen += index.tolist()
            dist.barrier()
        dist.barrier()  # every rank of both nodes done: the node's bytes are the epoch's
        node_bytes = store_bytes(endpoint, clear=True) if os.environ["LOCAL_RANK"] == "0" else None
        report["epochs"].append({"indices": seen, "seconds": time.perf_counter() - t, "node_bytes": node_bytes})
        dist.barrier()
    Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, default=20)
    ap.add_argument("--cache", type=float, default=0.25, help="each node's cache limit, as a fraction of the dataset")
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.rank:
        url, out, limit, epochs = args.rank
        rank_main(url, out, int(limit), int(epochs))
        return
    import s3fs
    from bench_streaming import CACHE, dataset_bytes, image_folder, write
    from fastload.testing.launch import torchrun
    from fastload.testing.store_proxy import StoreServers, free_port
    folder = image_folder(args.tile)
    data, _ = write("fastload", folder, workers=2)
    size = dataset_bytes(data)
    store = StoreServers(latency_ms=0, server="s3rver")
    nodes = [store, StoreServers(moto_port=store.moto_port, latency_ms=args.latency_ms)]  # node 1's own view
    nodes[1].credentials = store.credentials
    store.latency(args.latency_ms)
    out = CACHE / "multinode"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        os.environ.update(store.env())
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("multi")
        for f in data.rglob("*"):
            if f.is_file() and f.name != ".done":
                fs.put_file(str(f), f"multi/d/{f.relative_to(data)}")
        port, procs = free_port(), []
        for node, view in enumerate(nodes):
            env = {**os.environ, **view.env(), "FASTLOAD_CACHE_DIR": str(out / f"cache{node}")}
            procs.append(subprocess.Popen([*torchrun(2, nnodes=2, node_rank=node, port=port), __file__, "--rank",
                                           "s3://multi/d", str(out), str(int(size * args.cache)), str(args.epochs)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=1800)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit("a node failed:\n" + "\n".join(log[-3000:] for log in logs))
    finally:
        for n in nodes[::-1]:
            n.close()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    share = size / 2
    print(f"{size / 1e6:.0f} MB dataset, each node's share {share / 1e6:.0f} MB, cache {args.cache:.0%} of the "
          f"dataset ({args.cache * 2:.0%} of a share); order {ranks[0]['order']}, window {ranks[0]['window_units']} "
          f"units")
    results = []
    for e in range(args.epochs):
        seen = [i for r in ranks for i in r["epochs"][e]["indices"]]
        complete = len(seen) == len(set(seen))
        per_node = [ranks[2 * n]["epochs"][e]["node_bytes"] / share for n in range(2)]
        results.append({"epoch": e, "node_bytes_x_share": per_node, "disjoint": complete, "samples": len(seen),
                        "seconds": max(r["epochs"][e]["seconds"] for r in ranks)})
        print(f"epoch {e}: node bytes {per_node[0]:.2f}x / {per_node[1]:.2f}x their share (target <= 1.1x); "
              f"{len(seen)} samples, {'disjoint' if complete else 'NOT disjoint'}; "
              f"{results[-1]['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "dataset_bytes": size, "epochs": results}))


if __name__ == "__main__":
    main()
