"""The timm dialect of the spec: ``from_timm``, which reads a timm data config
(``resolve_data_config`` output, ``pretrained_cfg``, train.py's arguments) as timm itself
resolves it, with timm's tables of what each key means, into the fields of a
:class:`~fastload.spec.PreprocessSpec` (``PreprocessSpec.from_timm`` is the entry point). timm's
policy strings are ``policies.py``'s grammar.
"""
from __future__ import annotations

from .ops import (CROP_MODES, DEFAULT_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, ColorJitter,
                  Geometry, Mixup, Normalize, RandomErasing, RandomResizedCrop, ResizeCenterCrop, _fail)
from .policies import parse_auto_augment


def from_timm(config: dict, train: bool | None = None, use_test_size: bool = False) -> dict:
    """A spec's fields from a timm data config as timm produces it: ``resolve_data_config(...)``,
    ``model.pretrained_cfg``, plus timm's train arguments (``create_transform`` and ``Mixup``
    names, or train.py's: ``reprob``, ``smoothing``, ``aa``...). What does not change
    preprocessing (weights' location, classifier, licence...) is ignored; what changes it is
    honoured as timm honours it, or refused by name. timm's rules kept: train-time ColorJitter
    defaults to 0.4 and is off when an auto-augment policy is set (unless
    ``force_color_jitter``); random erasing runs after normalization; eval resizes to
    floor(size / crop_pct). ``use_test_size`` takes ``test_input_size``/``test_crop_pct``
    (timm's ``use_test_size``). ``train``/``is_training`` picks the train or eval geometry.
    """
    c = {TIMM_ALIASES.get(k, k): v for k, v in dict(config).items()}
    unknown = set(c) - TIMM_KEYS - TIMM_INFORMATIONAL
    if unknown:
        raise ValueError(f"unknown timm config key(s) {sorted(unknown)}: fastload reads {sorted(TIMM_KEYS)} and "
                         "ignores timm's informational keys (url, hf_hub_id, num_classes, first_conv...)")
    for key, why in TIMM_REFUSED.items():
        if c.get(key) not in (None, False, 0, 0.0, "", "rrc"):
            _fail(key, c[key], why)
    if train is None:
        train = bool(c.get("is_training", c.get("train", False)))
    size = c.get("input_size", (3, 224, 224))
    crop_pct = c.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    if use_test_size:
        size = c.get("test_input_size") or size
        crop_pct = c.get("test_crop_pct") or crop_pct
    if not isinstance(size, (tuple, list)) or len(size) != 3 or size[0] != 3:
        _fail("input_size", size, "(3, height, width)")
    hw = (int(size[1]), int(size[2]))
    interp = (c.get("train_interpolation") if train else None) or c.get("interpolation") or DEFAULT_INTERPOLATION
    if interp not in INTERPOLATIONS:
        _fail("interpolation", interp, f"one of {INTERPOLATIONS} ('random' is not supported)")
    if train:
        geometry: Geometry = RandomResizedCrop(
            size=hw, scale=tuple(c.get("scale") or (0.08, 1.0)),
            ratio=tuple(c.get("ratio") or (3 / 4, 4 / 3)), interpolation=interp)
    else:
        mode = c.get("crop_mode") or "center"
        if mode not in CROP_MODES:
            _fail("crop_mode", mode, f"one of {CROP_MODES} ('border' pads with the mean: not supported)")
        geometry = ResizeCenterCrop.from_crop_pct(hw, float(crop_pct), interp, mode)
    aa = c.get("auto_augment") if train else None
    policy = parse_auto_augment(aa) if aa else None
    jitter = None
    cj = c.get("color_jitter", 0.4)  # timm's create_transform default for training
    if train and cj and (policy is None or c.get("force_color_jitter")):
        if isinstance(cj, (int, float)):
            jitter = ColorJitter(float(cj), float(cj), float(cj), 0.0)
        elif isinstance(cj, (tuple, list)) and len(cj) in (3, 4):
            jitter = ColorJitter(*[float(x) for x in cj])
        else:
            _fail("color_jitter", cj, "a float or 3/4 floats (brightness, contrast, saturation[, hue])")
    mix = Mixup(
        mixup_alpha=float(c.get("mixup_alpha", 0.0) or 0.0) if train else 0.0,
        cutmix_alpha=float(c.get("cutmix_alpha", 0.0) or 0.0) if train else 0.0,
        prob=float(c.get("mixup_prob", 1.0)),
        switch_prob=float(c.get("mixup_switch_prob", 0.5)),
        label_smoothing=float(c.get("label_smoothing", 0.0) or 0.0) if train else 0.0,
        mode=c.get("mixup_mode") or "batch",
    )
    erasing = None
    if train and float(c.get("re_prob", 0.0) or 0.0) > 0:
        # re_mode: create_transform's default 'const' (train.py's --remode defaults to 'pixel')
        erasing = RandomErasing(prob=float(c["re_prob"]), mode=c.get("re_mode") or "const",
                                count=int(c.get("re_count") or 1))
    norm = Normalize(mean=tuple(c.get("mean", IMAGENET_MEAN)), std=tuple(c.get("std", IMAGENET_STD)))
    return dict(geometry=geometry, hflip=float(c.get("hflip", 0.5)) if train else 0.0, color_jitter=jitter,
                auto_augment=policy, mixup=mix, random_erasing=erasing, normalize=norm, name="timm")


# timm's train.py argument names -> create_transform / Mixup names
TIMM_ALIASES = {"aa": "auto_augment", "reprob": "re_prob", "remode": "re_mode", "recount": "re_count",
                "resplit": "re_split", "mixup": "mixup_alpha", "cutmix": "cutmix_alpha", "smoothing": "label_smoothing",
                "img_size": "input_size"}
TIMM_KEYS = {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "test_input_size", "test_crop_pct",
             "scale", "ratio", "hflip", "vflip", "color_jitter", "force_color_jitter", "auto_augment", "re_prob",
             "re_mode", "re_count", "re_split", "mixup_alpha", "cutmix_alpha", "cutmix_minmax", "mixup_prob",
             "mixup_switch_prob", "mixup_mode", "label_smoothing", "train_interpolation", "train_crop_mode",
             "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob", "aug_repeats", "is_training", "train"}
# PretrainedCfg fields that say where weights are or what the model is, not how to preprocess
TIMM_INFORMATIONAL = {"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag",
                      "custom_load", "min_input_size", "fixed_input_size", "num_classes", "label_offset",
                      "label_names", "label_descriptions", "pool_size", "test_pool_size", "first_conv", "classifier",
                      "license", "description", "origin_url", "paper_name", "paper_ids", "notes"}
# keys whose non-default values fastload does not reproduce: refused by name, with the remedy
TIMM_REFUSED = {"vflip": "0 (vertical flip is not supported)",
                "re_split": "False (random erasing splits need timm's augmentation splits, not supported)",
                "cutmix_minmax": "None (min/max CutMix boxes are not supported; use cutmix_alpha)",
                "train_crop_mode": "'rrc' (RandomResizedCrop; 'rkrc'/'rkrr' are not supported)",
                "color_jitter_prob": "None (color jitter applied always, as timm's default)",
                "grayscale_prob": "0 (random grayscale is not supported)",
                "gaussian_blur_prob": "0 (random blur is not supported)",
                "aug_repeats": "0 here: repeated augmentation is a loader option, FastLoader(repeated_augmentation=3)"}
