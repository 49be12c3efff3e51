"""Extra per-sample columns a loader returns beside images and labels, on request.

Available: ``index`` (the sample's index in the split), ``source_index`` (its row in the source
dataset), and every extra label column kept at conversion (e.g. cifar100's ``coarse_label``),
all read from the records index. Under MixUp/CutMix they stay those of the sample whose
image the slot holds.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import torch

from .formats.records import RECORD_FIELDS

_FIXED = {name for name, *_ in RECORD_FIELDS} | {"label"}


def available_columns(reader) -> list[str]:
    extra = [name for name in reader.records.dtype.names if name not in _FIXED]
    return ["index", "source_index", *extra]


class ExtraColumns:
    """Builds each batch: ``(images, labels)``, or a named tuple ``Batch(images, labels, *columns)``."""

    def __init__(self, reader, columns):
        if isinstance(columns, str):
            columns = (columns,)
        self.names = tuple(columns)
        allowed = available_columns(reader)
        unknown = [c for c in self.names if c not in allowed]
        if unknown or len(set(self.names)) != len(self.names):
            problem = f"{unknown} not stored" if unknown else "a name repeated"
            raise ValueError(f"columns={list(self.names)} is invalid ({problem}): allowed any of {allowed}")
        self.reader = reader
        self.Batch = namedtuple("Batch", ("images", "labels", *self.names)) if self.names else None

    def batch(self, images: torch.Tensor, labels: torch.Tensor, index: np.ndarray):
        if self.Batch is None:
            return images, labels
        index = np.asarray(index, np.int64)
        values = []
        for name in self.names:
            col = index if name == "index" else np.asarray(self.reader.records[name])[index]
            values.append(torch.from_numpy(np.ascontiguousarray(col, np.int64)).to(labels.device))
        return self.Batch(images, labels, *values)
