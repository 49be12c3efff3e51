"""The backend contract and registry: a new backend is one module and one registration."""
from __future__ import annotations

import pytest
import torch

from fastload import FastLoader
from fastload.pipelines import registry


@pytest.fixture
def nearest_registered():
    registry.register_backend("nearest", ("beton", "tfrecord"), "extra_backend:NearestBackend")
    yield "nearest"
    registry._REGISTRY.pop("nearest", None)


def test_registered_backend_runs_everywhere(labelled_colors, nearest_registered, tmp_path):
    from fastload.bench import run_bench
    loader = FastLoader(labelled_colors["tfrecord"], "train", batch_size=16, spec="imagenet:train",
                        backend="nearest", num_workers=0, seed=11, drop_last=False)
    reference = FastLoader(labelled_colors["tfrecord"], "train", batch_size=16, spec="imagenet:train",
                           backend="reference", num_workers=0, seed=11, drop_last=False)
    assert len(loader) == len(reference) == 8
    got = [(x, y) for x, y in loader]
    want = [(x, y) for x, y in reference]
    assert [len(y) for _, y in got] == [16] * 7 + [8]
    assert torch.equal(torch.cat([y for _, y in got]), torch.cat([y for _, y in want]))  # same order
    x, rx = torch.cat([x for x, _ in got]), torch.cat([x for x, _ in want])
    assert x.shape == rx.shape and x.dtype == torch.float32  # normalized by the shared batch ops
    assert (x - rx).abs().mean() < 0.05  # flat colours: nearest and bilinear agree away from edges
    report = run_bench([labelled_colors["tfrecord"]], split="train", spec="imagenet:train", backend="nearest",
                       batch_size=16, repeats=1, workers=1, progress=False, echo=lambda s: None)
    (result,) = report["results"]
    assert result["backend"] == "nearest" and result["images_per_s"]["median"] > 0
    stages = result["stages"]["ms_per_image"]
    assert min(stages.values()) >= 0
    assert sum(stages.values()) == pytest.approx(result["stages"]["full_ms_per_image"])


def test_registry_lists_and_refuses(labelled_colors):
    assert registry.backend_names()[:3] == ("ffcv", "dali", "reference")
    assert registry.backends_for("beton") == ("ffcv", "reference")
    with pytest.raises(ValueError, match="backend='nope' is invalid: allowed 'auto' or one of"):
        FastLoader(labelled_colors["tfrecord"], "train", backend="nope")
    with pytest.raises(ValueError, match="reserved"):
        registry.register_backend("auto", ("beton",), "x:Y")
