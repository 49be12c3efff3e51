"""timm's policies by timm's semantics: every kernel against PIL (what timm runs) on real photos,
timm's level-to-argument rules, and the draws' distributions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from conftest import needs_shared
from fastload import Manifest
from fastload.pipelines import timm_augment as T
from fastload.pipelines.augment import rotate_matrix, shear_matrix, translate_matrix
from fastload.formats.records import SplitReader
from fastload.spec import TimmAutoAugment, TimmRandAugment
from ks import ks_2samp_pvalue

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean
PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@pytest.fixture(scope="module")
def photos(imagenet_dirs):
    reader = SplitReader(Manifest.read(imagenet_dirs["tfrecord"]), "validation")
    images = [reader.image(i).resize((112, 96)) for i in range(0, 200, 13)]
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() for im in images])
    return images, x


def _pil(images, fn):
    return torch.stack([torch.from_numpy(np.array(fn(im))).permute(2, 0, 1).float() for im in images])


@needs_shared
@pytest.mark.parametrize("factor", [0.1, 0.55, 1.0, 1.37, 1.9])
def test_enhance_kernels_are_pils(photos, factor):
    images, x = photos
    n = len(images)
    for kernel, enhance in ((T.color, ImageEnhance.Color), (T.contrast, ImageEnhance.Contrast),
                            (T.brightness, ImageEnhance.Brightness), (T.sharpness, ImageEnhance.Sharpness)):
        assert torch.equal(kernel(x, [factor] * n), _pil(images, lambda im: enhance(im).enhance(factor))), kernel


@needs_shared
def test_pointwise_kernels_are_pils(photos):
    images, x = photos
    n = len(images)
    assert (T.autocontrast(x) - _pil(images, ImageOps.autocontrast)).abs().max() <= 1  # float rounding at .999..
    assert torch.equal(T.OPS["Equalize"](x, None, FILL, None), _pil(images, ImageOps.equalize))
    assert torch.equal(T.OPS["Invert"](x, None, FILL, None), _pil(images, ImageOps.invert))
    for bits in (1, 4, 7, 8):
        want = _pil(images, lambda im: im if bits >= 8 else ImageOps.posterize(im, bits))  # timm's posterize
        assert torch.equal(T.OPS["Posterize"](x, [bits] * n, FILL, None), want), bits
    # 0 bits (PosterizeIncreasing at m10): black, as Pillow < 13 made it (Pillow 13 refuses 0)
    assert (T.OPS["Posterize"](x, [0] * n, FILL, None) == 0).all()
    for thresh in (0, 77, 128, 256):
        assert torch.equal(T.OPS["Solarize"](x, [thresh] * n, FILL, None),
                           _pil(images, lambda im: ImageOps.solarize(im, thresh))), thresh
    for add in (0, 33, 110):  # timm's solarize_add: a lookup table below 128
        lut = [min(255, i + add) if i < 128 else i for i in range(256)] * 3
        assert torch.equal(T.OPS["SolarizeAdd"](x, [add] * n, FILL, None), _pil(images, lambda im: im.point(lut)))


@needs_shared
@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_geometric_kernels_are_pils(photos, resample):
    """Rotate, shear and translate as timm calls PIL: ``rotate(deg, resample, fillcolor)`` and
    ``transform(AFFINE, ...)``; at most 1 level off at a few pixels (double rounding of the
    source position), exact elsewhere."""
    images, x = photos
    n, (w, h) = len(images), images[0].size
    r = PIL_RESAMPLE[resample]
    cases = [(rotate_matrix(d, h, w), lambda im, d=d: im.rotate(d, resample=r, fillcolor=FILL)) for d in (-27.5, 11.0)]
    cases += [(shear_matrix(s, 0.0), lambda im, s=s: im.transform(im.size, Image.AFFINE, (1, s, 0, 0, 1, 0),
                                                                   resample=r, fillcolor=FILL)) for s in (-0.3, 0.17)]
    cases += [(shear_matrix(0.0, s), lambda im, s=s: im.transform(im.size, Image.AFFINE, (1, 0, 0, s, 1, 0),
                                                                   resample=r, fillcolor=FILL)) for s in (0.25,)]
    cases += [(translate_matrix(p * w, 0.0), lambda im, p=p: im.transform(im.size, Image.AFFINE, (1, 0, p * w, 0, 1, 0),
                                                                          resample=r, fillcolor=FILL))
              for p in (-0.45, 0.2)]
    for matrix, fn in cases:
        diff = (T.pil_affine(x, [matrix] * n, FILL, resample) - _pil(images, fn)).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (matrix, diff.max())


def test_level_arguments_are_timms():
    lv = np.array([0.0, 2.5, 9.0, 10.0])
    neg = np.array([False, True, False, True])
    assert np.allclose(T.level_args("Rotate", lv, neg), [0.0, -7.5, 27.0, -30.0])
    assert np.allclose(T.level_args("ShearX", lv, neg), [0.0, -0.075, 0.27, -0.3])
    assert np.allclose(T.level_args("TranslateXRel", lv, neg), [0.0, -0.1125, 0.405, -0.45])
    assert np.allclose(T.level_args("Color", lv, neg), [0.1, 0.55, 1.72, 1.9])
    assert np.allclose(T.level_args("ColorIncreasing", lv, neg), [1.0, 0.775, 1.81, 0.1])
    assert T.level_args("Posterize", lv, neg).tolist() == [0, 1, 3, 4]
    assert T.level_args("PosterizeIncreasing", lv, neg).tolist() == [4, 3, 1, 0]
    assert T.level_args("PosterizeOriginal", lv, neg).tolist() == [4, 5, 7, 8]
    assert T.level_args("Solarize", lv, neg).tolist() == [0, 64, 230, 256]
    assert T.level_args("SolarizeIncreasing", lv, neg).tolist() == [256, 192, 26, 0]
    assert T.level_args("SolarizeAdd", lv, neg).tolist() == [0, 27, 99, 110]


def test_randaugment_draws_are_timms():
    """Ops uniform over timm's 15 (with replacement), each applied with p 0.5, magnitude
    N(9, 0.5) clipped to [0, 10], signs fair; '-inc1' swaps in the Increasing variants."""
    n = 20000
    policy = TimmRandAugment(magnitude=9.0, num_ops=2, magnitude_std=0.5)
    slots = T.sample_timm_policy(np.random.default_rng(0), policy, n, "bicubic")
    assert len(slots) == 2
    names, args, how = slots[0]
    applied = names != "Identity"
    assert abs(applied.mean() - 0.5) < 0.015 and set(how) == {"bicubic"}
    counts = {op: int((names == op).sum()) for op in T.RAND_OPS}
    assert set(names[applied]) == set(T.RAND_OPS)
    assert all(abs(c / applied.sum() - 1 / 15) < 0.01 for c in counts.values()), counts
    rot = args[names == "Rotate"]
    level = np.abs(rot) / 30.0 * 10.0
    ref = np.clip(np.random.default_rng(1).normal(9.0, 0.5, len(level)), 0, 10)
    assert ks_2samp_pvalue(level, ref) > 0.001 and level.max() <= 10.0
    assert abs((rot < 0).mean() - 0.5) < 0.05
    inc = T.sample_timm_policy(np.random.default_rng(0), TimmRandAugment(9.0, increasing=True), 2000, None)
    assert set(inc[0][0]) - {"Identity"} == set(T.RAND_INCREASING_OPS)
    assert set(inc[0][2]) == {"bilinear", "bicubic"}  # timm's random choice when no interpolation is given
    weighted = T.sample_timm_policy(np.random.default_rng(0), TimmRandAugment(9.0, weights=0, prob=1.0), 5000, None)
    both = np.stack([weighted[0][0], weighted[1][0]], 1)
    assert (both[:, 0] != both[:, 1]).all() and not np.isin(both, ["Posterize", "Invert"]).any()  # p = 0, no repeats
    assert abs((both == "Rotate").mean() * 2 / 2 - 0.3) < 0.03


def test_autoaugment_picks_a_sub_policy_and_its_probabilities():
    n = 30000
    slots = T.sample_timm_policy(np.random.default_rng(4), TimmAutoAugment("v0"), n, "bilinear")
    first, second = slots[0][0], slots[1][0]
    # sub-policy 15 is (Rotate 1.0, 7), (TranslateYRel 0.8, 9): TranslateYRel appears only there
    ty = second == "TranslateYRel"
    assert abs(ty.mean() - 0.8 / 25) < 0.004
    rot_args = slots[0][1][first == "Rotate"]
    assert set(np.round(np.abs(rot_args), 6)) <= {round(m / 10 * 30, 6) for m in (8, 0, 7, 9, 2, 5)}


@needs_shared
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_timm_randaugment_through_fastloader(imagenet_dirs, backend):
    from fastload import FastLoader, PreprocessSpec
    spec = PreprocessSpec.from_timm({"input_size": (3, 160, 160), "interpolation": "bicubic",
                                     "aa": "rand-m9-mstd0.5-inc1"}, train=True)
    fmt = "beton" if backend == "ffcv" else "tfrecord"
    kw = dict(batch_size=50, spec=spec, backend=backend, num_workers=2, seed=3, drop_last=False)
    plain = FastLoader(imagenet_dirs[fmt], "validation", **{**kw, "spec": spec.replace(auto_augment=None)})
    augmented = FastLoader(imagenet_dirs[fmt], "validation", **kw)
    # (the plain spec normalizes inside the backend: float32 ulps from the batch ops' result)
    changed = [((a - b).abs().flatten(1).amax(1) > 1e-3).float().mean() for (a, _), (b, _) in zip(augmented, plain)]
    assert 0.5 < float(torch.stack(changed).mean()) < 1.0  # most images touched (2 ops at p 0.5), not all
