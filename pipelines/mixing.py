"""MixUp / CutMix over a batch, timm's ``Mixup`` in 'batch' mode.

Per batch (with probability ``prob``): CutMix when only it is on, or with probability
``switch_prob`` when both are; lam ~ Beta(alpha, alpha); the partner of row i is row
N-1-i (the flipped batch). CutMix's box follows the paper (cut ratio sqrt(1 - lam),
centre uniform over the image, clipped to it) and the label weight is the exact area
left after clipping.
"""
from __future__ import annotations

import numpy as np
import torch

from fastload.spec import Mixup


def cutmix_box(rng: np.random.Generator, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the pasted box, clipped to the image."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def sample_mix(rng: np.random.Generator, mix: Mixup, height: int, width: int):
    """Draw one batch's mixing: returns (mode, lam, box) with mode in {None, 'mixup', 'cutmix'}."""
    if not mix.mixes or rng.random() >= mix.prob:
        return None, 1.0, None
    use_cutmix = mix.cutmix_alpha > 0 and (mix.mixup_alpha <= 0 or rng.random() < mix.switch_prob)
    alpha = mix.cutmix_alpha if use_cutmix else mix.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return "mixup", lam, None
    box = cutmix_box(rng, height, width, lam)
    y0, y1, x0, x1 = box
    return "cutmix", 1.0 - (y1 - y0) * (x1 - x0) / float(height * width), box


def mix_batch(images: torch.Tensor, labels: torch.Tensor, mix: Mixup, rng: np.random.Generator,
              inplace: bool = False):
    """images NCHW float, labels soft [N, C] float -> mixed; ``inplace`` reuses ``images``
    (FastLoader owns its batch), otherwise the input is left untouched."""
    mode, lam, box = sample_mix(rng, mix, images.shape[2], images.shape[3])
    if mode is None:
        return images, labels
    if mode == "mixup":
        partner = images.flip(0)  # a copy: safe to blend into `images` in place
        images = images.lerp_(partner, 1.0 - lam) if inplace else torch.lerp(partner, images, lam)
    else:
        y0, y1, x0, x1 = box
        patch = images[:, :, y0:y1, x0:x1].flip(0)  # copies only the box
        if not inplace:
            images = images.clone()
        images[:, :, y0:y1, x0:x1] = patch
    labels = labels * lam + labels.flip(0) * (1.0 - lam)
    return images, labels
