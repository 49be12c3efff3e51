"""``fastload inspect``: a grid of augmented samples with their class names, to check a pipeline by eye."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TILE_LABEL_HEIGHT = 28
MIN_TILE = 128  # px: below this a tile and its caption are unreadable


def inspect_grid(directory, split="train", spec=None, backend="auto", out="grid.png", n=16, seed=0,
                 cache_dir=None) -> Path:
    import torch
    from PIL import Image, ImageDraw
    from .loader import FastLoader
    out = Path(out)
    if not out.parent.is_dir():  # said before anything is loaded
        raise ValueError(f"{out.parent} does not exist: create it, or give --out a path in an existing folder")
    loader = FastLoader(directory, split, batch_size=n, spec=spec, backend=backend, seed=seed,
                        drop_last=False, num_workers=2, cache_dir=cache_dir)
    images, labels = next(iter(loader))
    images, labels = images[:n].float().cpu(), labels[:n].cpu()
    if loader.spec.dtype != "uint8":  # undo the normalization for display
        scale = loader.transform.scale.cpu()
        shift = loader.transform.shift.cpu()
        images = (images + shift) / scale
    tiles = images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    names = loader.manifest.class_names
    captions = [_caption(labels[i], names) for i in range(len(tiles))]
    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    th, tw = tiles.shape[1], tiles.shape[2]
    zoom = max(1, -(-MIN_TILE // min(th, tw)))  # small images (CIFAR's 32 px) are blown up, pixels kept sharp
    if zoom > 1:
        tiles = tiles.repeat(zoom, axis=1).repeat(zoom, axis=2)
        th, tw = th * zoom, tw * zoom
    grid = Image.new("RGB", (cols * tw, rows * (th + TILE_LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        x, y = (i % cols) * tw, (i // cols) * (th + TILE_LABEL_HEIGHT)
        grid.paste(Image.fromarray(tile), (x, y))
        draw.text((x + 3, y + th + 3), captions[i][: max(8, tw // 6)], fill="black")
    try:
        grid.save(out)
    except OSError as e:
        raise ValueError(f"cannot write {out} ({e.strerror or e}): give --out a writable .png path") from None
    return out


def _caption(label, names) -> str:
    if label.ndim == 0:
        return names[int(label)]
    values, idx = label.float().topk(min(2, label.numel()))
    parts = [f"{names[int(i)]} {float(v):.2f}" for v, i in zip(values, idx) if float(v) > 0.05]
    return ", ".join(parts) or "-"
