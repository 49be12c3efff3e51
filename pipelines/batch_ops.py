"""Batch ops shared by every backend, run on the loader's device after the backend's decode and geometry.

A backend hands over uint8 NHWC images after decode + geometry + flip; from there the
same torch code makes the labels (int, multi-hot, smoothed, mixed), applies the
photometric/policy augmentations, normalization, random erasing, MixUp/CutMix, dtype and layout. One
implementation, so the spec means the same thing in ffcv, DALI and the reference.
"""
from __future__ import annotations

import numpy as np
import torch

from fastload.spec import IMAGENET_MEAN, TIMM_POLICIES, PreprocessSpec

from .augment import apply_color_jitter, apply_policy, sample_color_jitter, sample_policy_ops
from .timm_augment import apply_timm_policy, sample_timm_policy, timm_fill
from .erasing import apply_erasing, sample_erasing
from .mixing import mix_batch


def one_hot(labels: torch.Tensor, num_classes: int, on: float = 1.0, off: float = 0.0) -> torch.Tensor:
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), on)


def multi_hot(ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Padded id rows (-1 = none) -> float multi-hot [N, C]."""
    out = torch.zeros((ids.shape[0], num_classes + 1), dtype=torch.float32, device=ids.device)
    idx = torch.where(ids < 0, torch.full_like(ids, num_classes), ids).long()
    out.scatter_(1, idx, 1.0)
    return out[:, :num_classes].contiguous()


class BatchAugment:
    """The spec's policy, then ColorJitter, on NCHW float 0..255 batches. timm policies run by
    timm's semantics (its fill, its resampling for geometric ops); from timm configs the two are
    alternatives, as in timm (``from_timm`` turns jitter off when a policy is set)."""

    def __init__(self, spec: PreprocessSpec):
        self.color_jitter = spec.color_jitter
        self.policy = spec.auto_augment
        mean = spec.normalize.mean if isinstance(spec.normalize.mean, tuple) else IMAGENET_MEAN
        self.timm = isinstance(self.policy, TIMM_POLICIES)
        if self.timm:
            self.fill = timm_fill(mean)
            interpolation = getattr(spec.geometry, "interpolation", None)  # RandomCrop: timm's random choice
            if interpolation not in (None, "bilinear", "bicubic"):
                raise ValueError(f"interpolation={interpolation!r} with timm policy {self.policy!r}: timm's geometric "
                                 "ops resample with 'bilinear' or 'bicubic' only; choose one of those")
            self.resample = interpolation
        else:
            self.fill = [round(255 * m) for m in mean]

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.timm:
            x = apply_timm_policy(x, sample_timm_policy(rng, self.policy, n, self.resample), self.fill)
        elif self.policy is not None:
            x = apply_policy(x, sample_policy_ops(rng, self.policy, n, h, w), self.fill)
        if self.color_jitter is not None:
            x = apply_color_jitter(x, sample_color_jitter(rng, self.color_jitter, n))
        return x


class BatchTransform:
    """uint8 NHWC batch + sample indices -> (images, labels) as the spec says."""

    def __init__(self, spec: PreprocessSpec, labels: np.ndarray, num_classes: int, multi_label: bool,
                 dataset_stats: dict | None, device: torch.device):
        self.spec = spec
        self.device = device
        self.labels = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
        self.num_classes = num_classes
        self.multi_label = multi_label
        mean, std = (np.asarray(v, np.float64) for v in spec.normalize.resolve(dataset_stats))
        # x_norm = x * scale - shift, x in 0..255; numpy for backends that fuse it, torch for us
        self.normalize_params = ((1.0 / (255.0 * std)).astype(np.float32), (mean / std).astype(np.float32))
        self.scale, self.shift = (torch.from_numpy(v).to(device).view(1, 3, 1, 1) for v in self.normalize_params)
        self.augment = BatchAugment(spec) if (spec.color_jitter or spec.auto_augment) else None
        self.float_dtype = torch.float16 if spec.dtype == "float16" else torch.float32
        # A backend may normalize inside its own kernels when nothing needs the 0..255 levels
        self.backend_may_normalize = self.augment is None and spec.dtype != "uint8"
        self.light = self.augment is None and not spec.mixup.mixes  # no augmentation, no MixUp/CutMix

    def make_labels(self, index: np.ndarray) -> torch.Tensor:
        raw = self.labels[torch.from_numpy(np.asarray(index, np.int64))]
        mix = self.spec.mixup
        if self.multi_label:
            y = multi_hot(raw, self.num_classes)
            if mix.label_smoothing:
                y = y * (1.0 - mix.label_smoothing) + mix.label_smoothing / self.num_classes
            return y
        if mix.soft_labels:
            off = mix.label_smoothing / self.num_classes
            return one_hot(raw, self.num_classes, on=1.0 - mix.label_smoothing + off, off=off)
        return raw

    def __call__(self, images: torch.Tensor, index: np.ndarray, rng: np.random.Generator):
        """``images``: a batch the caller owns (backends never hand out buffers they reuse)."""
        labels = self.make_labels(index).to(self.device, non_blocking=True)
        nonblocking = self.device.type == "cuda" and images.device.type == "cpu"
        if nonblocking:
            images = images.pin_memory()
        channels_last = self.spec.layout == "channels_last"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if images.is_floating_point():
            # normalized by the backend: NCHW already, or NHWC to be viewed as channels_last
            x = images.permute(0, 3, 1, 2) if channels_last else images
            return self._finish(x.to(self.device, non_blocking=nonblocking), labels, rng, fmt)
        x = images.to(self.device, non_blocking=nonblocking).permute(0, 3, 1, 2)  # NCHW view
        if self.spec.dtype == "uint8":
            out = torch.empty(x.shape, dtype=torch.uint8, device=self.device, memory_format=fmt)
            out.copy_(x)
            if self.augment is not None:
                out = self.augment(out.float(), rng).round_().clamp_(0, 255).to(torch.uint8, memory_format=fmt)
            return out, labels
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device, memory_format=fmt)
        out.copy_(x)
        if self.augment is not None:
            out = self.augment(out, rng)  # 0..255 float in, 0..255 float out
        out.mul_(self.scale).sub_(self.shift)
        return self._finish(out, labels, rng, fmt)

    def _finish(self, out, labels, rng, fmt):
        re = self.spec.random_erasing
        if re is not None:  # timm's order: normalize, erase per sample, then mix the batch
            out = apply_erasing(out, sample_erasing(rng, re, out.shape[0], out.shape[2], out.shape[3]), re.mode)
        if self.spec.mixup.mixes:
            out, labels = mix_batch(out, labels, self.spec.mixup, rng, inplace=True)
        if self.float_dtype != torch.float32:
            out = out.to(self.float_dtype, memory_format=fmt)
        return out, labels
