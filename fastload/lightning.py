"""Lightning: :class:`FastDataModule`, a ``LightningDataModule`` whose loaders are FastLoaders.

Needs the optional extra: ``pip install 'fastload[lightning]'``. Resume needs nothing more:
Lightning saves each train loader's ``state_dict()`` in its checkpoints (FastLoader speaks the
``StatefulDataLoader`` protocol) and restores it on ``fit(ckpt_path=...)``, so a run resumed from
a mid-epoch checkpoint continues with the batch that would have come next. Under DDP each
process's loader shards by rank and yields on the process's own device.
"""
from __future__ import annotations

import logging

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package has the same API
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError("fastload.lightning needs Lightning: pip install 'fastload[lightning]'") from None

from .loader import FastLoader
from .storage import open_dataset

VAL_SPLITS = ("validation", "val", "test")
log = logging.getLogger("fastload")


class TrainerEpochLoader(FastLoader):
    """A FastLoader whose epoch is the trainer's: Lightning calls ``set_epoch`` only on a
    DataLoader's sampler, and an epoch cut short (``limit_train_batches``) must still move on.
    On a resume the trainer's epoch is the checkpoint's, whose resume point ``set_epoch`` keeps."""

    def __init__(self, *args, trainer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.trainer = trainer

    def __iter__(self):
        self.log_stats()  # the epoch before (Lightning takes len(loader) batches and does not ask again)
        if self.trainer is not None:
            self.set_epoch(self.trainer.current_epoch)
        return super().__iter__()

    def log_stats(self) -> None:
        """The last epoch's figures through the trainer's logger (``data/wait_fraction``, ``data/img_per_s``...),
        where users look for everything else, once; the verdict line as fastload's log record."""
        s, logger = self.stats(), getattr(self.trainer, "logger", None)
        if s is None or not s.done or getattr(self, "_logged", None) is s:
            return
        self._logged = s
        log.info("epoch %d: %s", s.epoch, s.verdict)
        if logger is not None:
            logger.log_metrics({"data/wait_fraction": s.wait_fraction, "data/img_per_s": s.images_per_s,
                                "data/wait_s": s.wait_s, "data/step_s": s.step_s, "data/store_wait_s": s.store_wait_s,
                                "data/store_mb": s.store_bytes / 2**20, "epoch": s.epoch},
                               step=self.trainer.global_step)


class FastDataModule(pl.LightningDataModule):
    """Train and validation FastLoaders over one fastload dataset directory.

    >>> dm = FastDataModule("data/imagenet", batch_size=256, num_workers=8)   # doctest: +SKIP
    >>> trainer.fit(model, datamodule=dm, ckpt_path="last")                      # doctest: +SKIP

    ``val_split='auto'`` picks the first of 'validation', 'val', 'test' the dataset has (None: no
    validation). Specs default to the dataset's preset, train variant for training and eval for
    validation. ``device=None`` follows the trainer (its root device). Other keyword arguments
    (``repeated_augmentation``, ``indices``, ``columns``, ``batch_transform``, ``seed``...) go to
    the train loader.
    """

    def __init__(self, path, batch_size: int = 256, *, train_split: str = "train", val_split: str | None = "auto",
                 val_batch_size: int | None = None, train_spec=None, val_spec=None, backend: str = "auto",
                 num_workers: int | None = None, device=None, **train_options):
        super().__init__()
        # a wrong path fails here, not inside trainer.fit; a URL's cache options serve both loaders
        self.cache = {k: train_options[k] for k in ("cache_dir", "cache_limit") if k in train_options}
        self.manifest = open_dataset(path, **self.cache)
        self.path, self.batch_size = path, batch_size
        self.val_batch_size = val_batch_size or batch_size
        splits = self.manifest.split_names
        if train_split not in splits:
            raise ValueError(f"train_split={train_split!r} is not in {path}: it has {splits}")
        if val_split == "auto":
            val_split = next((s for s in VAL_SPLITS if s in splits), None)
        elif val_split is not None and val_split not in splits:
            raise ValueError(f"val_split={val_split!r} is not in {path}: it has {splits}")
        self.train_split, self.val_split = train_split, val_split
        preset = self.manifest.preset
        self.train_spec = train_spec if train_spec is not None else f"{preset}:train"
        self.val_spec = val_spec if val_spec is not None else f"{preset}:eval"
        self.backend, self.num_workers, self.device = backend, num_workers, device
        self.train_options = train_options

    def _device(self):
        if self.device is not None:
            return self.device
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else "cpu"

    def train_dataloader(self) -> FastLoader:
        trainer = getattr(self, "trainer", None)
        # the trainer's last epoch (-1: no limit): a remote dataset's loader fetches no epoch after it
        last = getattr(trainer, "max_epochs", None)
        options = {"epochs": last if isinstance(last, int) and last > 0 else None, **self.train_options}
        self._train_loader = TrainerEpochLoader(
            self.path, self.train_split, batch_size=self.batch_size, spec=self.train_spec, backend=self.backend,
            device=self._device(), num_workers=self.num_workers, drop_last=True, trainer=trainer, **options)
        return self._train_loader

    def teardown(self, stage: str) -> None:
        """The last epoch's figures, logged as the others were (fastload/stats.py)."""
        loader = getattr(self, "_train_loader", None)
        if loader is not None:
            loader.log_stats()

    def val_dataloader(self):
        if self.val_split is None:
            return []
        return FastLoader(self.path, self.val_split, batch_size=self.val_batch_size, spec=self.val_spec,
                          backend=self.backend, device=self._device(), num_workers=self.num_workers,
                          order="sequential", drop_last=False, **self.cache)
