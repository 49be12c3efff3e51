"""The vocabulary of the preprocessing spec: each op as a validated, frozen value (geometry,
photometric, labels and batch, normalization), and the constants users choose from. The spec
(``spec.py``) composes them; policies (``policies.py``) and the timm dialect build on them.

Conventions (torchvision/timm): mean/std are in 0..1 units, sizes are (height, width) or one int
for a square, ``ratio`` is width/height.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

__all__ = ['IMAGENET_MEAN', 'IMAGENET_STD', 'DTYPES', 'LAYOUTS', 'INTERPOLATIONS', 'DEFAULT_INTERPOLATION',
           'PADDING_MODES', 'CROP_MODES', 'MIXUP_MODES', 'ERASING_MODES', 'AUTOAUGMENT_POLICIES', 'RandomResizedCrop',
           'RandomCrop', 'ResizeCenterCrop', 'GEOMETRIES', 'Geometry', 'resized_geometry', 'ProgressiveResolution',
           'ColorJitter', 'Mixup', 'RandomErasing', 'Normalize']

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DTYPES = ("uint8", "float32", "float16")
LAYOUTS = ("NCHW", "channels_last")
# PIL's filters (timm's names); every backend declares which it reproduces and refuses the rest
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
DEFAULT_INTERPOLATION = "bilinear"  # torchvision's
PADDING_MODES = ("constant", "edge", "reflect")
CROP_MODES = ("center", "squash")  # timm's eval crop modes fastload reproduces ('border' pads with the mean)
MIXUP_MODES = ("batch", "pair", "elem")
ERASING_MODES = ("const", "rand", "pixel")
AUTOAUGMENT_POLICIES = ("imagenet",)


def _fail(field_name: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"{field_name}={value!r} is invalid: allowed {allowed}")


def _real(value, field_name: str, allow_inf: bool = False) -> float:
    """A float; NaN (and inf unless allowed) is refused here, where it is given."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        _fail(field_name, value, "a number")
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        _fail(field_name, value, "a finite number")
    return v


def _int(value, field_name: str, minimum: int, allowed: str) -> int:
    """An int (not a bool) >= ``minimum``, else one line naming the field and ``allowed``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(field_name, value, allowed)
    return value


def _pair(value, field_name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        _fail(field_name, value, "an int or a (height, width) pair of ints")
    if min(value) <= 0:
        _fail(field_name, value, "sizes > 0")
    return (int(value[0]), int(value[1]))


def _float_pair(value, field_name: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        _fail(field_name, value, "a (min, max) pair")
    lo, hi = _real(value[0], field_name), _real(value[1], field_name)
    if lo > hi:
        _fail(field_name, value, "min <= max")
    return (lo, hi)


def _probability(value, field_name: str) -> float:
    value = _real(value, field_name)
    if not 0.0 <= value <= 1.0:
        _fail(field_name, value, "a probability in [0, 1]")
    return value


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision ``RandomResizedCrop``: sample area fraction and aspect ratio, then resize."""
    size: tuple[int, int] = (224, 224)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = DEFAULT_INTERPOLATION
    kind: Literal["random_resized_crop"] = "random_resized_crop"

    def __post_init__(self):
        object.__setattr__(self, "size", _pair(self.size, "random_resized_crop.size"))
        scale = _float_pair(self.scale, "random_resized_crop.scale")
        if not (0.0 < scale[0] and scale[1] <= 1.0):
            _fail("random_resized_crop.scale", self.scale, "0 < min <= max <= 1")
        object.__setattr__(self, "scale", scale)
        ratio = _float_pair(self.ratio, "random_resized_crop.ratio")
        if ratio[0] <= 0:
            _fail("random_resized_crop.ratio", self.ratio, "0 < min <= max")
        object.__setattr__(self, "ratio", ratio)
        if self.interpolation not in INTERPOLATIONS:
            _fail("random_resized_crop.interpolation", self.interpolation, f"one of {INTERPOLATIONS}")


