"""The preprocessing spec: one declarative, validated description of what a split does.

Every backend (ffcv, dali, reference) implements the same spec; the spec itself
imports no backend. It round-trips through JSON/YAML and can be built from a
timm data config (``PreprocessSpec.from_timm``).

Conventions (torchvision/timm): mean/std are in 0..1 units, sizes are
(height, width) or one int for a square, ``ratio`` is width/height.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

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


@dataclass(frozen=True)
class AutoAugment:
    """torchvision/timm AutoAugment with the ImageNet policy."""
    policy: str = "imagenet"
    kind: Literal["autoaugment"] = "autoaugment"

    def __post_init__(self):
        if self.policy not in AUTOAUGMENT_POLICIES:
            _fail("auto_augment.policy", self.policy, f"one of {AUTOAUGMENT_POLICIES}")


@dataclass(frozen=True)
class RandAugment:
    """torchvision's RandAugment(num_ops, magnitude) (its 14 ops and ranges, magnitude on the
    0..num_magnitude_bins-1 scale), plus Gaussian magnitude noise (magnitude_std, same scale).
    timm's RandAugment, with its own op list, is :class:`TimmRandAugment` ('rand-...' strings).
    torchvision's ranges already increase with the magnitude (no 'increasing' variant here)."""
    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    num_magnitude_bins: int = 31  # timm/torchvision: magnitudes are on a 0..30 scale
    kind: Literal["randaugment"] = "randaugment"

    def __post_init__(self):
        _int(self.num_ops, "auto_augment.num_ops", 0, "an int >= 0")
        if not 0 <= _real(self.magnitude, "auto_augment.magnitude") <= self.num_magnitude_bins - 1:
            _fail("auto_augment.magnitude", self.magnitude, f"a value in [0, {self.num_magnitude_bins - 1}]")
        if _real(self.magnitude_std, "auto_augment.magnitude_std", allow_inf=True) < 0:
            _fail("auto_augment.magnitude_std", self.magnitude_std, "a value >= 0 (or inf)")


@dataclass(frozen=True)
class TrivialAugmentWide:
    """torchvision ``TrivialAugmentWide``: one op, magnitude uniform over the wide ranges."""
    num_magnitude_bins: int = 31
    kind: Literal["trivialaugment"] = "trivialaugment"


@dataclass(frozen=True)
class TimmRandAugment:
    """timm's RandAugment (``rand-m9-n2-mstd0.5-inc1``): ``num_ops`` of timm's 15 ops (its
    *Increasing variants with ``increasing``), each applied with probability ``prob``; magnitude
    on timm's 0..10 scale with Gaussian noise ``magnitude_std`` (inf: uniform in 0..m), clipped
    to ``magnitude_max`` (default 10); ``weights=0``: timm's op choice weights ('w0')."""
    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float | None = None
    increasing: bool = False
    weights: int | None = None
    prob: float = 0.5
    kind: Literal["timm_randaugment"] = "timm_randaugment"

    def __post_init__(self):
        _int(self.num_ops, "auto_augment.num_ops", 0, "an int >= 0")
        if _real(self.magnitude, "auto_augment.magnitude") < 0:
            _fail("auto_augment.magnitude", self.magnitude, "a value >= 0 (timm's scale: 0..10)")
        if _real(self.magnitude_std, "auto_augment.magnitude_std", allow_inf=True) < 0:
            _fail("auto_augment.magnitude_std", self.magnitude_std, "a value >= 0 (or inf)")
        if self.weights not in (None, 0):
            _fail("auto_augment.weights", self.weights, "None or 0 (timm has one set of choice weights)")
        object.__setattr__(self, "prob", _probability(self.prob, "auto_augment.prob"))


TIMM_AA_POLICIES = ("v0", "v0r", "original", "originalr")


@dataclass(frozen=True)
class TimmAutoAugment:
    """timm's AutoAugment (``original``, ``originalr``, ``v0``, ``v0r``, ``-mstd0.5``): one
    sub-policy per image, each (op, probability, magnitude) as timm's tables give them."""
    policy: str = "v0"
    magnitude_std: float = 0.0
    kind: Literal["timm_autoaugment"] = "timm_autoaugment"

    def __post_init__(self):
        if self.policy not in TIMM_AA_POLICIES:
            _fail("auto_augment.policy", self.policy, f"one of {TIMM_AA_POLICIES}")
        if _real(self.magnitude_std, "auto_augment.magnitude_std", allow_inf=True) < 0:
            _fail("auto_augment.magnitude_std", self.magnitude_std, "a value >= 0 (or inf)")


