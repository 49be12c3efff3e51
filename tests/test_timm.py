"""timm recipes end to end on real photos: a model's data config with bicubic, timm's train
arguments (random erasing, per-element MixUp/CutMix), eval crop modes, in every backend."""
from __future__ import annotations

import pytest
import torch

from conftest import BACKEND_FORMAT, STD255, needs_shared
from fastload import FastLoader, PreprocessSpec
from fastload.spec import IMAGENET_MEAN, IMAGENET_STD

RESNET50_A1 = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
               "std": IMAGENET_STD, "crop_pct": 0.95, "crop_mode": "center"}


def _all(path, backend, spec, **kw):
    loader = FastLoader(path, "validation", batch_size=50, spec=spec, backend=backend, num_workers=2,
                        order="sequential", drop_last=False, seed=7, **kw)
    return [b for b in loader]


@needs_shared
@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_timm_eval_is_the_reference_in_every_backend(imagenet_dirs, crop_mode):
    spec = PreprocessSpec.from_timm({**RESNET50_A1, "crop_mode": crop_mode})  # Resize(235, bicubic) + crop 224
    ref = torch.cat([x for x, _ in _all(imagenet_dirs["tfrecord"], "reference", spec)])
    for backend in ("ffcv", "dali"):
        x = torch.cat([x for x, _ in _all(imagenet_dirs[BACKEND_FORMAT[backend]], backend, spec)])
        diff = ((x - ref) * STD255).abs()
        assert diff.mean() <= 2.0 and diff.mean(dim=(1, 2, 3)).max() <= 4.0, (backend, diff.mean())


@needs_shared
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_timm_train_recipe_end_to_end(imagenet_dirs, backend):
    """The README's timm example with bicubic: erasing after normalization ('const': the mean, so
    exact zeros), per-element MixUp/CutMix with soft labels that sum to one."""
    args = {**RESNET50_A1, "aa": "rand-m9-mstd0.5-inc1", "reprob": 1.0, "remode": "const", "mixup": 0.8,
            "cutmix": 1.0, "mixup_mode": "elem", "smoothing": 0.1}
    spec = PreprocessSpec.from_timm(args, train=True)
    assert spec.geometry.interpolation == "bicubic" and spec.random_erasing.prob == 1.0
    no_mix = spec.replace(mixup=spec.mixup.__class__())
    for x, y in _all(imagenet_dirs[BACKEND_FORMAT[backend]], backend, no_mix)[:2]:
        zeros = (x == 0).all(dim=1).flatten(1).sum(1)  # erased pixels: 0 in every channel
        assert x.shape[1:] == (3, 224, 224) and (zeros >= 0.02 * 224 * 224 * 0.9).all()
    batches = _all(imagenet_dirs[BACKEND_FORMAT[backend]], backend, spec)
    y = torch.cat([y for _, y in batches])
    assert y.shape == (200, 1000) and torch.allclose(y.sum(1), torch.ones(200), atol=1e-5)
    lams = y.max(dim=1).values
    assert len(set(lams.tolist())) > 50  # a draw per element, not one per batch
