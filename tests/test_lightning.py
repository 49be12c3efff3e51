"""FastDataModule under a real Lightning Trainer: one epoch on the CIFAR sample, then a resume
from a mid-epoch checkpoint that sees exactly the batches the uninterrupted run saw."""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, needs_shared, torchrun

pl = pytest.importorskip("lightning.pytorch")
from fastload.lightning import FastDataModule  # noqa: E402

BATCH = 64  # 1,600 training images: 25 batches an epoch


class TinyNet(pl.LightningModule):
    """A small CNN that records what each training step was given."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        self.seen: list[tuple[list[int], float]] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        self.seen.append((batch.index.tolist(), float(batch.images.double().sum())))
        return torch.nn.functional.cross_entropy(self.net(batch.images), batch.labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.val_batches += 1
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(images), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _trainer(root, **kw):
    kw.setdefault("logger", False)
    return pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, **kw)


@needs_shared
def test_fit_one_epoch_and_resume_mid_epoch(cifar_dirs, tmp_path):
    def datamodule():
        return FastDataModule(cifar_dirs["beton"], batch_size=BATCH, num_workers=2, seed=5, columns="index")

    dm = datamodule()
    assert (dm.train_split, dm.val_split, dm.train_spec, dm.val_spec) == ("train", "test", "cifar10:train",
                                                                         "cifar10:eval")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1,
                                        filename="{step}")
    full = TinyNet()
    logger = pl.loggers.CSVLogger(tmp_path / "logs", name="run")
    _trainer(tmp_path, callbacks=[ckpt], logger=logger).fit(full, datamodule=dm)
    assert len(full.seen) == 25 and full.val_batches == 7  # 400 test images, batches of 64
    # the loader's figures, where Lightning users look: the trainer's logger
    import csv
    rows = [r for r in csv.DictReader(open(logger.log_dir + "/metrics.csv")) if r.get("data/wait_fraction")]
    assert len(rows) == 1 and 0 <= float(rows[0]["data/wait_fraction"]) <= 1 and float(rows[0]["data/img_per_s"]) > 0
    seen = sorted(i for idx, _ in full.seen for i in idx)
    assert seen == list(range(1600))  # every training sample exactly once in the epoch

    mid = tmp_path / "ckpt" / "step=10.ckpt"
    state = torch.load(mid, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["batches_done"] == 10 and state[0]["epoch"] == 0

    resumed = TinyNet()
    _trainer(tmp_path / "again").fit(resumed, datamodule=datamodule(), ckpt_path=mid)
    assert resumed.seen == full.seen[10:]  # the same samples, the same pixels, no batch skipped or repeated
    for a, b in zip(full.parameters(), resumed.parameters()):  # and so the same model at the end
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_datamodule_errors(labelled_colors, tmp_path):
    with pytest.raises(ValueError, match=r"val_split='valid' is not in .*: it has \['train'\]"):
        FastDataModule(labelled_colors["beton"], val_split="valid")
    with pytest.raises(ValueError, match=r"train_split='training' is not in"):
        FastDataModule(labelled_colors["beton"], train_split="training")
    dm = FastDataModule(labelled_colors["beton"], batch_size=16)
    assert dm.val_split is None and dm.val_dataloader() == []
    assert len(dm.train_dataloader()) == 7  # drop_last: 120 images


def _lightning_job(*args, nproc: int = 1) -> subprocess.CompletedProcess:
    worker = [str(ROOT / "tests" / "lightning_worker.py"), *map(str, args)]
    cmd = [sys.executable, *worker] if nproc == 1 else [*torchrun(nproc), *worker]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@needs_shared
def test_a_checkpoint_of_two_ddp_ranks_resumes_on_one_device(cifar_dirs, tmp_path):
    """Elastic resume under Lightning (#22): a mid-epoch checkpoint of a 2-rank DDP fit (torchrun,
    16 a rank) resumes on 1 device with the same global batch (32): the rest of the epoch, each
    sample once; a changed global batch is refused by name."""
    two, one = tmp_path / "two", tmp_path / "one"
    r = _lightning_job(cifar_dirs["beton"], two, 16, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((two / f"rank{k}.json").read_text()) for k in range(2)]
    assert [len(s) for s in ranks] == [50, 50]  # 1,600 training images, 32 a step
    consumed = [i for s in ranks for step in s[:3] for i in step]  # the checkpoint at step 3
    with concurrent.futures.ThreadPoolExecutor(2) as both:  # the resume, and a refused one, side by side
        resumed = both.submit(_lightning_job, cifar_dirs["beton"], one, 32, two / "ckpt" / "step=3.ckpt")
        refused = both.submit(_lightning_job, cifar_dirs["beton"], tmp_path / "bad", 16, two / "ckpt" / "step=3.ckpt")
        r, bad = resumed.result(), refused.result()
    assert r.returncode == 0, r.stderr[-3000:]
    rest = json.loads((one / "rank0.json").read_text())
    assert all(len(step) == 32 for step in rest) and len(rest) == 47
    assert sorted(consumed + [i for step in rest for i in step]) == list(range(1600))
    assert bad.returncode != 0 and "global batch size is 16 x 2 ranks, this loader's 16 x 1" in bad.stderr
