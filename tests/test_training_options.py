"""Options of long training runs: progressive resolution, repeated augmentation, subsets, extra
columns and the user's batch hook, in every backend, on real photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BACKEND_FORMAT, MEAN255, STD255, cifar100_dataset, color_label, needs_shared, save_splits
from fastload import FastLoader, PreprocessSpec, convert
from fastload.pipelines.sampling import repeated_epoch_indices
from fastload.spec import ProgressiveResolution, ResizeCenterCrop



def _levels(x: torch.Tensor) -> torch.Tensor:
    return x.float() * STD255 + MEAN255


def _by_index(loader) -> dict[int, torch.Tensor]:
    return {int(i): x for b in loader for i, x in zip(b.index, b.images)}


# --------------------------------------------------------------------------- progressive resolution
def test_schedule_is_ffcvs_get_resolution():
    for lo, hi, start, end in ((160, 192, 65, 76), (128, 224, 10, 40)):
        sched = ProgressiveResolution(min_res=lo, max_res=hi, start_ramp=start, end_ramp=end)
        # FFCV's ImageNet example: np.interp, then round to a multiple of 32 (half to even, as np.round)
        ffcv = [int(np.round(np.interp(e, [start, end], [lo, hi]) / 32)) * 32 for e in range(88)]
        assert [sched.size_at(e) for e in range(88)] == ffcv
    sched = ProgressiveResolution(min_res=160, max_res=192, start_ramp=65, end_ramp=76)
    assert [sched.size_at(e) for e in (0, 70, 71, 87)] == [160, 160, 192, 192]  # as the README's table
    spec = PreprocessSpec.preset("imagenet").replace(resolution=sched)
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert spec.for_epoch(80).size == (192, 192) and spec.for_epoch(80).resolution is None
    with pytest.raises(ValueError, match="resolution.end_ramp=3 is invalid: allowed > start_ramp=5"):
        ProgressiveResolution(start_ramp=5, end_ramp=3)
    with pytest.raises(ValueError, match="resolution.min_res=256 is invalid"):
        ProgressiveResolution(min_res=256, max_res=192)
    # eval at another size keeps the crop fraction: Resize(292) + CenterCrop(256) at crop_pct 0.875
    ev = PreprocessSpec.preset("imagenet", train=False).at_size(256).geometry
    assert isinstance(ev, ResizeCenterCrop) and (ev.size, ev.resize) == ((256, 256), 292)


@needs_shared
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_resolution_changes_between_epochs_and_stays_torchvisions(imagenet_dirs, backend):
    """160 px, then 192 px from the schedule, then 224 by a call: every epoch the shape asked for and
    the pixels of the reference (torchvision on PIL) at that size, within 2 levels on average."""
    spec = PreprocessSpec.preset("imagenet").replace(resolution=ProgressiveResolution(160, 192, 0, 1))
    loaders = {b: FastLoader(imagenet_dirs[BACKEND_FORMAT[b]], "validation", batch_size=50, spec=spec, backend=b,
                             num_workers=2, seed=3, columns="index") for b in (backend, "reference")}
    for epoch, size in ((0, 160), (1, 192), (2, 224)):
        if epoch == 2:
            for loader in loaders.values():
                loader.set_resolution(224)
        for loader in loaders.values():
            loader.set_epoch(epoch)
            assert loader.resolution == (size, size)
        got, ref = (_by_index(loaders[b]) for b in (backend, "reference"))
        assert sorted(got) == sorted(ref) == list(range(200))
        x = torch.stack([got[i] for i in range(200)])
        rx = torch.stack([ref[i] for i in range(200)])
        assert x.shape == (200, 3, size, size)
        assert (_levels(x) - _levels(rx)).abs().mean() <= 2.0
    state = loaders[backend].state_dict()
    assert state["resolution"] == [224, 224]
    fresh = FastLoader(imagenet_dirs[BACKEND_FORMAT[backend]], "validation", batch_size=50, spec=spec, backend=backend,
                       num_workers=2, seed=3)
    fresh.load_state_dict(state)
    assert fresh.resolution == (224, 224)  # a resumed job keeps the size it was told


# --------------------------------------------------------------------------- repeated augmentation
def _timm_repeat_aug(n, repeats, rank, world, selected_round=256):
    """timm's RepeatAugSampler.__iter__ (shuffle=False), written out with torch as timm does."""
    num_samples = int(np.ceil(n * repeats / world))
    total = num_samples * world
    indices = torch.repeat_interleave(torch.arange(n), repeats=repeats, dim=0).tolist()
    indices += indices[:total - len(indices)]
    indices = indices[rank:total:world]
    selected = int(np.floor(n // selected_round * selected_round / world))
    return indices[:selected]


@pytest.mark.parametrize("n,repeats,world", [(1000, 3, 1), (1000, 3, 2), (600, 2, 4), (1300, 3, 8)])
def test_repeated_indices_are_timms(n, repeats, world):
    for rank in range(world):
        ours = repeated_epoch_indices(n, repeats, shuffle=False, seed=0, epoch=0, rank=rank, world_size=world)
        assert ours.tolist() == _timm_repeat_aug(n, repeats, rank, world)


@pytest.mark.parametrize("backend", ["ffcv", "dali", "reference"])
def test_repeated_augmentation_draws_copies_with_their_own_crops(labelled_colors, monkeypatch, backend):
    """k=3 over 2 ranks: the copies of a sample go to different ranks, each cropped on its own,
    labels still paired with their images."""
    seen: dict[int, list] = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = FastLoader(labelled_colors[BACKEND_FORMAT[backend]], "train", batch_size=16, backend=backend,
                            spec="imagenet:train", num_workers=1, repeated_augmentation=3, columns="index", seed=2)
        assert loader.num_samples == 60 and len(loader) == 3  # ceil(120 / 2) per rank (the split is < 256)
        order, params = loader.epoch_plan()
        for b in loader:
            assert [color_label(m) for m in _levels(b.images).mean(dim=(2, 3)).tolist()] == b.labels.tolist()
        for i, row in zip(order.tolist(), params):
            seen.setdefault(i, []).append((rank, tuple(row)))
    copies = [v for v in seen.values() if len(v) >= 2]
    assert copies and sum(len(v) for v in seen.values()) == 120
    assert all(len({r for r, _ in v}) >= 2 for v in seen.values() if len(v) == 3)  # spread over ranks
    assert all(len({p for _, p in v}) == len(v) for v in copies)  # every copy its own crop


# --------------------------------------------------------------------------- subsets and columns
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_subset_by_indices_and_classes(labelled_colors, backend):
    path = labelled_colors[BACKEND_FORMAT[backend]]
    labels = labelled_colors["labels"]
    kw = dict(batch_size=16, backend=backend, spec="imagenet:train", num_workers=2, seed=4, drop_last=False)
    full = FastLoader(path, "train", columns="index", **kw)
    subset = np.arange(3, 120, 7)
    sub = FastLoader(path, "train", indices=subset, columns="index", **kw)
    assert sub.num_samples == len(subset) and len(sub) == 2
    got, all_ = _by_index(sub), _by_index(full)
    assert sorted(got) == subset.tolist()
    assert all(torch.equal(got[i], all_[i]) for i in got)  # a sample's crop does not depend on the subset
    wanted = sorted(set(labels[subset].tolist()))[:3]  # classes in the subset, and others of theirs beside
    by_class = FastLoader(path, "train", classes=wanted, **kw)
    ys = torch.cat([y for _, y in by_class])
    assert sorted(ys.tolist()) == sorted(int(v) for v in labels if v in wanted)
    both = FastLoader(path, "train", indices=subset, classes=wanted, columns=["index"], **kw)
    assert sorted(torch.cat([b.index for b in both]).tolist()) == [i for i in subset if labels[i] in wanted]


def test_cifar100_coarse_label_and_source_index(tmp_path):
    """Extra stored columns come back by name, paired with their images; the default stays a pair."""
    ds = cifar100_dataset(n=40, seed=3)
    src = save_splits(tmp_path / "src", train=ds)
    for fmt, backend in (("beton", "ffcv"), ("tfrecord", "dali")):
        out = tmp_path / fmt
        convert(str(src), out, format=fmt, workers=1, progress=False, shuffle_seed=None)
        loader = FastLoader(out, "train", batch_size=16, backend=backend, num_workers=1, drop_last=False,
                            columns=("index", "source_index", "coarse_label"))
        rows = [b for b in loader]
        assert all(type(b).__name__ == "Batch" and b._fields == ("images", "labels", "index", "source_index",
                                                                  "coarse_label") for b in rows)
        index = torch.cat([b.index for b in rows]).numpy()
        assert sorted(index.tolist()) == list(range(40))
        assert torch.cat([b.coarse_label for b in rows]).tolist() == [ds[int(i)]["coarse_label"] for i in index]
        assert torch.cat([b.labels for b in rows]).tolist() == [ds[int(i)]["fine_label"] for i in index]
        assert torch.cat([b.source_index for b in rows]).tolist() == index.tolist()  # nothing skipped
        images, labels = next(iter(FastLoader(out, "train", batch_size=16, backend=backend, num_workers=1)))
        assert images.shape == (16, 3, 32, 32) and labels.shape == (16,)


def test_subset_and_column_errors(labelled_colors):
    path = labelled_colors["beton"]
    with pytest.raises(ValueError, match=r"indices \[120, -1\] are outside split 'train': allowed 0..119"):
        FastLoader(path, "train", indices=[0, 120, -1])
    with pytest.raises(ValueError, match=r"boolean mask of shape \(5,\): allowed shape \(120,\)"):
        FastLoader(path, "train", indices=np.ones(5, bool))
    with pytest.raises(ValueError, match=r"classes \[10000\] are not class ids of .*: allowed 0\.\.63"):
        FastLoader(path, "train", classes=[10_000])
    missing = sorted(set(range(64)) - set(labelled_colors["labels"].tolist()))[:1]  # a class id with no sample
    with pytest.raises(ValueError, match="select no sample"):
        FastLoader(path, "train", classes=missing)
    with pytest.raises(ValueError, match=r"columns=\['colour'\] is invalid \(\['colour'\] not stored\): allowed "
                                         r"any of \['index', 'source_index'\]"):
        FastLoader(path, "train", columns=["colour"])
    with pytest.raises(ValueError, match="repeated_augmentation=0 is invalid"):
        FastLoader(path, "train", repeated_augmentation=0)
    a = FastLoader(path, "train", batch_size=16, indices=range(60))
    b = FastLoader(path, "train", batch_size=16, indices=range(60, 120))
    with pytest.raises(ValueError, match=r"differs from this one in \['subset'\]"):
        b.load_state_dict(a.state_dict())


# --------------------------------------------------------------------------- the user's batch hook
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_batch_transform_runs_after_fastloads_ops(labelled_colors, backend):
    path = labelled_colors[BACKEND_FORMAT[backend]]
    calls = []

    def upside_down(images, labels):
        calls.append((images.dtype, images.device.type))
        return images.flip(2), labels + 1000

    kw = dict(batch_size=16, backend=backend, spec="imagenet:train", num_workers=1, seed=9)
    plain = list(FastLoader(path, "train", **kw))
    hooked = list(FastLoader(path, "train", batch_transform=upside_down, columns="index", **kw))
    assert len(calls) == len(plain) == len(hooked) == 7  # 120 samples, drop_last (split "train")
    assert set(calls) == {(torch.float32, "cpu")}  # normalized, on the loader's device
    for (x, y), b in zip(plain, hooked):
        assert torch.equal(b.images, x.flip(2)) and torch.equal(b.labels, y + 1000)
    with pytest.raises(TypeError, match=r"batch_transform .* returned Tensor: it must return \(images, labels\)"):
        next(iter(FastLoader(path, "train", batch_transform=lambda x, y: x, **kw)))
    with pytest.raises(TypeError, match="batch_transform=3 is invalid: allowed a callable"):
        FastLoader(path, "train", batch_transform=3)


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_resume_mid_epoch_with_every_option(labelled_colors, backend):
    """Subset, repeated augmentation, a set resolution and MixUp: the batches after a resume are
    those of the uninterrupted run, bit for bit."""
    spec = PreprocessSpec.preset("imagenet").replace(mixup=PreprocessSpec.from_timm(
        {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}, train=True).mixup)

    def make():
        loader = FastLoader(labelled_colors[BACKEND_FORMAT[backend]], "train", batch_size=8, spec=spec,
                            backend=backend, num_workers=2, seed=6, indices=range(0, 120, 2), classes=None,
                            repeated_augmentation=2, columns="index")
        loader.set_resolution(96)
        return loader

    run = make()
    run.set_epoch(1)
    it = iter(run)
    first = [next(it) for _ in range(3)]
    state = run.state_dict()
    rest = list(it)
    resumed = make()
    resumed.load_state_dict(state)
    again = list(resumed)
    assert len(first) + len(again) == len(run) == 7 and len(again) == len(rest)
    for a, b in zip(rest, again):
        assert a.images.shape[-1] == 96
        assert all(torch.equal(x, y) for x, y in zip(a, b))
