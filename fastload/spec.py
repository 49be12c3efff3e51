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
from dataclasses import dataclass, field

from .ops import *  # noqa: F401,F403 - the vocabulary, importable from here as before
from .ops import (DTYPES, GEOMETRIES, IMAGENET_MEAN, IMAGENET_STD, LAYOUTS, ColorJitter, Geometry, Mixup, Normalize,
                  ProgressiveResolution, RandomCrop, RandomErasing, RandomResizedCrop, ResizeCenterCrop, _fail,
                  _probability, resized_geometry, DEFAULT_INTERPOLATION)
from .policies import *  # noqa: F401,F403
from .policies import POLICIES, Policy, parse_auto_augment
from .timm_dialect import from_timm


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
            object.__setattr__(self, "auto_augment", parse_auto_augment(self.auto_augment))
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
        """A preset by name: ``'imagenet'`` (``train`` picks the variant) or ``'imagenet:eval'`` /
        ``'imagenet:train'``, as ``FastLoader(spec=...)`` and the CLI's ``--spec`` take it."""
        base, _, variant = name.partition(":") if isinstance(name, str) else (name, "", "")
        if variant not in ("", "train", "eval"):
            _fail("spec", name, "'<preset>', '<preset>:train' or '<preset>:eval'")
        if base not in PRESETS:
            raise ValueError(f"preset={base!r} is unknown: allowed {sorted(PRESETS)}")
        return PRESETS[base](train if not variant else variant == "train")

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
        return cls(**from_timm(config, train=train, use_test_size=use_test_size))

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
        return PreprocessSpec.preset(spec, train=train)  # the one preset grammar
    _fail("spec", spec, "a PreprocessSpec, a preset name or None")
