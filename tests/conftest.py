"""Shared fixtures: real data from ../shared/data, converted once per session, and small
synthetic datasets with the hub's exact schemas (cifar100, COCO) or pixels that encode labels.

Loaders are cheap to build (kernels are cached on disk); DALI pipelines still take a moment.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastload.spec import IMAGENET_MEAN, IMAGENET_STD
from fastload.testing.launch import torchrun  # noqa: F401 (the tests' torchrun jobs)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
IMAGENET = SHARED / "imagenet-1k-sample"
CIFAR10 = SHARED / "cifar10-sample"

# ImageNet normalization in 0..255 levels, (1, 3, 1, 1): to undo a batch's normalization
MEAN255 = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
STD255 = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
# the storage each backend's tests read (the reference reads both; tests give it TFRecord)
BACKEND_FORMAT = {"ffcv": "beton", "dali": "tfrecord", "reference": "tfrecord"}



needs_shared = pytest.mark.skipif(not IMAGENET.exists() or not CIFAR10.exists(),
                                  reason="../shared/data is absent (outside CI): real-image tests need it")


def stock_ffcv():
    """ffcv itself, for the tests that cross-check fastload's files with its reader; skipped where
    ``make setup`` could not install it (no root for its apt packages: the setup said so)."""
    from fastload.formats.beton import import_ffcv
    try:
        return import_ffcv()
    except ImportError as e:
        pytest.skip(f"stock ffcv is not installed here: {e}")


def jpeg_bytes(array: np.ndarray, quality: int = 95, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- real data, converted once
@pytest.fixture(scope="session")
def imagenet_dirs(tmp_path_factory):
    """The 200-image ImageNet sample in both formats (several shards), plus conversion timings."""
    if not IMAGENET.exists():
        pytest.skip("../shared/data is absent (outside CI)")
    from fastload import convert
    root = tmp_path_factory.mktemp("imagenet")
    out = {}
    for fmt in ("beton", "tfrecord"):
        out[fmt] = root / fmt
        # in the source's order: tests compare sample i with the source's row i (the default,
        # shuffled write order is tested in test_convert.py and test_orders.py)
        convert(str(IMAGENET), out[fmt], format=fmt, workers=2, shard_size=32, progress=False, shuffle_seed=None)
    return out


@pytest.fixture(scope="session")
def imagenet_source():
    import datasets
    if not IMAGENET.exists():
        pytest.skip("../shared/data is absent (outside CI)")
    return datasets.load_dataset(str(IMAGENET), split="validation")


@pytest.fixture(scope="session")
def cifar_dirs(tmp_path_factory):
    """2,000 real CIFAR-10 images (shuffled: the sample is sorted by class) in both formats, split
    train/test."""
    if not CIFAR10.exists():
        pytest.skip("../shared/data is absent (outside CI)")
    import datasets
    from fastload import convert
    root = tmp_path_factory.mktemp("cifar")
    ds = datasets.load_dataset(str(CIFAR10), split="test").shuffle(seed=0)
    src = root / "source"
    datasets.DatasetDict({"train": ds.select(range(1600)), "test": ds.select(range(1600, 2000))}).save_to_disk(str(src))
    out = {}
    for fmt in ("beton", "tfrecord"):
        out[fmt] = root / fmt
        convert(str(src), out[fmt], format=fmt, workers=2, progress=False)
    return out


# --------------------------------------------------------------------------- synthetic schemas
def label_color(label: int) -> tuple[int, int, int]:
    """A colour that encodes a label 0..63 and survives crops, resizes and flips of a flat image."""
    return (40 + 50 * (label % 4), 40 + 50 * ((label // 4) % 4), 40 + 50 * (label // 16))


def color_label(pixel_mean) -> int:
    r, g, b = (int(round((float(v) - 40) / 50)) for v in pixel_mean)
    return r + 4 * g + 16 * b


@pytest.fixture(scope="session")
def labelled_colors(tmp_path_factory):
    """120 flat-colour JPEGs of varied sizes whose colour encodes the label, both formats."""
    import datasets
    from fastload import convert
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(64)]
    images, labels = [], []
    for i in range(120):
        label = int(rng.integers(0, 64))
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        images.append({"bytes": jpeg_bytes(np.full((h, w, 3), label_color(label), np.uint8), quality=100),
                       "path": None})
        labels.append(label)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    root = tmp_path_factory.mktemp("colors")
    src = root / "source"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats)}
                         ).save_to_disk(str(src))
    out = {"labels": np.array(labels)}
    for fmt in ("beton", "tfrecord"):
        out[fmt] = root / fmt
        convert(str(src), out[fmt], format=fmt, workers=1, progress=False, preset="imagenet",
                shuffle_seed=None)  # sample i is row i: tests pick samples by index
    return out


COCO_NAMES = [f"category_{i}" for i in range(80)]


def coco_dataset(n: int = 12, seed: int = 0):
    """A tiny dataset with detection-datasets/coco's exact columns and features."""
    import datasets
    rng = np.random.default_rng(seed)
    feats = datasets.Features({
        "image_id": datasets.Value("int64"), "image": datasets.Image(),
        "width": datasets.Value("int64"), "height": datasets.Value("int64"),
        "objects": datasets.Sequence({"bbox_id": datasets.Value("int64"),
                                      "category": datasets.ClassLabel(names=COCO_NAMES),
                                      "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                                      "area": datasets.Value("int64")})})
    rows = {k: [] for k in feats}
    for i in range(n):
        h, w = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        k = int(rng.integers(0, 6))  # some images have no objects at all
        cats = rng.integers(0, 80, size=k).tolist()
        rows["image_id"].append(i)
        rows["image"].append({"bytes": jpeg_bytes(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), "path": None})
        rows["width"].append(w)
        rows["height"].append(h)
        rows["objects"].append({"bbox_id": list(range(k)), "category": cats, "bbox": [[0.0, 0.0, 1.0, 1.0]] * k,
                                "area": [1] * k})
    return datasets.Dataset.from_dict(rows, features=feats)


def cifar100_dataset(n: int = 20, seed: int = 0):
    """A tiny dataset with the hub's cifar100 columns: img, fine_label, coarse_label (PNG images)."""
    import datasets
    rng = np.random.default_rng(seed)
    feats = datasets.Features({"img": datasets.Image(),
                               "fine_label": datasets.ClassLabel(names=[f"fine_{i}" for i in range(100)]),
                               "coarse_label": datasets.ClassLabel(names=[f"coarse_{i}" for i in range(20)])})
    imgs = [{"bytes": png_bytes(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))), "path": None}
            for _ in range(n)]
    return datasets.Dataset.from_dict({"img": imgs, "fine_label": rng.integers(0, 100, n).tolist(),
                                       "coarse_label": rng.integers(0, 20, n).tolist()}, features=feats)


def save_splits(path: Path, **splits) -> Path:
    import datasets
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


@pytest.fixture
def cpu_threads():
    import torch
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def pytest_configure(config):
    os.environ.setdefault("TQDM_DISABLE", "1")
