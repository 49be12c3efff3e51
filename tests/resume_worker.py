"""A training loop that checkpoints its FastLoader after every step (for the kill -9 resume tests).

    python tests/resume_worker.py DATASET BACKEND OUT_DIR EPOCHS

After each batch it writes, atomically, one file holding the loader's ``state_dict()`` and
what the loop has consumed so far (per-sample checksums and labels): a kill at any point
leaves a consistent checkpoint, as a real job's checkpoint of model + loader would be.
Under torchrun each rank keeps its own file.
"""
import json
import os
import sys
import time
from pathlib import Path

from fastload import FastLoader, PreprocessSpec
from fastload.spec import ColorJitter


def main(path, backend, out, epochs):
    rank = int(os.environ.get("RANK", 0))
    checkpoint = Path(out) / f"rank{rank}.json"
    spec = PreprocessSpec.preset("imagenet", train=True).replace(color_jitter=ColorJitter(0.4, 0.4, 0.4, 0.1))
    loader = FastLoader(path, "train", batch_size=16, spec=spec, backend=backend, num_workers=2, seed=3,
                        drop_last=False)
    record = {"loader": None, "batches": []}
    if checkpoint.exists():
        record = json.loads(checkpoint.read_text())
        loader.load_state_dict(record["loader"])
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:
            record["batches"].append({"epoch": epoch, "sums": images.double().flatten(1).sum(1).tolist(),
                                      "labels": labels.tolist()})
            record["loader"] = loader.state_dict()
            tmp = checkpoint.with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, checkpoint)
            time.sleep(0.05)  # the "training step"


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
