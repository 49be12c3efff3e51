"""Augmentations: each kernel against a direct reference on fixed parameters, the sampled
parameters' distributions, MixUp/CutMix, determinism and ranges, through FastLoader too."""
from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fastload import FastLoader, PreprocessSpec
from fastload.pipelines import augment as A
from fastload.pipelines.mixing import cutmix_box, mix_batch, sample_mix
from fastload.spec import AutoAugment, ColorJitter, Mixup, RandAugment, TrivialAugmentWide

RNG = np.random.default_rng(0)


def _photo(n=3, h=24, w=32, seed=0) -> torch.Tensor:
    """Smooth images with a few edges, values 0..255 (NCHW float)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    imgs = []
    for _ in range(n):
        a, b, c = rng.uniform(0.5, 6, 3)
        img = np.stack([128 + 100 * np.sin(xx / a + c), 128 + 100 * np.cos(yy / b), (xx * 7 + yy * 3) % 256], 0)
        imgs.append(np.clip(img, 0, 255).round())
    return torch.tensor(np.stack(imgs), dtype=torch.float32)


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy().astype(np.uint8))


def _np(im: Image.Image) -> np.ndarray:
    return np.asarray(im).transpose(2, 0, 1).astype(np.float64)


GRAY = np.array(A.GRAY).reshape(3, 1, 1)


# --------------------------------------------------------------------------- kernels on fixed parameters
def test_brightness_contrast_saturation_match_torchvision_formulas():
    x = _photo()
    f = np.array([0.5, 1.0, 1.7])
    for i in range(3):
        img = x[i].numpy().astype(np.float64)
        gray = (img * GRAY).sum(0)
        want_b = np.clip(np.round(f[i] * img), 0, 255)
        want_c = np.clip(np.round(f[i] * img + (1 - f[i]) * gray.mean()), 0, 255)
        want_s = np.clip(np.round(f[i] * img + (1 - f[i]) * gray[None]), 0, 255)
        assert np.abs(A.adjust_brightness(x, f)[i].numpy() - want_b).max() <= 1
        assert np.abs(A.adjust_contrast(x, f)[i].numpy() - want_c).max() <= 1
        assert np.abs(A.adjust_saturation(x, f)[i].numpy() - want_s).max() <= 1


def test_hue_matches_colorsys():
    x = _photo(2, 6, 7)
    hue = np.array([0.1, -0.25])
    out = A.adjust_hue(x, hue).numpy()
    for i in range(2):
        for yy in range(6):
            for xx in range(7):
                r, g, b = (x[i, :, yy, xx].numpy() / 255).tolist()
                h, s, v = colorsys.rgb_to_hsv(r, g, b)
                want = np.array(colorsys.hsv_to_rgb((h + hue[i]) % 1.0, s, v)) * 255
                assert np.abs(out[i, :, yy, xx] - np.round(want)).max() <= 1


def test_point_ops_match_pil_imageops():
    x = _photo()
    im = _pil(x[0])
    one = x[:1]
    assert np.array_equal(A.posterize(one, np.array([3]))[0].numpy(), _np(ImageOps.posterize(im, 3)))
    assert np.array_equal(A.solarize(one, np.array([100.0]))[0].numpy(), _np(ImageOps.solarize(im, 100)))
    assert np.array_equal(A.invert(one)[0].numpy(), _np(ImageOps.invert(im)))
    assert np.array_equal(A.equalize(one)[0].numpy(), _np(ImageOps.equalize(im)))
    assert np.abs(A.autocontrast(one)[0].numpy() - _np(ImageOps.autocontrast(im))).max() <= 1
    flat = torch.full((1, 3, 4, 4), 77.0)
    assert torch.equal(A.equalize(flat), flat) and torch.equal(A.autocontrast(flat), flat)


def test_sharpness_matches_direct_convolution():
    x = _photo(1)
    img = x[0].numpy().astype(np.float64)
    k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    smooth = img.copy()
    for c in range(3):
        for yy in range(1, img.shape[1] - 1):
            for xx in range(1, img.shape[2] - 1):
                smooth[c, yy, xx] = np.round((img[c, yy - 1:yy + 2, xx - 1:xx + 2] * k).sum())
    want = np.clip(np.round(1.8 * img + (1 - 1.8) * smooth), 0, 255)
    assert np.abs(A.adjust_sharpness(x, np.array([1.8]))[0].numpy() - want).max() <= 1


@pytest.mark.parametrize("kind,magnitude", [("ShearX", 0.3), ("ShearY", -0.2), ("TranslateX", 7.0),
                                            ("TranslateY", -5.0), ("Rotate", 25.0), ("Rotate", -90.0)])
def test_geometric_ops_match_pil_with_mean_fill(kind, magnitude):
    x = _photo(1, 30, 40)
    fill = (124, 116, 104)
    out = A.OPS[kind](x, np.array([magnitude]), fill)[0].numpy()
    im = _pil(x[0])
    if kind == "Rotate":
        want = im.rotate(magnitude, Image.NEAREST, fillcolor=fill)
    else:
        data = {"ShearX": (1, magnitude, 0, 0, 1, 0), "ShearY": (1, 0, 0, magnitude, 1, 0),
                "TranslateX": (1, 0, magnitude, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, magnitude)}[kind]
        want = im.transform(im.size, Image.AFFINE, data, Image.NEAREST, fillcolor=fill)
    mismatch = (np.abs(out - _np(want)).max(axis=0) > 0).mean()
    assert mismatch < 0.02, mismatch  # only pixels whose source lands exactly on a cell border
    assert (out == np.array(fill).reshape(3, 1, 1)).all(axis=0).any()  # uncovered pixels get the mean pixel


# --------------------------------------------------------------------------- parameter distributions
def test_color_jitter_parameters_follow_torchvision():
    cj = ColorJitter(0.4, 0.3, 1.5, 0.1)
    p = A.sample_color_jitter(np.random.default_rng(1), cj, 20000)
    for name, v in (("brightness", 0.4), ("contrast", 0.3)):
        f = p[name]
        assert f.min() >= 1 - v and f.max() <= 1 + v and abs(f.mean() - 1) < 0.01
    assert p["saturation"].min() >= 0.0 and abs(p["saturation"].mean() - 1.25) < 0.02  # [max(0, 1-1.5), 2.5]
    assert np.abs(p["hue"]).max() <= 0.1 and abs(p["hue"].mean()) < 0.003
    # the four ops in a uniformly random order
    firsts = np.bincount(p["order"][:, 0], minlength=4) / 20000
    assert np.abs(firsts - 0.25).max() < 0.02
    assert (np.sort(p["order"], axis=1) == np.arange(4)).all()
    assert A.sample_color_jitter(np.random.default_rng(1), ColorJitter(0.4), 5)["hue"] is None


def test_randaugment_ops_uniform_and_magnitude_noise():
    n = 20000
    slots = A.sample_policy_ops(np.random.default_rng(2), RandAugment(2, 27.0, 1.5), n, 224, 224)
    assert len(slots) == 2
    names, mags = slots[0]
    counts = {op: int((names == op).sum()) for op in A.RAND_OPS}
    expected = n / len(A.RAND_OPS)
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values()), counts
    rot = np.abs(mags[names == "Rotate"])
    # magnitude 27 of 30 -> 27 degrees, with N(0, 1.5 bins) noise = 1.5 degrees
    assert abs(rot.mean() - 27.0) < 0.3 and 1.2 < rot.std() < 1.8
    assert rot.max() <= 30.0
    signs = np.sign(mags[names == "ShearX"])
    assert abs((signs > 0).mean() - 0.5) < 0.05
    fixed = A.sample_policy_ops(np.random.default_rng(2), RandAugment(1, 9.0), 1000, 224, 224)[0]
    assert np.allclose(np.abs(fixed[1][fixed[0] == "Rotate"]), 9.0)  # torchvision: bin 9 of linspace(0, 30, 31)


def test_trivialaugment_levels_uniform_and_autoaugment_policy():
    n = 20000
    (names, mags), = A.sample_policy_ops(np.random.default_rng(3), TrivialAugmentWide(), n, 224, 224)
    rot = np.abs(mags[names == "Rotate"])
    assert rot.max() <= 135.0 and abs(rot.mean() - 67.5) < 3
    aa = A.sample_policy_ops(np.random.default_rng(3), AutoAugment(), n, 224, 224)
    assert len(aa) == 2
    first = aa[0][0]
    # ("Equalize", 0.8) first in sub-policies 2 and 24 of 25; "Posterize" (0.4/0.6/0.8) in 0, 3, 7
    assert abs((first == "Posterize").mean() - (0.4 + 0.6 + 0.8) / 25) < 0.01
    assert set(first) <= set(A.OPS)


# --------------------------------------------------------------------------- mixing
def test_cutmix_box_weight_is_clipped_area():
    rng = np.random.default_rng(4)
    for _ in range(200):
        lam = rng.uniform(0, 1)
        y0, y1, x0, x1 = cutmix_box(rng, 20, 30, lam)
        assert 0 <= y0 <= y1 <= 20 and 0 <= x0 <= x1 <= 30
    mix = Mixup(cutmix_alpha=1.0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 20, 30).contiguous()
    y = torch.eye(4)
    for seed in range(20):
        p = sample_mix(np.random.default_rng(seed), mix, 4, 20, 30)
        mx, my = mix_batch(x, y, mix, np.random.default_rng(seed))
        y0, y1, x0, x1 = p.boxes[0]
        lam = p.lam[0]
        pasted = (mx[0, 0] == 3).float().mean().item()  # row 0 receives row 3's pixels in the box
        assert p.cutmix.all() and pasted == pytest.approx((y1 - y0) * (x1 - x0) / 600)
        assert my[0, 0].item() == pytest.approx(lam) and my[0, 3].item() == pytest.approx(1 - lam)
        assert lam == pytest.approx(1 - pasted)
    assert torch.equal(x[:, 0, 0, 0], torch.arange(4, dtype=torch.float32))  # input untouched


def test_mixup_blend_and_rows_sum_to_one_with_smoothing():
    mix = Mixup(mixup_alpha=0.4, label_smoothing=0.1)
    x = _photo(4)
    y = torch.full((4, 10), 0.01)
    y[torch.arange(4), torch.tensor([1, 2, 3, 4])] = 0.91
    p = sample_mix(np.random.default_rng(9), mix, 4, 24, 32)
    lam = float(p.lam[0])
    mx, my = mix_batch(x, y, mix, np.random.default_rng(9))
    assert not p.cutmix.any() and (p.lam == lam).all()
    assert torch.allclose(mx, lam * x + (1 - lam) * x.flip(0))
    assert torch.allclose(my.sum(1), torch.ones(4))
    lams = [sample_mix(np.random.default_rng(s), mix, 2, 8, 8).lam[0] for s in range(4000)]
    assert abs(np.mean(lams) - 0.5) < 0.02 and abs(np.var(lams) - 1 / (4 * (2 * 0.4 + 1))) < 0.01  # Beta(a, a)
    switch = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.3)
    cuts = [sample_mix(np.random.default_rng(s), switch, 2, 8, 8).cutmix[0] for s in range(4000)]
    assert abs(np.mean(cuts) - 0.3) < 0.03
    off = Mixup(mixup_alpha=1.0, prob=0.0)
    assert sample_mix(np.random.default_rng(0), off, 2, 8, 8) is None


@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_mixing_per_element_and_per_pair_is_timms(mode):
    """Each row mixes with row N-1-i by its own draw ('elem') or its pair's ('pair', mirrored):
    MixUp rows blend, CutMix rows paste their box, labels weigh by the row's exact lam."""
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, mode=mode)
    n = 9  # odd: 'pair' leaves the middle row as it is
    x = _photo(n)
    y = torch.nn.functional.one_hot(torch.arange(n), n).float()
    for seed in range(30):
        p = sample_mix(np.random.default_rng(seed), mix, n, 24, 32)
        mx, my = mix_batch(x, y, mix, np.random.default_rng(seed))
        for i in range(n):
            j, lam = n - 1 - i, float(p.lam[i])
            if p.cutmix[i]:
                y0, y1, x0, x1 = p.boxes[i]
                want = x[i].clone()
                want[:, y0:y1, x0:x1] = x[j, :, y0:y1, x0:x1]
                assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (24 * 32))
            else:
                want = x[i] if lam == 1 else x[i] + (1 - lam) * (x[j] - x[i])
            assert torch.allclose(mx[i], want, atol=1e-4), (seed, i)
            assert my[i, i].item() == pytest.approx(lam if i != j else 1.0, abs=1e-6)
        if mode == "pair":
            assert np.array_equal(p.lam, p.lam[::-1]) and p.lam[n // 2] == 1.0
    lams = np.concatenate([sample_mix(np.random.default_rng(s), Mixup(mixup_alpha=0.4, mode="elem"), 64, 8, 8).lam
                           for s in range(100)])
    assert abs(np.mean(lams) - 0.5) < 0.02 and len(set(lams.tolist())) > 6000  # a draw per row


def test_random_erasing_is_timms():
    """Box sizes and counts follow timm's draws; 'const' zeroes (the mean after normalization),
    'rand' one value per channel, 'pixel' per pixel; prob is per sample."""
    from fastload.pipelines.erasing import apply_erasing, sample_erasing
    from fastload.spec import RandomErasing
    re = RandomErasing(prob=0.5, mode="pixel", count=3)
    rng = np.random.default_rng(0)
    erased, areas, counts = 0, [], []
    for _ in range(400):
        p = sample_erasing(rng, re, 8, 40, 50)
        per_sample = np.bincount([b[0] for b in p.boxes], minlength=8)
        erased += (per_sample > 0).sum()
        counts += per_sample[per_sample > 0].tolist()
        for i, top, left, h, w in p.boxes:
            assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 50 and h < 40 and w < 50
            areas.append(h * w * per_sample[i] / (40 * 50))  # area scaled back by the sample's count
    assert abs(erased / 3200 - 0.5) < 0.03
    assert set(counts) == {1, 2, 3}  # count ~ U{1..3} (a box may miss its 10 tries only rarely)
    assert 0.02 * 0.8 < np.median(areas) < 1 / 3 and min(areas) > 0.005
    x = torch.randn(8, 3, 40, 50)
    for mode in ("const", "rand", "pixel"):
        p = sample_erasing(np.random.default_rng(3), RandomErasing(prob=1.0, mode=mode), 8, 40, 50)
        out = apply_erasing(x.clone(), p, mode)
        for i, top, left, h, w in p.boxes:
            box = out[i, :, top:top + h, left:left + w]
            if mode == "const":
                assert (box == 0).all()
            elif mode == "rand":
                assert (box == box[:, :1, :1]).all() and not torch.equal(box, x[i, :, top:top + h, left:left + w])
            else:
                assert box.std() > 0.5 and abs(box.mean()) < 0.5
        outside = torch.ones_like(x, dtype=torch.bool)
        for i, top, left, h, w in p.boxes:
            outside[i, :, top:top + h, left:left + w] = False
        assert torch.equal(out[outside], x[outside])
        assert torch.equal(out, apply_erasing(x.clone(), p, mode))  # the noise is a function of the params


# --------------------------------------------------------------------------- through FastLoader
AUG_SPEC = PreprocessSpec.preset("imagenet", train=True).replace(
    color_jitter=ColorJitter(0.4, 0.4, 0.4, 0.1), auto_augment=RandAugment(2, 27.0, 1.5),
    mixup=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1))


