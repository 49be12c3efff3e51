"""One rank of a multi-node torchrun job reading remote datasets (test_remote.py): for each
``URL LIMIT`` pair after ``OUT`` (one job, several cases: a launch costs seconds), in turn, it writes
the sample indices it was given, in order, to ``<OUT>/<case>-rank<R>.json``, each case with a cache
of its own under ``$FASTLOAD_CACHE_DIR``. A barrier per step keeps the ranks in step, as a DDP job's
gradient all-reduce does."""
import json
import os
import sys

from fastload import FastLoader

import logging

import torch.distributed as dist

if os.environ.get("FASTLOAD_CACHE_LOG"):
    logging.basicConfig(filename=os.environ["FASTLOAD_CACHE_LOG"] + os.environ["RANK"], level=logging.DEBUG,
                        format="%(relativeCreated)d %(message)s")

out, cases = sys.argv[1], sys.argv[2:]
dist.init_process_group("gloo")
for case in range(len(cases) // 2):
    url, limit = cases[2 * case], int(cases[2 * case + 1])
    loader = FastLoader(url, "train", batch_size=8, backend="reference", num_workers=0, spec="imagenet:eval",
                        columns=("index",), drop_last=False, cache_limit=limit or None,
                        cache_dir=os.path.join(os.environ["FASTLOAD_CACHE_DIR"], str(case)))
    seen = []
    for _, _, index in loader:
        seen += index.tolist()
        dist.barrier()
    with open(os.path.join(out, f"{case}-rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"indices": seen, "order": loader.order, "node": os.environ["GROUP_RANK"]}, f)
    del loader  # its prefetch stops with it
    dist.barrier()
dist.destroy_process_group()
