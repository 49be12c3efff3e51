"""The backend contract: what FastLoader, ``fastload bench`` and the CLI may ask of a backend.

A backend turns (this epoch's sample order, per-sample geometry rows) into batches of
``(images, sample indices)``. It owns decode and geometry (crop, resize, flip, padding) and,
when it declares ``fuses_normalization``, normalization too; everything after that (labels,
augmentations, MixUp/CutMix, dtype, device) is the shared batch ops' job. Batching follows
:func:`~fastload.pipelines.sampling.epoch_batches`, so ``len(loader)`` is the same for all.

Add a backend: subclass :class:`Backend` in ``pipelines/<name>.py`` and add one line to
:mod:`fastload.pipelines.registry` (or call ``register_backend`` from your own code).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np
import torch

from .sampling import whole_image_rows


@dataclass(frozen=True)
class BackendOptions:
    batch_size: int
    num_workers: int
    drop_last: bool
    device: torch.device
    seed: int = 0
    # None: yield uint8 NHWC. (scale[3], shift[3]): a backend that fuses normalization yields
    # float32 ``level * scale - shift``, NCHW when the spec's layout is NCHW, else NHWC.
    normalize: tuple[np.ndarray, np.ndarray] | None = None
    # the device was 'auto': a backend whose GPU path cannot start may decode on CPU (with a warning)
    fallback_to_cpu: bool = False
    # each sample's bytes checked as read (samples.py: CRC32C, JPEG structure) before any decoder sees them
    check_samples: bool = True

    def on_cpu(self) -> "BackendOptions":
        return dataclasses.replace(self, device=torch.device("cpu"), fallback_to_cpu=False)


class Backend(ABC):
    """One decode + geometry engine over one split of a dataset directory."""

    name: ClassVar[str]                       # what it reads is the registry's to say (registry.py)
    fuses_normalization: ClassVar[bool] = False
    # resize filters it reproduces as PIL computes them (mean <= 2 levels); others are refused
    interpolations: ClassVar[tuple[str, ...]] = ("bilinear",)

    def __init__(self, reader, spec, options: BackendOptions):
        """``reader``: a :class:`~fastload.formats.records.SplitReader`; ``spec``: a PreprocessSpec.
        Refuse what the backend cannot do here, by name (e.g. a padding mode)."""
        interpolation = getattr(spec.geometry, "interpolation", None)
        if interpolation is not None and interpolation not in self.interpolations:
            raise ValueError(f"interpolation={interpolation!r} is not supported by backend {self.name!r} (it "
                             f"reproduces {list(self.interpolations)}): use one of those, or a backend that "
                             "reproduces it (backend='reference' has all of PIL's)")
        self.reader, self.spec, self.options = reader, spec, options

    @property
    def normalize(self):
        return self.options.normalize if self.fuses_normalization else None

    @abstractmethod
    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Batches of (images, sample indices) for ``order``; ``params[j]`` is the geometry row
        (:data:`~fastload.pipelines.sampling.PARAM_COLUMNS`) of ``order[j]``: cut both with
        :func:`~fastload.pipelines.sampling.plan_batches`. The caller owns each batch.
        Closing the generator early must release the epoch's threads and buffers."""

    def decode_stage(self) -> "Backend":
        """For ``fastload bench``'s stage breakdown: a backend that decodes what this one decodes
        and cuts the output window without resampling or normalizing. The default serves backends
        that decode whole images: this backend run on each whole image, cut unresampled."""
        return OtherRows(self, lambda order, params: whole_image_rows(self.reader.heights[order],
                                                                      self.reader.widths[order]))

    def close(self) -> None:
        """Release threads and pipelines (idempotent)."""


class OtherRows(Backend):
    """``inner`` run on geometry rows derived from the epoch's, ``rows_of(order, params)``
    (the decode stages of ``fastload bench``)."""
    name = "decode-only"

    def __init__(self, inner: Backend, rows_of):
        self.inner, self.rows_of = inner, rows_of

    def run_epoch(self, order, params):
        return self.inner.run_epoch(order, self.rows_of(order, params))