@pytest.mark.parametrize("backend", ["dali", "reference", "ffcv"])
def test_augmented_batches_deterministic_soft_labels(color_loaders_aug, backend):
    loader = color_loaders_aug[backend]
    loader.set_epoch(0)
    a = [(x, y) for x, y in loader]
    loader.set_epoch(0)
    b = [(x, y) for x, y in loader]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = a[0]
    assert x.shape == (16, 3, 224, 224) and y.shape == (16, 64) and y.dtype == torch.float32
    assert torch.allclose(y.sum(1), torch.ones(16), atol=1e-5)
    assert (y.max(1).values < 0.95).all()  # smoothed and mixed


@pytest.fixture(scope="session")
def color_loaders_aug(labelled_colors):
    fmt = {"ffcv": "beton", "dali": "tfrecord", "reference": "tfrecord"}
    return {b: FastLoader(labelled_colors[f], "train", batch_size=16, spec=AUG_SPEC, backend=b, num_workers=2,
                          seed=1, drop_last=True) for b, f in fmt.items()}


def test_augmented_values_stay_in_range_and_backends_agree(color_loaders_aug):
    outs = {}
    for b, loader in color_loaders_aug.items():
        loader.set_epoch(1)
        outs[b] = next(iter(loader))
    t = color_loaders_aug["reference"].transform
    for b, (x, y) in outs.items():
        levels = (x + t.shift) / t.scale
        assert levels.min() >= -1e-3 and levels.max() <= 255 + 1e-3
        assert torch.equal(y, outs["reference"][1])  # same seed: same labels, same mixing
    assert (outs["dali"][0] - outs["reference"][0]).abs().mean() * 255 * 0.226 < 2.0


