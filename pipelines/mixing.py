"""MixUp / CutMix over a batch, timm's ``Mixup`` in its three modes.

``sample_mix`` draws the parameters (timm's draws): with probability ``prob``, CutMix when
only it is on, or with probability ``switch_prob`` when both are; lam ~ Beta(alpha, alpha);
once per batch ('batch'), per pair of rows i and N-1-i ('pair'), or per row ('elem'). The
partner of row i is row N-1-i. CutMix's box follows the paper (cut ratio sqrt(1 - lam),
centre uniform over the image, clipped to it) and the label weight is the exact area left
after clipping. ``mix_batch`` applies them to images and soft labels.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class MixParams:
    """Per row: the weight of its own image (1: untouched), CutMix or MixUp, the CutMix box."""
    lam: np.ndarray        # float64 [N]
    cutmix: np.ndarray     # bool [N]
    boxes: np.ndarray      # int64 [N, 4] (y0, y1, x0, x1)
    per_batch: bool        # one draw for the whole batch (the fast path)


def _draw(rng: np.random.Generator, mix: Mixup, k: int) -> tuple[np.ndarray, np.ndarray]:
    """timm's ``_params_per_elem`` for k draws: (lam, use_cutmix)."""
    if mix.mixup_alpha > 0 and mix.cutmix_alpha > 0:
        use_cutmix = rng.random(k) < mix.switch_prob
        lam = np.where(use_cutmix, rng.beta(mix.cutmix_alpha, mix.cutmix_alpha, size=k),
                       rng.beta(mix.mixup_alpha, mix.mixup_alpha, size=k))
    elif mix.mixup_alpha > 0:
        use_cutmix, lam = np.zeros(k, bool), rng.beta(mix.mixup_alpha, mix.mixup_alpha, size=k)
    else:
        use_cutmix, lam = np.ones(k, bool), rng.beta(mix.cutmix_alpha, mix.cutmix_alpha, size=k)
    return np.where(rng.random(k) < mix.prob, lam, 1.0), use_cutmix


def sample_mix(rng: np.random.Generator, mix: Mixup, n: int, height: int, width: int) -> MixParams | None:
    """One batch's mixing, or None when nothing mixes."""
    if not mix.mixes:
        return None
    if mix.mode == "batch":
        if rng.random() >= mix.prob:
            return None
        use_cutmix = mix.cutmix_alpha > 0 and (mix.mixup_alpha <= 0 or rng.random() < mix.switch_prob)
        alpha = mix.cutmix_alpha if use_cutmix else mix.mixup_alpha
        lam = np.full(n, float(rng.beta(alpha, alpha)))
        cut, boxes = np.full(n, use_cutmix), np.zeros((n, 4), np.int64)
        if use_cutmix:
            boxes[:] = cutmix_box(rng, height, width, lam[0])
        per_batch = True
    else:
        k = n if mix.mode == "elem" else n // 2
        lam, cut = _draw(rng, mix, k)
        boxes = np.zeros((k, 4), np.int64)
        for i in np.flatnonzero(cut & (lam != 1.0)):
            boxes[i] = cutmix_box(rng, height, width, lam[i])
        if mix.mode == "pair":  # row N-1-i mirrors row i; an odd batch's middle row stays itself
            middle = n - 2 * k
            lam = np.concatenate([lam, np.ones(middle), lam[::-1]])
            cut = np.concatenate([cut, np.zeros(middle, bool), cut[::-1]])
            boxes = np.concatenate([boxes, np.zeros((middle, 4), np.int64), boxes[::-1]])
        per_batch = False
    y0, y1, x0, x1 = boxes.T
    cutting = cut & (lam != 1.0)
    lam = np.where(cutting, 1.0 - (y1 - y0) * (x1 - x0) / float(height * width), lam)  # area actually pasted
    return MixParams(lam, cutting, boxes, per_batch)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, mix: Mixup, rng: np.random.Generator,
              inplace: bool = False):
    """images NCHW float, labels soft [N, C] float -> mixed; ``inplace`` reuses ``images``
    (FastLoader owns its batch), otherwise the input is left untouched."""
    p = sample_mix(rng, mix, images.shape[0], images.shape[2], images.shape[3])
    if p is None or (p.lam == 1.0).all():
        return images, labels
    if not inplace:
        images = images.clone()
    if p.per_batch and p.cutmix[0]:
        y0, y1, x0, x1 = p.boxes[0]
        images[:, :, y0:y1, x0:x1] = images[:, :, y0:y1, x0:x1].flip(0)  # copies only the box
    elif p.per_batch:
        images.lerp_(images.flip(0), float(1.0 - p.lam[0]))  # flip(0) is a copy: safe in place
    else:
        partner = images.flip(0)
        blend = ~p.cutmix & (p.lam != 1.0)
        if blend.any():
            w = torch.as_tensor(np.where(blend, 1.0 - p.lam, 0.0), dtype=images.dtype, device=images.device)
            images.lerp_(partner, w.view(-1, 1, 1, 1))
        for i in np.flatnonzero(p.cutmix):
            y0, y1, x0, x1 = p.boxes[i]
            images[i, :, y0:y1, x0:x1] = partner[i, :, y0:y1, x0:x1]
    lam = torch.as_tensor(p.lam, dtype=labels.dtype, device=labels.device).view(-1, 1)
    labels = labels * lam + labels.flip(0) * (1.0 - lam)
    return images, labels
