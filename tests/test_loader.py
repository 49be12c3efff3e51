"""FastLoader and the three backends: fidelity, epochs, determinism, pairing, distributed, errors."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (BACKEND_FORMAT, MEAN255, ROOT, STD255, coco_dataset, color_label, needs_shared, save_splits,
                      torchrun)
from fastload import FastLoader, PreprocessSpec, convert
from fastload.spec import RandomCrop
from fastload.formats.manifest import DatasetError
from fastload.pipelines.orders import global_order
from fastload.pipelines.sampling import FLIP, H, TOP, W, X0, Y0, geometry_params



def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Back to 0..255 levels (ImageNet normalization undone)."""
    return x.float() * STD255 + MEAN255 if x.is_floating_point() else x.float()


def _kernel_geometry(backend: str) -> bool:
    """Backends whose decode and geometry are PIL's arithmetic on device='cpu' (these tests' device):
    ffcv, and DALI (on device='cuda' it decodes with nvJPEG and resamples itself)."""
    return backend in ("ffcv", "dali")


def _all(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="session")
def imagenet_outputs(imagenet_dirs):
    """Every backend over the ImageNet sample, eval and train spec, same seed (one compile each)."""
    out = {}
    for spec_name in ("imagenet:eval", "imagenet:train"):
        for backend, fmt in BACKEND_FORMAT.items():
            loader = FastLoader(imagenet_dirs[fmt], "validation", batch_size=64, spec=spec_name, backend=backend,
                                num_workers=2, order="sequential", drop_last=False, seed=7)
            out[(spec_name, backend)] = _all(loader)
    return out


# --------------------------------------------------------------------------- fidelity
@needs_shared
@pytest.mark.parametrize("spec_name", ["imagenet:eval", "imagenet:train"])
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_backends_match_the_reference(imagenet_outputs, spec_name, backend):
    """Same spec, same seed: the same pixels as torchvision-on-PIL (mean abs <= 2, per image <= 4)."""
    ref_x, ref_y = imagenet_outputs[(spec_name, "reference")]
    x, y = imagenet_outputs[(spec_name, backend)]
    assert x.shape == ref_x.shape == (200, 3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(y, ref_y)
    diff = (_pixels(x) - _pixels(ref_x)).abs()
    per_image = diff.mean(dim=(1, 2, 3))
    assert diff.mean() <= 2.0, diff.mean()
    assert per_image.max() <= 4.0, per_image.max()
    if _kernel_geometry(backend):  # PIL's decode and resample: exact but for Pillow 13's pass order (<= 1 level)
        assert diff.mean() <= 0.5 and diff.max() <= 1.0 + 1e-3, (diff.mean(), diff.max())


@needs_shared
@pytest.mark.parametrize("mode", ["edge", "reflect"])
def test_padding_that_mirrors_the_image_is_the_references(imagenet_dirs, mode):
    """RandomCrop with padding larger than the crop, edge or reflect: windows that lie wholly in the
    padding read the rows and columns it mirrors (decoded as the region those span), PIL's pixels."""
    spec = PreprocessSpec.preset("cifar10", train=True).replace(
        geometry=RandomCrop(64, padding=200, padding_mode=mode), dtype="uint8", normalize=PreprocessSpec().normalize)
    out = {b: _all(FastLoader(imagenet_dirs[BACKEND_FORMAT[b]], "validation", batch_size=50, spec=spec, backend=b,
                              num_workers=2, seed=5)) for b in ("ffcv", "reference")}
    assert torch.equal(out["ffcv"][0], out["reference"][0])


def test_dali_on_cpu_runs_without_numba(labelled_colors):
    """The DALI backend calls fastload's C kernel through ctypes: a fresh process neither imports
    nor initializes numba (0.45 s of start-up) to produce its batches."""
    code = ("import sys; from fastload import FastLoader; "
            f"x, _ = next(iter(FastLoader({str(labelled_colors['tfrecord'])!r}, 'train', batch_size=8, "
            "backend='dali', num_workers=1))); "
            "assert x.shape == (8, 3, 224, 224), x.shape; "
            "assert 'numba' not in sys.modules, sorted(m for m in sys.modules if 'numba' in m)[:5]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@needs_shared
def test_dali_on_cpu_gives_the_ffcv_backends_batches(imagenet_outputs, imagenet_dirs):
    """DALI's CPU decode of each window's source region is PIL's, bit for bit, and fastload's kernel
    does the geometry: the same batches as the ffcv backend, for every geometry and output."""
    for spec_name in ("imagenet:eval", "imagenet:train"):
        assert torch.equal(imagenet_outputs[(spec_name, "dali")][0], imagenet_outputs[(spec_name, "ffcv")][0])
    cifar_crop = PreprocessSpec.preset("cifar10", train=True)  # RandomCrop(32, padding=4): windows in padding
    for spec in (PreprocessSpec.preset("imagenet", train=True).replace(dtype="uint8"), cifar_crop,
                 cifar_crop.replace(geometry=RandomCrop(64, padding=200))):
        out = {b: _all(FastLoader(imagenet_dirs[BACKEND_FORMAT[b]], "validation", batch_size=50, spec=spec,
                                  backend=b, num_workers=2, seed=5)) for b in ("dali", "ffcv")}
        assert torch.equal(out["dali"][1], out["ffcv"][1])
        assert out["dali"][0].dtype == out["ffcv"][0].dtype and torch.equal(out["dali"][0], out["ffcv"][0])


@needs_shared
def test_reference_is_torchvision_resize_centercrop(imagenet_dirs, imagenet_source):
    """The reference itself, spelled out against PIL: Resize(256) short side, int() long side,
    CenterCrop offsets int(round((h - 224) / 2)), antialiased bilinear."""
    from PIL import Image
    spec = PreprocessSpec.preset("imagenet", train=False).replace(dtype="uint8")
    loader = FastLoader(imagenet_dirs["tfrecord"], "validation", batch_size=8, spec=spec, backend="reference",
                        num_workers=0, order="sequential", drop_last=False)
    x, _ = next(iter(loader))
    for i in range(8):
        im = imagenet_source[i]["image"].convert("RGB")
        w, h = im.size
        nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        im = im.resize((nw, nh), Image.BILINEAR)
        top, left = int(round((nh - 224) / 2)), int(round((nw - 224) / 2))
        want = np.asarray(im.crop((left, top, left + 224, top + 224)))
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), want)


