"""What every backend shares: the order of an epoch and each sample's geometry parameters.

Both are pure functions of (seed, epoch) and the dataset, computed once per epoch in
numpy and handed to the backends, so the same seed gives the same order and the same
crops in ffcv, DALI and the reference, run after run, on any number of workers.

Geometry parameters, one int32 row per position of the epoch's order (``PARAM_COLUMNS``), so
a sample drawn twice (repeated augmentation) is cropped twice: take the source box
(y0, x0, h, w) as an image of its own, resample it to (out_h, out_w) with PIL's
antialiased bilinear filter, cut the window (top, left) of the spec's output size from
that (coordinates outside are padding), and flip it horizontally when ``flip`` is 1.
"""
from __future__ import annotations

import math

import numpy as np

from fastload.spec import RandomCrop, RandomResizedCrop, ResizeCenterCrop

PARAM_COLUMNS = ("y0", "x0", "h", "w", "out_h", "out_w", "top", "left", "flip")
Y0, X0, H, W, OUT_H, OUT_W, TOP, LEFT, FLIP = range(len(PARAM_COLUMNS))

ORDER_STREAM, GEOMETRY_STREAM, AUGMENT_STREAM = 0, 1, 2  # independent random streams per (seed, epoch)


def rng_for(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), stream])


def augment_rng(seed: int, epoch: int, rank: int, batch: int) -> np.random.Generator:
    """The batch ops' generator (augmentations, MixUp/CutMix) of one rank's batch in an epoch: one
    stream per batch, so a resumed epoch needs no draws replayed."""
    return np.random.default_rng([int(seed), int(epoch), AUGMENT_STREAM, int(rank), int(batch)])


def rank_share(n: int, world_size: int, drop_last: bool) -> int:
    """Samples per rank per epoch under ``DistributedSampler``'s remainder rule: ``drop_last``
    drops the last ``n % world_size`` samples of the order so shares stay disjoint; otherwise
    every rank gets ``ceil(n / world_size)`` (:func:`deal` pads the order with its own first
    samples, so up to ``world_size - 1`` appear twice in an epoch)."""
    if world_size == 1:
        return n
    return n // world_size if drop_last else math.ceil(n / world_size)


def deal(order: np.ndarray, total: int) -> np.ndarray:
    """The remainder rule applied: ``order`` padded with its own first samples, or cut, to
    ``total`` (``rank_share(...) * world_size``) positions."""
    if total > len(order):
        order = np.concatenate([order, np.resize(order, total - len(order))])
    return order[:total].astype(np.int64)


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches in an epoch of ``num_samples``: the last one partial, or dropped with ``drop_last``."""
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


def epoch_batches(order: np.ndarray, batch_size: int, drop_last: bool) -> list[np.ndarray]:
    """The epoch's order cut into batches: the one batching rule every backend follows."""
    return [order[b * batch_size:(b + 1) * batch_size] for b in range(num_batches(len(order), batch_size, drop_last))]


