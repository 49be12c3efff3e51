"""Random erasing as timm's ``RandomErasing`` applies it: after normalization, per sample.

``sample_erasing`` draws every box of a batch from the batch's generator (timm's draws, in its
order); ``apply_erasing`` fills them. 'pixel' and 'rand' fills are normal noise drawn on the
batch's device from a seed taken from the same generator, so a resumed epoch erases the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastload.spec import RandomErasing


@dataclass(frozen=True)
class ErasingParams:
    boxes: list[tuple[int, int, int, int, int]]  # (sample, top, left, height, width)
    noise_seed: int


def sample_erasing(rng: np.random.Generator, re: RandomErasing, n: int, height: int, width: int) -> ErasingParams:
    log_aspect = (math.log(re.min_aspect), math.log(1.0 / re.min_aspect))
    area = height * width
    boxes = []
    for i in range(n):
        if rng.random() > re.prob:
            continue
        count = int(rng.integers(1, re.count + 1)) if re.count > 1 else re.count
        for _ in range(count):
            for _attempt in range(10):
                target = rng.uniform(re.min_area, re.max_area) * area / count
                aspect = math.exp(rng.uniform(*log_aspect))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if w < width and h < height:
                    top = int(rng.integers(0, height - h + 1))
                    left = int(rng.integers(0, width - w + 1))
                    boxes.append((i, top, left, h, w))
                    break
    return ErasingParams(boxes, int(rng.integers(0, 2**63 - 1)))


def apply_erasing(x: torch.Tensor, params: ErasingParams, mode: str) -> torch.Tensor:
    """Fill the boxes of NCHW normalized ``x`` in place: 0, a normal value per channel, or per pixel."""
    if not params.boxes:
        return x
    g = torch.Generator(device=x.device)
    g.manual_seed(params.noise_seed)
    c = x.shape[1]
    for i, top, left, h, w in params.boxes:
        region = x[i, :, top:top + h, left:left + w]
        if mode == "const":
            region.zero_()
        else:
            shape = (c, h, w) if mode == "pixel" else (c, 1, 1)
            region.copy_(torch.randn(shape, generator=g, device=x.device, dtype=torch.float32).expand(c, h, w))
    return x