POLICIES = {p.kind: p for p in (AutoAugment, RandAugment, TrivialAugmentWide, TimmRandAugment, TimmAutoAugment)}
Policy = AutoAugment | RandAugment | TrivialAugmentWide | TimmRandAugment | TimmAutoAugment
TIMM_POLICIES = (TimmRandAugment, TimmAutoAugment)


def _parse_policy(text: str) -> Policy:
    """A policy string (timm's grammar, or torchvision's policy names): see ``timm_dialect``."""
    from .timm_dialect import parse_auto_augment
    return parse_auto_augment(text)


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


# --------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class PreprocessSpec:
    """What one split does, from decoded image to the batch a model sees."""
    geometry: Geometry = field(default_factory=RandomResizedCrop)
    hflip: float = 0.5
    color_jitter: ColorJitter | None = None
    auto_augment: Policy | None = None
    mixup: Mixup = field(default_factory=Mixup)
    random_erasing: RandomErasing | None = None  # after normalization, before MixUp/CutMix (timm's order)
    normalize: Normalize = field(default_factory=Normalize)
    dtype: str = "float32"
    layout: str = "NCHW"
    name: str | None = None  # the preset it came from, informational
    resolution: ProgressiveResolution | None = None  # output size by epoch (replaces the geometry's size)

    def __post_init__(self):
        if not isinstance(self.geometry, (RandomResizedCrop, RandomCrop, ResizeCenterCrop)):
            _fail("geometry", self.geometry, "RandomResizedCrop, RandomCrop or ResizeCenterCrop")
        object.__setattr__(self, "hflip", _probability(self.hflip, "hflip"))
        if self.color_jitter is not None and not isinstance(self.color_jitter, ColorJitter):
            _fail("color_jitter", self.color_jitter, "a ColorJitter or None")
        if self.color_jitter is not None and not self.color_jitter.enabled:
            object.__setattr__(self, "color_jitter", None)
        if isinstance(self.auto_augment, str):
            object.__setattr__(self, "auto_augment", _parse_policy(self.auto_augment))
        if self.auto_augment is not None and not isinstance(self.auto_augment, tuple(POLICIES.values())):
            _fail("auto_augment", self.auto_augment, f"one of {[p.__name__ for p in POLICIES.values()]} or a policy "
                                                     "string")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"one of {DTYPES}")
        if self.layout not in LAYOUTS:
            _fail("layout", self.layout, f"one of {LAYOUTS}")
        if self.dtype == "uint8" and self.mixup.mixes:
            _fail("dtype", self.dtype, "float32 or float16 when MixUp/CutMix blend pixels")
        if self.random_erasing is not None and not isinstance(self.random_erasing, RandomErasing):
            _fail("random_erasing", self.random_erasing, "a RandomErasing or None")
        if self.random_erasing is not None and self.random_erasing.prob == 0:
            object.__setattr__(self, "random_erasing", None)
        if self.dtype == "uint8" and self.random_erasing is not None:
            _fail("dtype", self.dtype, "float32 or float16 with random erasing (it erases normalized values)")
        if self.resolution is not None and not isinstance(self.resolution, ProgressiveResolution):
            _fail("resolution", self.resolution, "a ProgressiveResolution or None")

    # ----------------------------------------------------------------- properties
    @property
    def size(self) -> tuple[int, int]:
        return self.geometry.size

    @property
    def interpolation(self) -> str:
        """The resize filter (RandomCrop resizes nothing: the default, unused)."""
        return getattr(self.geometry, "interpolation", DEFAULT_INTERPOLATION)

    @property
    def train(self) -> bool:
        return not isinstance(self.geometry, ResizeCenterCrop)

    def replace(self, **changes) -> "PreprocessSpec":
        return dataclasses.replace(self, **changes)

    def at_size(self, size) -> "PreprocessSpec":
        """This spec with output ``size`` and no schedule: what a backend runs for one epoch."""
        return self.replace(geometry=resized_geometry(self.geometry, size), resolution=None)

    def for_epoch(self, epoch: int) -> "PreprocessSpec":
        """The spec of one epoch: its scheduled resolution, if any."""
        return self if self.resolution is None else self.at_size(self.resolution.size_at(epoch))

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, train: bool = True) -> "PreprocessSpec":
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is unknown: allowed {sorted(PRESETS)}")
        return PRESETS[name](train)

    # ----------------------------------------------------------------- serialization
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["format"] = "fastload-spec/1"
        if self.auto_augment is not None:
            d["auto_augment"] = dataclasses.asdict(self.auto_augment)
        return _lists(d)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        if not isinstance(d, dict):
            raise ValueError(f"spec must be a mapping, got {type(d).__name__}")
        d = dict(d)
        fmt = d.pop("format", "fastload-spec/1")
        if fmt != "fastload-spec/1":
            raise ValueError(f"format={fmt!r} is not a spec this version reads: allowed 'fastload-spec/1'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown spec field(s) {sorted(unknown)}: allowed {sorted(known)}")
        if "geometry" in d:
            g = dict(d["geometry"])
            kind = g.pop("kind", None)
            if kind not in GEOMETRIES:
                _fail("geometry.kind", kind, f"one of {sorted(GEOMETRIES)}")
            d["geometry"] = _build(GEOMETRIES[kind], g, "geometry")
        if d.get("color_jitter") is not None:
            d["color_jitter"] = _build(ColorJitter, d["color_jitter"], "color_jitter")
        if isinstance(d.get("auto_augment"), dict):
            p = dict(d["auto_augment"])
            kind = p.pop("kind", None)
            if kind not in POLICIES:
                _fail("auto_augment.kind", kind, f"one of {sorted(POLICIES)}")
            d["auto_augment"] = _build(POLICIES[kind], p, "auto_augment")
        if "mixup" in d:
            d["mixup"] = _build(Mixup, d["mixup"], "mixup")
        if d.get("random_erasing") is not None:
            d["random_erasing"] = _build(RandomErasing, d["random_erasing"], "random_erasing")
        if "normalize" in d:
            d["normalize"] = _build(Normalize, d["normalize"], "normalize")
        if d.get("resolution") is not None:
            d["resolution"] = _build(ProgressiveResolution, d["resolution"], "resolution")
        return cls(**d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"spec JSON does not parse: {e}") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "PreprocessSpec":
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"spec YAML does not parse: {e}") from None
        return cls.from_dict(data)

    # ----------------------------------------------------------------- timm
    @classmethod
    def from_timm(cls, config: dict, train: bool | None = None, use_test_size: bool = False) -> "PreprocessSpec":
        """A spec from a timm data config, as timm resolves it: see :func:`fastload.timm_dialect.from_timm`."""
        from .timm_dialect import from_timm
        return from_timm(config, train=train, use_test_size=use_test_size)

