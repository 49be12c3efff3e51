"""Automatic augmentation policies (torchvision's AutoAugment, RandAugment, TrivialAugmentWide;
timm's RandAugment and AutoAugment variants) and their string grammar: timm's policy strings
(``rand-m9-mstd0.5-inc1``, ``original``...) and torchvision's policy names."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .ops import AUTOAUGMENT_POLICIES, _fail, _int, _probability, _real

__all__ = ['AutoAugment', 'RandAugment', 'TrivialAugmentWide', 'TimmRandAugment', 'TIMM_AA_POLICIES',
           'TimmAutoAugment', 'POLICIES', 'Policy', 'TIMM_POLICIES', 'parse_auto_augment', 'policy_to_string']


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


def _sections(text: str, parts: list[str], allowed: str) -> dict[str, str]:
    """timm's '-key<value>' config sections."""
    out = {}
    for part in parts:
        m = re.fullmatch(r"([a-z]+)([0-9.]+|inf)", part)
        if not m or m.group(1) not in allowed.split():
            _fail("auto_augment", text, f"sections {', '.join('-' + k + 'N' for k in allowed.split())} "
                                        f"(could not read {part!r})")
        out[m.group(1)] = m.group(2)
    return out


def parse_auto_augment(text: str) -> Policy:
    """timm policy strings, by timm's semantics: ``rand-m9-mstd0.5-inc1`` (RandAugment),
    ``original``/``originalr``/``v0``/``v0r`` (AutoAugment, optional ``-mstd``); torchvision's
    policies by their names: ``autoaugment`` (ImageNet policy), ``randaugment``, ``trivialaugment``."""
    if not isinstance(text, str) or not text:
        _fail("auto_augment", text, "a policy string such as 'rand-m9-mstd0.5-inc1', 'original', 'trivialaugment'")
    t = text.strip().lower()
    head, *parts = t.split("-")
    if t in ("autoaugment", "imagenet", "aa", "tv-autoaugment"):
        return AutoAugment("imagenet")
    if t in ("trivialaugment", "trivialaugmentwide", "ta_wide", "trivial", "ta"):
        return TrivialAugmentWide()
    if t in ("randaugment", "tv-randaugment"):
        return RandAugment()
    if head in TIMM_AA_POLICIES:
        kw = _sections(text, parts, "mstd")
        return TimmAutoAugment(head, magnitude_std=_mstd(kw.get("mstd", "0")))
    if head == "rand":
        kw = _sections(text, parts, "m n mstd mmax inc w")
        return TimmRandAugment(magnitude=float(int(float(kw.get("m", 10)))), num_ops=int(float(kw.get("n", 2))),
                               magnitude_std=_mstd(kw.get("mstd", "0")),
                               magnitude_max=float(int(float(kw["mmax"]))) if "mmax" in kw else None,
                               # timm tests bool(val) of the string: any -incN turns it on, -inc0 included
                               increasing="inc" in kw, weights=int(float(kw["w"])) if "w" in kw else None)
    if head in ("augmix", "3a"):
        _fail("auto_augment", text, "a policy fastload reproduces (timm's AugMix and ThreeAugment are not supported)")
    _fail("auto_augment", text, "'rand-m<M>[-n<N>][-mstd<S>][-mmax<X>][-inc1][-w0]', 'original', 'originalr', "
                                "'v0', 'v0r' (timm's), or 'autoaugment', 'randaugment', 'trivialaugment' (torchvision's)")


def _mstd(val: str) -> float:
    v = float(val)
    return float("inf") if v > 100 else v  # timm: mstd > 100 means uniform sampling


def policy_to_string(policy: Policy) -> str:
    if isinstance(policy, AutoAugment):
        return "autoaugment"
    if isinstance(policy, TrivialAugmentWide):
        return "trivialaugment"
    if isinstance(policy, RandAugment):
        if policy != RandAugment():
            raise ValueError(f"{policy!r} has no string form: torchvision's RandAugment is named 'randaugment' "
                             "with its defaults only; pass the object")
        return "randaugment"
    if isinstance(policy, TimmAutoAugment):
        return policy.policy + (f"-mstd{policy.magnitude_std:g}" if policy.magnitude_std else "")
    s = f"rand-m{policy.magnitude:g}-n{policy.num_ops}"
    if policy.magnitude_std:
        s += f"-mstd{policy.magnitude_std:g}"
    if policy.magnitude_max is not None:
        s += f"-mmax{policy.magnitude_max:g}"
    if policy.increasing:
        s += "-inc1"
    if policy.weights is not None:
        s += f"-w{policy.weights}"
    return s