def test_uint8_output_with_policy_keeps_levels(labelled_colors):
    spec = PreprocessSpec.preset("imagenet", train=True).replace(dtype="uint8", auto_augment=TrivialAugmentWide(),
                                                                 color_jitter=ColorJitter(0.5))
    loader = FastLoader(labelled_colors["tfrecord"], "train", batch_size=16, spec=spec, backend="dali", num_workers=1)
    x, y = next(iter(loader))
    assert x.dtype == torch.uint8 and y.dtype == torch.int64


def test_invalid_augmentation_combinations_are_refused():
    with pytest.raises(ValueError, match="dtype='uint8' is invalid: allowed float32 or float16 when MixUp"):
        PreprocessSpec.preset("imagenet", True).replace(dtype="uint8", mixup=Mixup(cutmix_alpha=1.0))


def test_mixing_multilabel_batches(tmp_path):
    from conftest import coco_dataset, save_splits
    from fastload import convert
    ds = coco_dataset(12)
    convert(str(save_splits(tmp_path / "src", train=ds)), tmp_path / "out", format="tfrecord", progress=False, shuffle_seed=None)
    spec = PreprocessSpec.preset("coco", train=True).replace(mixup=Mixup(mixup_alpha=1.0))
    loader = FastLoader(tmp_path / "out", "train", batch_size=6, spec=spec, backend="reference", num_workers=0,
                        order="sequential", drop_last=True)
    from fastload.pipelines.sampling import augment_rng
    rng = augment_rng(seed=0, epoch=0, rank=0, batch=0)  # FastLoader's stream for its first batch
    lam = float(sample_mix(rng, spec.mixup, 6, 224, 224).lam[0])
    (x, y), _ = list(loader)
    hot = torch.zeros(6, 80)
    for i, objs in enumerate(ds["objects"][:6]):
        hot[i, sorted(set(objs["category"]))] = 1
    assert y.shape == (6, 80) and torch.allclose(y, lam * hot + (1 - lam) * hot.flip(0))
