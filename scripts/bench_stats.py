#!/usr/bin/env python
"""What FastLoader.stats() costs: the meter (fastload/stats.py) around a generator of ready
batches, against the bare generator, per batch; and per epoch, its CPU and store readings.

    .venv/bin/python scripts/bench_stats.py [--batches 200000]
"""
from __future__ import annotations

import argparse
import time

import torch

from fastload.stats import LoopMeter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=200_000)
    args = ap.parse_args()
    batch = (torch.zeros(1), torch.zeros(256))

    def ready():
        for _ in range(args.batches):
            yield batch
    best = {}
    for name in ("bare", "metered", "bare", "metered"):
        t = time.perf_counter()
        if name == "bare":
            for _ in ready():
                pass
        else:
            meter = LoopMeter(num_workers=1)
            for _ in meter.metered(ready(), 0, lambda: (0, 0.0), args.batches):
                pass
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    per_batch = (best["metered"] - best["bare"]) / args.batches
    t = time.perf_counter()
    meter = LoopMeter(num_workers=1)
    for _ in meter.metered(iter([batch]), 0, lambda: (0, 0.0), 1):
        pass
    per_epoch = time.perf_counter() - t
    print(f"the meter: {per_batch * 1e6:.2f} us a batch ({args.batches:,} batches), {per_epoch * 1e3:.2f} ms an epoch "
          "(CPU and store readings, the verdict)")


if __name__ == "__main__":
    main()
