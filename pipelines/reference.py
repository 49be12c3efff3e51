"""The reference backend: PIL + torch ``DataLoader``, torchvision's semantics spelled out.

This is the ground truth the other backends are tested against, and the baseline a
user would otherwise run. It reads the same dataset directory (either storage) through
the records index, and applies each sample's geometry row with PIL:
RandomResizedCrop = ``crop`` then ``resize(filter)``; Resize+CenterCrop = ``resize``
then ``crop``; RandomCrop = pad then crop; the flip mirrors the final window.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from PIL import Image

from fastload.formats.manifest import DatasetError
from fastload.spec import DEFAULT_INTERPOLATION, RandomCrop

from .base import Backend, BackendOptions
from .samples import SampleChecks
from .sampling import FLIP, H, LEFT, OUT_H, OUT_W, TOP, W, X0, Y0, num_batches, plan_batches


PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
               "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def apply_geometry(image: Image.Image, p: np.ndarray, size: tuple[int, int], padding_mode: str = "constant",
                   interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """One sample's geometry row applied with PIL; returns HWC uint8."""
    th, tw = size
    y0, x0, h, w = int(p[Y0]), int(p[X0]), int(p[H]), int(p[W])
    out_h, out_w, top, left = int(p[OUT_H]), int(p[OUT_W]), int(p[TOP]), int(p[LEFT])
    if (y0, x0, h, w) != (0, 0, image.height, image.width):
        image = image.crop((x0, y0, x0 + w, y0 + h))
    if (out_h, out_w) != (h, w):
        image = image.resize((out_w, out_h), PIL_FILTERS[interpolation])
    if 0 <= top and 0 <= left and top + th <= out_h and left + tw <= out_w:
        window = np.array(image.crop((left, top, left + tw, top + th)))  # writable, for torch
    else:  # RandomCrop's padding (numpy's mode names are the spec's)
        arr = np.asarray(image)
        pad = max(-top, -left, top + th - out_h, left + tw - out_w)
        padded = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode=padding_mode)
        window = padded[top + pad:top + pad + th, left + pad:left + pad + tw]
    # RandomHorizontalFlip comes after the geometry, as in torchvision's pipelines
    return np.ascontiguousarray(window[:, ::-1]) if p[FLIP] else window


class _SampleDataset(torch.utils.data.Dataset):
    """Keys are (sample index, geometry row): the epoch's parameters travel with the batch
    sampler, so persistent workers serve every epoch."""

    def __init__(self, reader, size, padding_mode, interpolation, checks):
        self.reader, self.size, self.padding_mode, self.interpolation = reader, size, padding_mode, interpolation
        self.checks = checks

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, key):
        i, row = key
        try:  # the sample's bytes copied out and checked, as every backend checks them before decoding
            image = self.reader.image(i, self.checks.read_checked(i))
        except DatasetError as e:  # handed back as data: a DataLoader worker would rewrap its message
            return e, i
        return torch.from_numpy(apply_geometry(image, row, self.size, self.padding_mode, self.interpolation)), i


def _collate(samples):
    """The default collate, or a batch's first sample error, raised as it is in the main process."""
    for sample, _ in samples:
        if isinstance(sample, DatasetError):
            return sample
    return torch.utils.data.default_collate(samples)


class _EpochBatches:
    """The batch sampler: this epoch's batches of (index, geometry row) keys."""

    def __init__(self, batch_size, drop_last):
        self.batch_size, self.drop_last = batch_size, drop_last
        self.order, self.params = np.zeros(0, np.int64), None

    def __len__(self):
        return num_batches(len(self.order), self.batch_size, self.drop_last)

    def __iter__(self):
        for idx, rows in plan_batches(self.order, self.params, self.batch_size, self.drop_last):
            yield [(int(i), row) for i, row in zip(idx, rows)]


class ReferenceBackend(Backend):
    """PIL in ``torch.utils.data.DataLoader`` workers. The loader's workers persist across
    epochs; an epoch that starts while another is live (a second iterator) gets a DataLoader of
    its own, so each gets its full epoch."""
    name = "reference"
    interpolations = tuple(PIL_FILTERS)

    def __init__(self, reader, spec, options: BackendOptions):
        super().__init__(reader, spec, options)
        padding_mode = spec.geometry.padding_mode if isinstance(spec.geometry, RandomCrop) else "constant"
        self.dataset = _SampleDataset(reader, spec.size, padding_mode, spec.interpolation,
                                      SampleChecks(reader, options.check_samples))
        self.batches = _EpochBatches(options.batch_size, options.drop_last)
        self.loader = self._data_loader(self.batches, persistent=True)
        self._live = 0  # epochs of self.loader in progress

    def _data_loader(self, batches: _EpochBatches, persistent: bool) -> torch.utils.data.DataLoader:
        workers = self.options.num_workers
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=workers,
                                           collate_fn=_collate, persistent_workers=persistent and workers > 0,
                                           multiprocessing_context="fork" if workers > 0 else None)

    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        if self._live:  # the persistent loader serves another epoch: this one gets its own
            batches = _EpochBatches(self.options.batch_size, self.options.drop_last)
            batches.order, batches.params = order, params
            yield from _batches(self._data_loader(batches, persistent=False))
            return
        self._live += 1
        try:
            self.batches.order, self.batches.params = order, params
            yield from _batches(self.loader)
        finally:
            self._live -= 1


def _batches(loader):
    for batch in loader:
        if isinstance(batch, DatasetError):
            # not `raise batch`: the exception would hold this frame (its traceback) and the frame
            # the exception (a local): a cycle that keeps the DataLoader, and its worker processes,
            # until a garbage collection, which then stalls 5 s a worker shutting them down
            error, batch = batch, None
            try:
                raise error
            finally:
                del error
        images, index = batch
        yield images, index.numpy()
