"""Run under torchrun by test_loader.py: each rank records what FastLoader gives it."""
import json
import sys

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
    with open(f"{out}.{loader.rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
