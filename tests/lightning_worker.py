"""One Lightning job for test_lightning.py's elastic resume: a Trainer on as many CPU devices as
torchrun gives it (one without torchrun), fitting FastDataModule for one epoch.

    [torchrun --nproc_per_node W] python tests/lightning_worker.py DATASET OUT BATCH [CKPT]

BATCH is the per-rank batch (the global batch / W). A checkpoint is saved every 3 steps to
OUT/ckpt; with CKPT the fit resumes from it. Each rank writes the sample indices of each of its
training steps to OUT/rank<R>.json.
"""
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from fastload.lightning import FastDataModule


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 10)
        self.steps: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.steps.append(batch.index.tolist())
        return torch.nn.functional.cross_entropy(self.net(batch.images.float().mean((2, 3))), batch.labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(data, out, batch, ckpt=None):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    every = pl.callbacks.ModelCheckpoint(dirpath=Path(out) / "ckpt", every_n_train_steps=3, save_top_k=-1,
                                         filename="{step}")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[every],
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out)
    model = Recorder()
    dm = FastDataModule(data, batch_size=batch, num_workers=1, seed=11, columns="index", val_split=None)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(model.steps))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
