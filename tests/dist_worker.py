"""Run under torchrun by test_loader.py: each rank records what FastLoader gives it."""
import json
import sys
import time

import torch.distributed as dist

from fastload import FastLoader


def main(path, backend, out):
    dist.init_process_group("gloo")
    loader = FastLoader(path, "train", batch_size=16, spec="imagenet:train", backend=backend, num_workers=1,
                        drop_last=False, seed=3)
    result = {"rank": loader.rank, "world": loader.world_size, "len": len(loader)}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        order, _ = loader.epoch_plan()
        labels = [int(v) for _, y in loader for v in y]
        result[f"epoch{epoch}"] = {"order": order.tolist(), "labels": labels}
    # a slow rank (test_stats.py): rank 1's loader works 50 ms more per batch than rank 0's
    if loader.rank == 1:
        loader.batch_transform = lambda x, y: (time.sleep(0.05), (x, y))[1]
    loader.set_epoch(2)
    for _ in loader:
        time.sleep(0.005)  # the model's step
    result["stats"] = loader.stats().to_dict()
    with open(f"{out}.{loader.rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