@dataclass(frozen=True)
class RandomCrop:
    """CIFAR-style ``RandomCrop(size, padding)``: pad each side, crop at a random offset."""
    size: tuple[int, int] = (32, 32)
    padding: int = 4
    padding_mode: str = "constant"
    kind: Literal["random_crop"] = "random_crop"

    def __post_init__(self):
        object.__setattr__(self, "size", _pair(self.size, "random_crop.size"))
        _int(self.padding, "random_crop.padding", 0, "an int >= 0")
        if self.padding_mode not in PADDING_MODES:
            _fail("random_crop.padding_mode", self.padding_mode, f"one of {PADDING_MODES}")


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Eval geometry: ``Resize(resize)`` (shorter side) then ``CenterCrop(size)``.

    timm's ``crop_pct`` is ``size / resize``: see :meth:`from_crop_pct`. ``crop_mode`` is timm's:
    'center' resizes the shorter side to ``resize`` (aspect kept); 'squash' resizes both sides
    (a square ``resize`` x ``resize`` for a square crop; aspect not kept), then the centre crop.
    """
    size: tuple[int, int] = (224, 224)
    resize: int = 256
    interpolation: str = DEFAULT_INTERPOLATION
    crop_mode: str = "center"
    kind: Literal["resize_center_crop"] = "resize_center_crop"

    def __post_init__(self):
        object.__setattr__(self, "size", _pair(self.size, "resize_center_crop.size"))
        if not isinstance(self.resize, int) or self.resize <= 0:
            _fail("resize_center_crop.resize", self.resize, "an int > 0")
        if max(self.size) > self.resize:
            _fail("resize_center_crop.size", self.size,
                  f"a crop no larger than resize={self.resize} (crop larger than resize)")
        if self.interpolation not in INTERPOLATIONS:
            _fail("resize_center_crop.interpolation", self.interpolation, f"one of {INTERPOLATIONS}")
        if self.crop_mode not in CROP_MODES:
            _fail("resize_center_crop.crop_mode", self.crop_mode, f"one of {CROP_MODES}")

    @classmethod
    def from_crop_pct(cls, size, crop_pct: float, interpolation=DEFAULT_INTERPOLATION, crop_mode="center") -> "ResizeCenterCrop":
        if not 0.0 < crop_pct <= 1.0:
            _fail("crop_pct", crop_pct, "a fraction in (0, 1]")
        h, w = _pair(size, "size")
        # timm: scale_size = floor(img_size / crop_pct)
        return cls(size=(h, w), resize=int(math.floor(max(h, w) / crop_pct)), interpolation=interpolation,
                   crop_mode=crop_mode)

    @property
    def squash_size(self) -> tuple[int, int]:
        """'squash': the (height, width) both sides are resized to (timm: floor(side / crop_pct))."""
        h, w = self.size
        return (h * self.resize // max(h, w), w * self.resize // max(h, w))

    @property
    def crop_pct(self) -> float:
        return max(self.size) / self.resize


GEOMETRIES = {g.kind: g for g in (RandomResizedCrop, RandomCrop, ResizeCenterCrop)}
Geometry = RandomResizedCrop | RandomCrop | ResizeCenterCrop


def resized_geometry(geometry: Geometry, size) -> Geometry:
    """The same geometry with output ``size``; eval keeps its crop fraction (``resize`` follows,
    by timm's rule), so 'evaluate at 256' means Resize(292) + CenterCrop(256) under crop_pct 0.875."""
    if isinstance(geometry, ResizeCenterCrop):
        return ResizeCenterCrop.from_crop_pct(size, geometry.crop_pct, geometry.interpolation, geometry.crop_mode)
    return dataclasses.replace(geometry, size=_pair(size, "size"))


@dataclass(frozen=True)
class ProgressiveResolution:
    """FFCV's ImageNet recipe (``get_resolution``): train at ``min_res`` up to epoch ``start_ramp``,
    then a linear ramp to ``max_res`` at epoch ``end_ramp``, rounded to a multiple of ``step``
    (square outputs). The ResNet-50 88-epoch config: 160 -> 192 over epochs 65..76."""
    min_res: int = 160
    max_res: int = 192
    start_ramp: int = 65
    end_ramp: int = 76
    step: int = 32

    def __post_init__(self):
        for name in ("min_res", "max_res", "step"):
            _int(getattr(self, name), f"resolution.{name}", 1, "an int >= 1")
        for name in ("start_ramp", "end_ramp"):
            _int(getattr(self, name), f"resolution.{name}", 0, "an epoch number >= 0")
        if self.min_res > self.max_res:
            _fail("resolution.min_res", self.min_res, f"<= max_res={self.max_res}")
        if self.end_ramp <= self.start_ramp:
            _fail("resolution.end_ramp", self.end_ramp, f"> start_ramp={self.start_ramp}")

    def size_at(self, epoch: int) -> int:
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        res = self.min_res + (self.max_res - self.min_res) * (epoch - self.start_ramp) / (self.end_ramp - self.start_ramp)
        return max(self.step, int(round(res / self.step)) * self.step)


# --------------------------------------------------------------------------- photometric
@dataclass(frozen=True)
class ColorJitter:
    """torchvision ``ColorJitter``: factors uniform in [max(0, 1-x), 1+x], hue in [-h, h]."""
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation"):
            v = _real(getattr(self, name), f"color_jitter.{name}")
            if v < 0:
                _fail(f"color_jitter.{name}", v, "a value >= 0")
            object.__setattr__(self, name, v)
        hue = _real(self.hue, "color_jitter.hue")
        if not 0.0 <= hue <= 0.5:
            _fail("color_jitter.hue", self.hue, "a value in [0, 0.5]")
        object.__setattr__(self, "hue", hue)

    @property
    def enabled(self) -> bool:
        return any((self.brightness, self.contrast, self.saturation, self.hue))


# --------------------------------------------------------------------------- labels / batch
@dataclass(frozen=True)
class Mixup:
    """timm ``Mixup``: MixUp or CutMix (switch_prob picks CutMix when both are on), drawn once per
    batch (``mode='batch'``), per pair of samples i and N-1-i ('pair'), or per sample ('elem')."""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0
    mode: str = "batch"

    def __post_init__(self):
        for name in ("mixup_alpha", "cutmix_alpha"):
            v = _real(getattr(self, name), f"mixup.{name}")
            if v < 0:
                _fail(f"mixup.{name}", v, "a value >= 0 (0 disables)")
            object.__setattr__(self, name, v)
        object.__setattr__(self, "prob", _probability(self.prob, "mixup.prob"))
        object.__setattr__(self, "switch_prob", _probability(self.switch_prob, "mixup.switch_prob"))
        ls = _real(self.label_smoothing, "mixup.label_smoothing")
        if not 0.0 <= ls < 1.0:
            _fail("mixup.label_smoothing", ls, "a value in [0, 1)")
        object.__setattr__(self, "label_smoothing", ls)
        if self.mode not in MIXUP_MODES:
            _fail("mixup.mode", self.mode, f"one of {MIXUP_MODES}")

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    @property
    def soft_labels(self) -> bool:
        return self.mixes or self.label_smoothing > 0


@dataclass(frozen=True)
class RandomErasing:
    """timm ``RandomErasing``, applied as timm applies it: after normalization, per sample. With
    probability ``prob``, 1..``count`` boxes (uniform count), each of area fraction ~ U(min_area,
    max_area) / count and log aspect ~ U(log min_aspect, -log min_aspect), up to 10 tries to fit;
    filled with 0 ('const', the mean), one normal value per channel ('rand'), or per pixel ('pixel')."""
    prob: float = 0.25
    mode: str = "pixel"
    count: int = 1
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3

    def __post_init__(self):
        object.__setattr__(self, "prob", _probability(self.prob, "random_erasing.prob"))
        if self.mode not in ERASING_MODES:
            _fail("random_erasing.mode", self.mode, f"one of {ERASING_MODES}")
        _int(self.count, "random_erasing.count", 1, "an int >= 1")
        lo, hi = _float_pair((self.min_area, self.max_area), "random_erasing.min_area/max_area")
        if not 0.0 < lo <= hi <= 1.0:
            _fail("random_erasing.min_area/max_area", (lo, hi), "0 < min_area <= max_area <= 1")
        object.__setattr__(self, "min_area", lo)
        object.__setattr__(self, "max_area", hi)
        aspect = _real(self.min_aspect, "random_erasing.min_aspect")
        if not 0.0 < aspect <= 1.0:
            _fail("random_erasing.min_aspect", aspect, "a value in (0, 1] (the max aspect is its inverse)")
        object.__setattr__(self, "min_aspect", aspect)


# --------------------------------------------------------------------------- normalization
@dataclass(frozen=True)
class Normalize:
    """``mean``/``std``: 'imagenet', 'dataset' (per-channel stats from the manifest), or 3 values in 0..1."""
    mean: str | tuple[float, float, float] = "imagenet"
    std: str | tuple[float, float, float] = "imagenet"

    def __post_init__(self):
        for name in ("mean", "std"):
            v = getattr(self, name)
            if isinstance(v, str):
                if v not in ("imagenet", "dataset"):
                    _fail(f"normalize.{name}", v, "'imagenet', 'dataset' or three floats")
            else:
                if not isinstance(v, (tuple, list)) or len(v) != 3:
                    _fail(f"normalize.{name}", v, "'imagenet', 'dataset' or three floats")
                v = tuple(_real(x, f"normalize.{name}") for x in v)
                if name == "std" and min(v) <= 0:
                    _fail("normalize.std", v, "values > 0")
                object.__setattr__(self, name, v)

    def resolve(self, dataset_stats: dict | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Concrete (mean, std) in 0..1 units; 'dataset' needs the manifest's stats."""
        out = []
        for name, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            v = getattr(self, name)
            if v == "imagenet":
                v = default
            elif v == "dataset":
                if not dataset_stats or name not in dataset_stats:
                    raise ValueError(f"normalize.{name}='dataset' needs per-channel stats from the dataset "
                                     "manifest, and none were given")
                v = tuple(float(x) for x in dataset_stats[name])
                if len(v) != 3 or not all(map(math.isfinite, v)) or (name == "std" and min(v) <= 0):
                    raise ValueError(f"normalize.{name}='dataset': the dataset's {name} {list(v)} is not 3 finite "
                                     "numbers" + (" > 0" if name == "std" else ""))
            out.append(tuple(v))
        return out[0], out[1]