def plan_batches(order: np.ndarray, params: np.ndarray, batch_size: int,
                 drop_last: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(sample indices, their geometry rows) per batch, by :func:`epoch_batches`' rule."""
    return list(zip(epoch_batches(order, batch_size, drop_last), epoch_batches(params, batch_size, drop_last)))


def repeated_epoch_indices(n: int, repeats: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0,
                           world_size: int = 1, selected_round: int = 256) -> np.ndarray:
    """Repeated augmentation as timm's ``RepeatAugSampler`` (DeiT's ``RASampler``) draws it: the
    shuffled order with each sample ``repeats`` times in a row, padded to a multiple of the world
    size and dealt round-robin, so copies of a sample go to different ranks; each rank keeps its
    first ``n // selected_round * selected_round / world_size`` (an epoch stays about ``n`` samples
    long in all). A split smaller than ``selected_round`` keeps ``ceil(n / world_size)``."""
    order = rng_for(seed, epoch, ORDER_STREAM).permutation(n) if shuffle else np.arange(n)
    order = np.repeat(order, repeats)
    share = math.ceil(n * repeats / world_size)
    order = np.resize(order, share * world_size)[rank::world_size]  # np.resize pads with the start
    return order[:repeated_share(n, world_size, selected_round)].astype(np.int64)


def repeated_share(n: int, world_size: int, selected_round: int = 256) -> int:
    """Samples per rank per epoch under :func:`repeated_epoch_indices`."""
    return n // selected_round * selected_round // world_size if n >= selected_round else math.ceil(n / world_size)


def resized_shorter_side(h: np.ndarray, w: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """torchvision ``Resize(size)``: short side -> size, long side -> int(size * long / short)."""
    h = h.astype(np.int64)
    w = w.astype(np.int64)
    wide = w > h
    short = np.minimum(h, w)
    long_ = np.maximum(h, w)
    new_long = (size * long_ / short).astype(np.int64)  # int() truncation, as torchvision
    out_h = np.where(wide, size, new_long)
    out_w = np.where(wide, new_long, size)
    return out_h, out_w


def geometry_params(geometry, hflip: float, heights: np.ndarray, widths: np.ndarray,
                    seed: int, epoch: int, stream: tuple[int, ...] = ()) -> np.ndarray:
    """One geometry row per image of the given sizes (see module doc), drawn from the epoch's
    geometry stream (``stream`` names a sub-stream)."""
    n = len(heights)
    h = np.asarray(heights, np.int64)
    w = np.asarray(widths, np.int64)
    rng = np.random.default_rng([int(seed), int(epoch), GEOMETRY_STREAM, *map(int, stream)])
    p = np.zeros((n, len(PARAM_COLUMNS)), np.int32)
    th, tw = geometry.size
    if isinstance(geometry, RandomResizedCrop):
        i, j, ch, cw = random_resized_crop_params(rng, h, w, geometry.scale, geometry.ratio)
        p[:, Y0], p[:, X0], p[:, H], p[:, W] = i, j, ch, cw
        p[:, OUT_H], p[:, OUT_W] = th, tw
    elif isinstance(geometry, RandomCrop):
        pad = geometry.padding
        p[:, H], p[:, W], p[:, OUT_H], p[:, OUT_W] = h, w, h, w
        # torchvision: i = randint(0, padded_h - th + 1) in padded coordinates
        hi_h = h + 2 * pad - th + 1
        hi_w = w + 2 * pad - tw + 1
        if (hi_h < 1).any() or (hi_w < 1).any():
            raise ValueError(f"random_crop.size={geometry.size} is larger than a padded image "
                             f"({int(h.min())}x{int(w.min())} + padding {pad})")
        p[:, TOP] = rng.integers(0, hi_h) - pad
        p[:, LEFT] = rng.integers(0, hi_w) - pad
    elif isinstance(geometry, ResizeCenterCrop):
        if geometry.crop_mode == "squash":  # both sides to the squash size, aspect not kept
            oh, ow = (np.full(n, v, np.int64) for v in geometry.squash_size)
        else:
            oh, ow = resized_shorter_side(h, w, geometry.resize)
        p[:, H], p[:, W], p[:, OUT_H], p[:, OUT_W] = h, w, oh, ow
        # torchvision CenterCrop: int(round((size - crop) / 2)); Python rounds half to even, as np.round
        p[:, TOP] = np.round((oh - th) / 2.0).astype(np.int64)
        p[:, LEFT] = np.round((ow - tw) / 2.0).astype(np.int64)
    else:
        raise TypeError(f"unknown geometry {geometry!r}")
    if hflip > 0:
        p[:, FLIP] = rng.random(n) < hflip
    return p


def crop_rows(params: np.ndarray) -> np.ndarray:
    """Rows that cut each row's box out at its top-left output window, unresampled and unflipped:
    what ``fastload bench``'s decode stage runs (the decode without the geometry)."""
    rows = params.copy()
    rows[:, OUT_H], rows[:, OUT_W] = rows[:, H], rows[:, W]
    rows[:, TOP] = rows[:, LEFT] = rows[:, FLIP] = 0
    return rows


def whole_image_rows(heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """:func:`crop_rows` of boxes that are the whole images."""
    rows = np.zeros((len(heights), len(PARAM_COLUMNS)), np.int32)
    rows[:, H], rows[:, W] = heights, widths
    return crop_rows(rows)


def random_resized_crop_params(rng: np.random.Generator, height: np.ndarray, width: np.ndarray,
                               scale, ratio, attempts: int = 10):
    """``torchvision.transforms.RandomResizedCrop.get_params`` for every sample at once:
    up to 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)), then the
    same central fallback."""
    n = len(height)
    area = (height * width).astype(np.float64)
    log_ratio = np.log(np.asarray(ratio, np.float64))
    target = area[None, :] * rng.uniform(scale[0], scale[1], size=(attempts, n))
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], size=(attempts, n)))
    cw = np.round(np.sqrt(target * aspect)).astype(np.int64)
    ch = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (cw > 0) & (cw <= width[None, :]) & (ch > 0) & (ch <= height[None, :])
    first = np.argmax(ok, axis=0)
    found = ok[first, np.arange(n)]
    ch = ch[first, np.arange(n)]
    cw = cw[first, np.arange(n)]
    # fallback: central crop clamped to the ratio range
    in_ratio = width / height
    fb_w = np.where(in_ratio < min(ratio), width,
                    np.where(in_ratio > max(ratio), np.round(height * max(ratio)).astype(np.int64), width))
    fb_h = np.where(in_ratio < min(ratio), np.round(width / min(ratio)).astype(np.int64),
                    height)
    ch = np.where(found, ch, fb_h)
    cw = np.where(found, cw, fb_w)
    u_i = rng.random(n)
    u_j = rng.random(n)
    i = np.where(found, np.floor(u_i * (height - ch + 1)).astype(np.int64), (height - ch) // 2)
    j = np.where(found, np.floor(u_j * (width - cw + 1)).astype(np.int64), (width - cw) // 2)
    return i, j, ch, cw