def test_crop_sampling_follows_torchvision_get_params():
    """Two-sample KS tests of area fraction and log aspect ratio against an independent
    implementation of RandomResizedCrop.get_params; flips within 3 sigma of p."""
    from ks import ks_2samp_pvalue
    rng = np.random.default_rng(0)
    n = 3000
    heights = rng.integers(200, 600, n)
    widths = rng.integers(200, 600, n)
    spec = PreprocessSpec.preset("imagenet", train=True)
    p = geometry_params(spec.geometry, 0.5, heights, widths, seed=1, epoch=0)
    ours_area = p[:, H] * p[:, W] / (heights * widths)
    ours_ratio = np.log(p[:, W] / p[:, H])
    py = random.Random(5)
    ref_area, ref_ratio = [], []
    for h, w in zip(heights.tolist(), widths.tolist()):
        i, j, ch, cw = _torchvision_get_params(py, h, w, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= i <= h - ch and 0 <= j <= w - cw
        ref_area.append(ch * cw / (h * w))
        ref_ratio.append(math.log(cw / ch))
    assert ks_2samp_pvalue(ours_area, np.array(ref_area)) > 0.01
    assert ks_2samp_pvalue(ours_ratio, np.array(ref_ratio)) > 0.01
    assert (p[:, Y0] >= 0).all() and (p[:, Y0] + p[:, H] <= heights).all()
    assert (p[:, X0] >= 0).all() and (p[:, X0] + p[:, W] <= widths).all()
    flips = p[:, FLIP].mean()
    assert abs(flips - 0.5) <= 3 * math.sqrt(0.25 / n)
    # a deliberately wrong sampler is caught by the same test
    wrong = rng.uniform(0.3, 1.0, n)
    assert ks_2samp_pvalue(wrong, np.array(ref_area)) < 0.01


def _torchvision_get_params(r: random.Random, height, width, scale, ratio):
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * r.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(r.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return r.randint(0, height - h), r.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# --------------------------------------------------------------------------- epochs and order
@pytest.fixture(scope="session")
def color_loaders(labelled_colors):
    """One shuffled train loader per backend over the colour-coded dataset."""
    return {b: FastLoader(labelled_colors[f], "train", batch_size=16, spec="imagenet:train", backend=b,
                          num_workers=2, seed=11, drop_last=False)
            for b, f in BACKEND_FORMAT.items()}


@pytest.mark.parametrize("backend", ["ffcv", "dali", "reference"])
def test_labels_stay_paired_with_images_shuffled(color_loaders, labelled_colors, backend):
    loader = color_loaders[backend]
    loader.set_epoch(0)
    x, y = _all(loader)
    assert len(y) == 120 and len(loader) == math.ceil(120 / 16)
    decoded = [color_label(m) for m in _pixels(x).mean(dim=(2, 3)).tolist()]
    assert decoded == y.tolist()
    assert sorted(y.tolist()) == sorted(labelled_colors["labels"].tolist())  # complete, no duplicates
    assert y.tolist() != labelled_colors["labels"].tolist()  # and shuffled


@pytest.mark.parametrize("backend", ["ffcv", "dali", "reference"])
def test_determinism_and_set_epoch(color_loaders, backend):
    loader = color_loaders[backend]
    loader.set_epoch(3)
    a = _all(loader)
    loader.set_epoch(3)
    b = _all(loader)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same order, same crops
    loader.set_epoch(4)
    c = _all(loader)
    assert not torch.equal(a[1], c[1])
    assert loader.epoch == 5  # a finished pass moves on by itself


def test_backends_agree_on_order_and_crops(color_loaders):
    outs = {}
    for b, loader in color_loaders.items():
        loader.set_epoch(2)
        outs[b] = _all(loader)
    for b in ("ffcv", "dali"):
        assert torch.equal(outs[b][1], outs["reference"][1])
        assert (_pixels(outs[b][0]) - _pixels(outs["reference"][0])).abs().mean() < 2.0


@pytest.mark.parametrize("backend", ["ffcv", "dali", "reference"])
def test_drop_last_and_len(labelled_colors, color_loaders, backend):
    keep = color_loaders[backend]
    assert len(keep) == 8 and [len(y) for _, y in keep][-1] == 120 - 7 * 16
    drop = FastLoader(labelled_colors[BACKEND_FORMAT[backend]], "train", batch_size=16, backend=backend,
                      spec="imagenet:train", num_workers=1, drop_last=True)
    sizes = [len(y) for _, y in drop]
    assert len(drop) == 7 and sizes == [16] * 7


def test_ffcv_drop_last_uses_fastload_order(labelled_colors):
    loader = FastLoader(labelled_colors["beton"], "train", batch_size=16, spec="imagenet:train", backend="ffcv",
                        num_workers=2, seed=11, drop_last=True)
    order, params = loader.epoch_plan()
    batches = [i for _, i in loader.pipeline.run_epoch(order, params)]
    assert [len(i) for i in batches] == [16] * 7
    assert np.array_equal(np.concatenate(batches), order[:112])


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_batches_stay_valid_after_the_next_arrives(color_loaders, backend):
    """Pooled buffers (ffcv) and DALI's own output memory (no copy) alike: a batch the caller
    keeps is never overwritten by a later one."""
    loader = color_loaders[backend]
    loader.set_epoch(1)
    batches = [x for x, _ in loader]  # every batch kept alive at once
    copies = [b.clone() for b in batches]
    loader.set_epoch(1)
    again = [x for x, _ in loader]
    for kept, copy, fresh in zip(batches, copies, again):
        assert torch.equal(kept, copy) and torch.equal(kept, fresh)
    assert len({b.data_ptr() for b in batches}) == len(batches)  # no two batches share memory


def test_torch_threads_are_restored(labelled_colors, cpu_threads):
    torch.set_num_threads(2)
    loader = FastLoader(labelled_colors["beton"], "train", batch_size=32, backend="ffcv", num_workers=1,
                        spec="imagenet:train")
    assert torch.get_num_threads() == 2
    for _ in loader:
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


# --------------------------------------------------------------------------- distributed
def test_distributed_shares_from_torchrun_environment(labelled_colors, monkeypatch):
    labels = []
    orders = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        loader = FastLoader(labelled_colors["tfrecord"], "train", batch_size=16, backend="dali", num_workers=1,
                            spec="imagenet:train", drop_last=False)
        assert (loader.rank, loader.world_size) == (rank, 3) and loader.num_samples == 40
        orders.append(loader.epoch_plan()[0])
        x, y = _all(loader)
        assert [color_label(m) for m in _pixels(x).mean(dim=(2, 3)).tolist()] == y.tolist()
        labels += y.tolist()
    assert sorted(np.concatenate(orders).tolist()) == list(range(120))  # disjoint and complete
    assert sorted(labels) == sorted(labelled_colors["labels"].tolist())


def test_remainder_rule_is_distributed_samplers():
    # 10 samples over 4 ranks: padded to 12 (2 repeated) without drop_last, 8 with it
    def share(r, drop_last=False):
        g = global_order(10, kind="random", shuffle=True, seed=0, epoch=0, world_size=4, drop_last=drop_last)
        return g[r::4]
    shares = [share(r) for r in range(4)]
    assert [len(s) for s in shares] == [3] * 4
    flat = np.concatenate(shares)
    assert set(flat.tolist()) == set(range(10)) and len(flat) - len(set(flat.tolist())) == 2
    dropped = [share(r, drop_last=True) for r in range(4)]
    assert [len(s) for s in dropped] == [2] * 4 and len(set(np.concatenate(dropped).tolist())) == 8


@pytest.mark.slow
def test_torchrun_two_processes_gloo(labelled_colors, tmp_path):
    out = tmp_path / "rank"
    r = subprocess.run([*torchrun(2), str(ROOT / "tests" / "dist_worker.py"), str(labelled_colors["tfrecord"]), "dali",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{i}.json").read_text()) for i in range(2)]
    assert [(d["rank"], d["world"]) for d in ranks] == [(0, 2), (1, 2)]
    for epoch in ("epoch0", "epoch1"):
        orders = [d[epoch]["order"] for d in ranks]
        assert len(orders[0]) == len(orders[1]) == 60
        assert not set(orders[0]) & set(orders[1]) and sorted(orders[0] + orders[1]) == list(range(120))
        labels = ranks[0][epoch]["labels"] + ranks[1][epoch]["labels"]
        assert sorted(labels) == sorted(labelled_colors["labels"].tolist())
    assert ranks[0]["epoch0"]["order"] != ranks[0]["epoch1"]["order"]
    # the slowest rank is named on every rank (FastLoader.stats gathers the ranks' wait at the epoch's end)
    for d in ranks:
        s = d["stats"]
        assert len(s["rank_wait_fractions"]) == 2 and s["slowest_rank"] == 1, s
        assert s["verdict"].startswith("input-bound on rank 1: it waited for data"), s["verdict"]


# --------------------------------------------------------------------------- other schemas and presets
@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_coco_multilabel_batches(tmp_path, backend):
    ds = coco_dataset(12)
    src = save_splits(tmp_path / "src", train=ds)
    convert(str(src), tmp_path / "out", format="tfrecord", progress=False, shuffle_seed=None)
    loader = FastLoader(tmp_path / "out", "train", batch_size=5, backend=backend, num_workers=1, order="sequential",
                        drop_last=False)
    assert loader.spec == PreprocessSpec.preset("coco", train=True)
    _, y = _all(loader)
    assert y.shape == (12, 80) and y.dtype == torch.float32
    expected = torch.zeros(12, 80)
    for i, objs in enumerate(ds["objects"]):
        expected[i, sorted(set(objs["category"]))] = 1
    assert torch.equal(y, expected)


@needs_shared
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_cifar_preset_random_crop_padding(cifar_dirs, backend):
    loaders = {b: FastLoader(cifar_dirs[BACKEND_FORMAT[b]], "train", batch_size=100, backend=b, num_workers=2,
                             seed=5, drop_last=False) for b in (backend, "reference")}
    spec = loaders[backend].spec
    assert spec.geometry.padding == 4 and spec.size == (32, 32)
    (x, y), (rx, ry) = (next(iter(loaders[b])) for b in (backend, "reference"))
    assert x.shape == (100, 3, 32, 32) and torch.equal(y, ry)
    t = loaders[backend].transform
    px, prx = (x + t.shift) / t.scale, (rx + t.shift) / t.scale  # back to 0..255 with the dataset's stats
    assert (px - prx).abs().mean() < 2.0
    order, params = loaders[backend].epoch_plan(0)
    pads = [k for k in range(100) if params[k, TOP] < 0]  # window starts in the top padding
    assert pads and all(float(prx[k, :, 0, :].abs().max()) < 0.5 for k in pads)  # zero padding rows


# --------------------------------------------------------------------------- errors
def test_clear_errors(labelled_colors, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        FastLoader(tmp_path / "missing", "train")
    with pytest.raises(DatasetError, match=r"split 'valid' is not in .* it has \['train'\]"):
        FastLoader(labelled_colors["tfrecord"], "valid")
    with pytest.raises(DatasetError, match="backend='ffcv' needs a .beton dataset.*'tfrecord'"):
        FastLoader(labelled_colors["tfrecord"], "train", backend="ffcv")
    with pytest.raises(DatasetError, match="backend='dali' needs a TFRecord dataset.*'beton'"):
        FastLoader(labelled_colors["beton"], "train", backend="dali")
    with pytest.raises(ValueError, match="backend='torchvision' is invalid"):
        FastLoader(labelled_colors["beton"], "train", backend="torchvision")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda' was asked for but CUDA is not available"):
            FastLoader(labelled_colors["tfrecord"], "train", device="cuda")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            FastLoader(labelled_colors["tfrecord"], "train", device="cuda:1")
    spec = PreprocessSpec.preset("cifar10", True).replace(
        geometry=PreprocessSpec.preset("cifar10", True).geometry.__class__(32, 4, "reflect"))
    with pytest.raises(ValueError, match="random_crop.padding_mode='reflect' is not supported by backend 'dali'"):
        FastLoader(labelled_colors["tfrecord"], "train", spec=spec, backend="dali")


@needs_shared
@pytest.mark.slow
def test_train_cifar_learns(tmp_path):
    """The real client, scaled down: clearly above chance only if labels stay with images and
    normalization is right."""
    result = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_cifar.py"), "--backend", "dali", "--epochs", "2",
                        "--train-images", "2000", "--holdout", "500", "--cache", str(tmp_path / "cache"),
                        "--json", str(result)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    acc = json.loads(result.read_text())["accuracy"]
    assert acc >= 0.25, acc
