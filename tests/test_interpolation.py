"""Resize filters other than bilinear, in every backend that declares them: PIL's pixels (the
reference is PIL), within the fidelity bound bilinear meets, on real photos; refused by name
where a backend cannot reproduce one."""
from __future__ import annotations

import pytest
import torch

from conftest import BACKEND_FORMAT, STD255, needs_shared
from fastload import FastLoader, PreprocessSpec
from fastload.spec import RandomResizedCrop, ResizeCenterCrop



def _spec(interpolation: str, train: bool) -> PreprocessSpec:
    if train:
        return PreprocessSpec(geometry=RandomResizedCrop(224, interpolation=interpolation), hflip=0.5)
    return PreprocessSpec(geometry=ResizeCenterCrop(224, 256, interpolation=interpolation), hflip=0.0)


def _all(path, backend, spec):
    loader = FastLoader(path, "validation", batch_size=50, spec=spec, backend=backend, num_workers=2,
                        order="sequential", drop_last=False, seed=7)
    return torch.cat([x for x, _ in loader])


@needs_shared
@pytest.mark.parametrize("interpolation", ["bicubic", "lanczos", "nearest"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_filters_match_pil_in_every_backend(imagenet_dirs, interpolation, train):
    spec = _spec(interpolation, train)
    ref = _all(imagenet_dirs["tfrecord"], "reference", spec)
    for backend in ("ffcv", "dali"):
        diff = ((_all(imagenet_dirs[BACKEND_FORMAT[backend]], backend, spec) - ref) * STD255).abs()
        per_image = diff.mean(dim=(1, 2, 3))
        assert diff.mean() <= 2.0 and per_image.max() <= 4.0, (backend, diff.mean(), per_image.max())
        # PIL's arithmetic (DALI's too on device='cpu'); Pillow 13's pass order moves a few edge pixels
        assert diff.mean() <= 0.1, diff.mean()


def test_a_filter_a_backend_cannot_reproduce_is_refused(labelled_colors):
    spec = _spec("hamming", train=True)
    with pytest.raises(ValueError, match=r"interpolation='hamming' is not supported by backend 'dali' \(it "
                                         r"reproduces \['bilinear', 'bicubic', 'lanczos', 'nearest'\]\)"):
        FastLoader(labelled_colors["tfrecord"], "train", spec=spec, backend="dali")
    x, _ = next(iter(FastLoader(labelled_colors["beton"], "train", batch_size=8, spec=spec, backend="ffcv",
                                num_workers=1)))
    assert x.shape == (8, 3, 224, 224)
    with pytest.raises(ValueError, match=r"interpolation='area' is invalid: allowed one of \('nearest', "):
        RandomResizedCrop(224, interpolation="area")