def _build(klass, values, field_name):
    if not isinstance(values, dict):
        _fail(field_name, values, "a mapping")
    known = {f.name for f in dataclasses.fields(klass)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} in {field_name}: allowed {sorted(known - {'kind'})}")
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    return klass(**values)


def _lists(obj):
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_lists(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- presets
def _imagenet(train: bool) -> PreprocessSpec:
    if train:
        return PreprocessSpec(geometry=RandomResizedCrop(224), hflip=0.5, name="imagenet")
    return PreprocessSpec(geometry=ResizeCenterCrop(224, resize=256), hflip=0.0, name="imagenet")


def _cifar(name: str):
    def make(train: bool) -> PreprocessSpec:
        norm = Normalize("dataset", "dataset")
        if train:
            return PreprocessSpec(geometry=RandomCrop(32, padding=4), hflip=0.5, normalize=norm, name=name)
        return PreprocessSpec(geometry=ResizeCenterCrop(32, resize=32), hflip=0.0, normalize=norm, name=name)
    return make


def _coco(train: bool) -> PreprocessSpec:
    # Multi-label: crops must keep most of the scene or labels stop being true.
    if train:
        return PreprocessSpec(geometry=RandomResizedCrop(224, scale=(0.5, 1.0)), hflip=0.5, name="coco")
    return PreprocessSpec(geometry=ResizeCenterCrop(224, resize=224), hflip=0.0, name="coco")


PRESETS = {"imagenet": _imagenet, "cifar10": _cifar("cifar10"), "cifar100": _cifar("cifar100"), "coco": _coco}


def resolve_spec(spec: "PreprocessSpec | str | None", preset: str, train: bool) -> PreprocessSpec:
    """``FastLoader(spec=...)``: a spec, a preset name (``'imagenet'``, ``'imagenet:eval'``), or None."""
    if spec is None:
        return PreprocessSpec.preset(preset, train=train)
    if isinstance(spec, PreprocessSpec):
        return spec
    if isinstance(spec, str):
        name, _, variant = spec.partition(":")
        if variant not in ("", "train", "eval"):
            _fail("spec", spec, "'<preset>', '<preset>:train' or '<preset>:eval'")
        return PreprocessSpec.preset(name, train=train if not variant else variant == "train")
    _fail("spec", spec, "a PreprocessSpec, a preset name or None")
