"""One rank of a multi-node torchrun job reading a remote dataset (test_remote.py): it writes the
sample indices it was given, in order, to ``<out>/rank<R>.json``. A barrier per step keeps the
ranks in step, as a DDP job's gradient all-reduce does."""
import json
import os
import sys

from fastload import FastLoader

import logging

import torch.distributed as dist

if os.environ.get("FASTLOAD_CACHE_LOG"):
    logging.basicConfig(filename=os.environ["FASTLOAD_CACHE_LOG"] + os.environ["RANK"], level=logging.DEBUG,
                        format="%(relativeCreated)d %(message)s")

url, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
dist.init_process_group("gloo")
loader = FastLoader(url, "train", batch_size=8, backend="reference", num_workers=0, spec="imagenet:eval",
                    columns=("index",), drop_last=False, cache_limit=limit or None)
seen = []
for _, _, index in loader:
    seen += index.tolist()
    dist.barrier()
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"indices": seen, "order": loader.order, "node": os.environ["GROUP_RANK"]}, f)
dist.destroy_process_group()
