"""The reference backend: PIL + torch ``DataLoader``, torchvision's semantics spelled out.

This is the ground truth the other backends are tested against, and the baseline a
user would otherwise run. It reads the same dataset directory (either storage) through
the records index, and applies each sample's geometry row with PIL:
RandomResizedCrop = ``crop`` then ``resize(BILINEAR)``; Resize+CenterCrop = ``resize``
then ``crop``; RandomCrop = pad then crop; the flip mirrors the final window.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from PIL import Image

from fastload.spec import RandomCrop

from .sampling import FLIP, H, LEFT, OUT_H, OUT_W, TOP, W, X0, Y0

_NP_PAD = {"constant": "constant", "edge": "edge", "reflect": "reflect"}


def apply_geometry(image: Image.Image, p: np.ndarray, size: tuple[int, int], padding_mode: str = "constant") -> np.ndarray:
    """One sample's geometry row applied with PIL; returns HWC uint8."""
    th, tw = size
    y0, x0, h, w = int(p[Y0]), int(p[X0]), int(p[H]), int(p[W])
    out_h, out_w, top, left = int(p[OUT_H]), int(p[OUT_W]), int(p[TOP]), int(p[LEFT])
    if (y0, x0, h, w) != (0, 0, image.height, image.width):
        image = image.crop((x0, y0, x0 + w, y0 + h))
    if (out_h, out_w) != (h, w):
        image = image.resize((out_w, out_h), Image.BILINEAR)
    if 0 <= top and 0 <= left and top + th <= out_h and left + tw <= out_w:
        window = np.asarray(image.crop((left, top, left + tw, top + th)))
    else:  # RandomCrop's padding
        arr = np.asarray(image)
        pad = max(-top, -left, top + th - out_h, left + tw - out_w)
        padded = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode=_NP_PAD[padding_mode])
        window = padded[top + pad:top + pad + th, left + pad:left + pad + tw]
    # RandomHorizontalFlip comes after the geometry, as in torchvision's pipelines
    return np.ascontiguousarray(window[:, ::-1]) if p[FLIP] else window


class _EpochDataset(torch.utils.data.Dataset):
    def __init__(self, reader, params, size, padding_mode):
        self.reader, self.params, self.size, self.padding_mode = reader, params, size, padding_mode

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        image = self.reader.image(i)
        return torch.from_numpy(apply_geometry(image, self.params[i], self.size, self.padding_mode).copy()), i


class ReferencePipeline:
    name = "reference"

    def __init__(self, reader, spec, batch_size: int, num_workers: int, drop_last: bool):
        self.reader = reader
        self.spec = spec
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.padding_mode = spec.geometry.padding_mode if isinstance(spec.geometry, RandomCrop) else "constant"

    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        loader = torch.utils.data.DataLoader(
            _EpochDataset(self.reader, params, self.spec.size, self.padding_mode), batch_sampler=batches,
            num_workers=self.num_workers, persistent_workers=False,
            multiprocessing_context="fork" if self.num_workers > 0 else None)
        for images, index in loader:
            yield images, index.numpy()
