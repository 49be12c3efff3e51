"""The preprocessing spec: presets, serialization, timm configs, validation errors."""
import json
import math

import pytest

from fastload.spec import (IMAGENET_MEAN, IMAGENET_STD, AutoAugment, ColorJitter, Mixup, Normalize, PreprocessSpec,
                           RandAugment, RandomCrop, RandomErasing, RandomResizedCrop, ResizeCenterCrop, TimmAutoAugment, TimmRandAugment,
                           TrivialAugmentWide, resolve_spec)
from fastload.policies import parse_auto_augment, policy_to_string

PRESETS = ["imagenet", "cifar10", "cifar100", "coco"]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("train", [True, False])
def test_every_preset_builds_and_round_trips(name, train):
    spec = PreprocessSpec.preset(name, train=train)
    assert spec.train == train
    assert spec.dtype in ("uint8", "float32", "float16")
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec.from_yaml(spec.to_yaml()) == spec
    if not train:
        assert isinstance(spec.geometry, ResizeCenterCrop) and spec.hflip == 0


def test_preset_contents():
    tr, ev = PreprocessSpec.preset("imagenet", True), PreprocessSpec.preset("imagenet", False)
    assert tr.geometry == RandomResizedCrop((224, 224), (0.08, 1.0), (3 / 4, 4 / 3)) and tr.hflip == 0.5
    assert ev.geometry == ResizeCenterCrop(224, resize=256) and ev.normalize == Normalize("imagenet", "imagenet")
    c = PreprocessSpec.preset("cifar10", True)
    assert c.geometry == RandomCrop(32, padding=4) and c.normalize.mean == "dataset"
    assert PreprocessSpec.preset("cifar100", False).size == (32, 32)
    assert PreprocessSpec.preset("coco", True).geometry.scale == (0.5, 1.0)


def test_json_yaml_round_trip_with_every_option():
    spec = PreprocessSpec(geometry=RandomResizedCrop(192, scale=(0.25, 1.0), ratio=(0.5, 2.0)), hflip=0.3,
                          color_jitter=ColorJitter(0.4, 0.3, 0.2, 0.1), auto_augment=RandAugment(2, 27.0, 1.5),
                          mixup=Mixup(0.8, 1.0, 0.9, 0.4, 0.1), normalize=Normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)),
                          dtype="float16", layout="channels_last")
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec.from_yaml(spec.to_yaml()) == spec
    for policy in (AutoAugment(), TrivialAugmentWide()):
        s = spec.replace(auto_augment=policy)
        assert PreprocessSpec.from_json(s.to_json()) == s
    assert json.loads(spec.to_json())["format"] == "fastload-spec/1"


def test_from_timm_train_and_eval():
    cfg = {"input_size": (3, 256, 256), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
           "crop_pct": 0.95, "scale": (0.2, 1.0), "ratio": (0.75, 1.3333), "hflip": 0.4, "color_jitter": 0.3,
           "auto_augment": "rand-m9-mstd0.5-inc1", "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
    tr = PreprocessSpec.from_timm(cfg, train=True)
    assert tr.geometry == RandomResizedCrop((256, 256), (0.2, 1.0), (0.75, 1.3333))
    assert tr.hflip == 0.4 and tr.color_jitter is None  # timm: jitter is off when a policy is set
    forced = PreprocessSpec.from_timm({**cfg, "force_color_jitter": True}, train=True)
    assert forced.color_jitter == ColorJitter(0.3, 0.3, 0.3, 0.0)
    plain = PreprocessSpec.from_timm({"input_size": (3, 224, 224)}, train=True)
    assert plain.color_jitter == ColorJitter(0.4, 0.4, 0.4, 0.0)  # create_transform's default
    assert tr.auto_augment == TimmRandAugment(magnitude=9.0, num_ops=2, magnitude_std=0.5, increasing=True)
    assert (tr.mixup.mixup_alpha, tr.mixup.cutmix_alpha, tr.mixup.label_smoothing) == (0.8, 1.0, 0.1)
    assert tr.normalize.mean == (0.5, 0.5, 0.5)
    ev = PreprocessSpec.from_timm(cfg, train=False)
    # timm: scale_size = floor(256 / 0.95) = 269
    assert ev.geometry == ResizeCenterCrop((256, 256), resize=269) and ev.auto_augment is None
    assert not ev.mixup.mixes and ev.hflip == 0
    default_eval = PreprocessSpec.from_timm({"input_size": (3, 224, 224), "crop_pct": 0.875})
    assert default_eval.geometry == ResizeCenterCrop(224, resize=256)


@pytest.mark.parametrize("text,expected", [
    ("rand-m9-mstd0.5-inc1", TimmRandAugment(9.0, 2, 0.5, increasing=True)),
    ("rand-m7-n3", TimmRandAugment(7.0, 3)),
    ("rand-m10-n1-mstd0", TimmRandAugment(10.0, 1)),
    ("rand-m9-mstd101", TimmRandAugment(9.0, 2, float("inf"))),  # timm: mstd > 100 samples uniformly
    ("rand-m9-inc0", TimmRandAugment(9.0, 2, increasing=True)),  # timm reads bool('0'): on
    ("rand-m6-mmax12-w0", TimmRandAugment(6.0, 2, magnitude_max=12.0, weights=0)),
    ("original", TimmAutoAugment("original")),
    ("v0r-mstd0.5", TimmAutoAugment("v0r", 0.5)),
    ("autoaugment", AutoAugment("imagenet")),
    ("randaugment", RandAugment()),
    ("trivialaugment", TrivialAugmentWide()),
])
def test_auto_augment_strings(text, expected):
    assert parse_auto_augment(text) == expected
    assert parse_auto_augment(policy_to_string(expected)) == expected


@pytest.mark.parametrize("build,field", [
    (lambda: RandomResizedCrop(224, scale=(0.0, 1.0)), "random_resized_crop.scale"),
    (lambda: RandomResizedCrop(224, scale=(0.5, 1.2)), "random_resized_crop.scale"),
    (lambda: RandomResizedCrop(224, ratio=(2.0, 1.0)), "random_resized_crop.ratio"),
    (lambda: RandomResizedCrop(224, interpolation="area"), "random_resized_crop.interpolation"),
    (lambda: RandomResizedCrop(0), "random_resized_crop.size"),
    (lambda: PreprocessSpec(hflip=1.5), "hflip"),
    (lambda: PreprocessSpec(hflip=-0.1), "hflip"),
    (lambda: PreprocessSpec(auto_augment="rand-x9"), "auto_augment"),
    (lambda: PreprocessSpec(auto_augment="augmix-m5"), "auto_augment"),
    (lambda: Mixup(mixup_alpha=-1.0), "mixup.mixup_alpha"),
    (lambda: Mixup(cutmix_alpha=-0.5), "mixup.cutmix_alpha"),
    (lambda: Mixup(switch_prob=2.0), "mixup.switch_prob"),
    (lambda: Mixup(label_smoothing=1.0), "mixup.label_smoothing"),
    (lambda: ResizeCenterCrop(300, resize=256), "resize_center_crop.size"),
    (lambda: ResizeCenterCrop.from_crop_pct(224, 1.5), "crop_pct"),
    (lambda: RandomCrop(32, padding=-1), "random_crop.padding"),
    (lambda: RandomCrop(32, padding_mode="wrap"), "random_crop.padding_mode"),
    (lambda: ColorJitter(brightness=-0.1), "color_jitter.brightness"),
    (lambda: ColorJitter(hue=0.6), "color_jitter.hue"),
    (lambda: Normalize(mean="cifar"), "normalize.mean"),
    (lambda: Normalize(std=(0.1, 0.0, 0.1)), "normalize.std"),
    (lambda: PreprocessSpec(dtype="int8"), "dtype"),
    (lambda: PreprocessSpec(layout="NHWC"), "layout"),
    (lambda: PreprocessSpec(dtype="uint8", mixup=Mixup(mixup_alpha=0.2)), "dtype"),
    (lambda: RandAugment(magnitude=40), "auto_augment.magnitude"),
    (lambda: PreprocessSpec.preset("resnet"), "preset"),
    (lambda: PreprocessSpec.from_dict({"hflip": 0.5, "crop": 3}), "crop"),
    (lambda: PreprocessSpec.from_timm({"input_size": (3, 224, 224), "interpolation": "random"}), "interpolation"),
    (lambda: PreprocessSpec.from_timm({"crop_mode": "border"}), "crop_mode"),
    (lambda: parse_auto_augment("augmix-m5-w4-d2"), "AugMix"),
    (lambda: parse_auto_augment("3a"), "ThreeAugment"),
    (lambda: parse_auto_augment("rand-m9-q3"), "could not read 'q3'"),
    (lambda: PreprocessSpec.from_timm({"reprob": 0.25, "resplit": True}, train=True), "re_split"),
    (lambda: PreprocessSpec.from_timm({"aug_repeats": 3}, train=True), "repeated_augmentation"),
    (lambda: PreprocessSpec.from_timm({"mixup_mode": "half"}, train=True), "mixup.mode"),
    (lambda: PreprocessSpec.from_timm({"reprob": 0.25, "remode": "mean"}, train=True), "random_erasing.mode"),
    (lambda: PreprocessSpec.from_timm({"input_size": (224, 224)}), "input_size"),
    (lambda: PreprocessSpec.from_timm({"auto_augment": "rand-m9", "unknown_key": 1}), "unknown_key"),
])
def test_invalid_values_name_the_field(build, field):
    with pytest.raises(ValueError) as e:
        build()
    assert field in str(e.value)


def test_error_message_gives_value_and_allowed_range():
    with pytest.raises(ValueError, match=r"random_resized_crop\.scale=\(0\.0, 1\.0\) is invalid: allowed 0 < min"):
        RandomResizedCrop(224, scale=(0.0, 1.0))


def test_dataset_normalization_needs_stats():
    norm = Normalize("dataset", "dataset")
    with pytest.raises(ValueError, match="normalize.mean='dataset'"):
        norm.resolve(None)
    mean, std = norm.resolve({"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.3]})
    assert mean == (0.4, 0.5, 0.6) and std == (0.2, 0.2, 0.3)


def test_resolve_spec_defaults_and_variants():
    assert resolve_spec(None, "cifar10", train=True) == PreprocessSpec.preset("cifar10", True)
    assert resolve_spec(None, "imagenet", train=False) == PreprocessSpec.preset("imagenet", False)
    assert resolve_spec("imagenet:eval", "cifar10", train=True) == PreprocessSpec.preset("imagenet", False)
    with pytest.raises(ValueError, match="spec"):
        resolve_spec("imagenet:test", "imagenet", True)


def test_import_is_light():
    """`import fastload` and the CLI must not pull torch/ffcv/DALI/datasets (instant --help)."""
    import subprocess
    import sys
    code = ("import sys, fastload, fastload.cli; "
            "heavy = [m for m in ('torch', 'ffcv', 'nvidia.dali', 'datasets', 'numba') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# resolve_data_config(model=...) and model.pretrained_cfg as timm 1.0 builds them from its model
# registry (default tags; read from timm's source: timm does not install beside the CPU torch pin)
TIMM_DATA_CONFIGS = {
    "resnet50.a1_in1k": {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                         "std": IMAGENET_STD, "crop_pct": 0.95, "crop_mode": "center"},
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": {"input_size": (3, 224, 224), "interpolation": "bicubic",
                                                   "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9,
                                                   "crop_mode": "center"},
    "convnext_tiny.in12k_ft_in1k": {"input_size": (3, 224, 224), "interpolation": "bicubic",
                                    "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.95,
                                    "crop_mode": "center"},
    "efficientnet_b0.ra_in1k": {"input_size": (3, 224, 224), "interpolation": "bicubic",
                                "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.875,
                                "crop_mode": "center"},
}
RESNET50_A1_PRETRAINED_CFG = {
    "url": "", "hf_hub_id": "timm/resnet50.a1_in1k", "architecture": "resnet50", "tag": "a1_in1k",
    "custom_load": False, "input_size": (3, 224, 224), "test_input_size": (3, 288, 288), "fixed_input_size": False,
    "interpolation": "bicubic", "crop_pct": 0.95, "test_crop_pct": 1.0, "crop_mode": "center",
    "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 1000, "pool_size": (7, 7),
    "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", "origin_url": "https://github.com/huggingface/pytorch-image-models",
    "paper_ids": "arXiv:2110.00476", "paper_name": "ResNet strikes back: An improved training procedure in timm"}


@pytest.mark.parametrize("model", sorted(TIMM_DATA_CONFIGS))
def test_from_timm_takes_resolve_data_config_as_is(model):
    cfg = TIMM_DATA_CONFIGS[model]
    ev = PreprocessSpec.from_timm(cfg)
    assert ev.geometry == ResizeCenterCrop.from_crop_pct(224, cfg["crop_pct"], "bicubic")
    assert ev.geometry.resize == math.floor(224 / cfg["crop_pct"]) and ev.normalize.mean == cfg["mean"]
    tr = PreprocessSpec.from_timm(cfg, train=True)
    assert tr.geometry == RandomResizedCrop(224, interpolation="bicubic") and tr.normalize.std == cfg["std"]


def test_from_timm_takes_pretrained_cfg_and_train_args():
    ev = PreprocessSpec.from_timm(RESNET50_A1_PRETRAINED_CFG)  # informational keys ignored
    assert ev.geometry == ResizeCenterCrop(224, resize=235, interpolation="bicubic")
    test = PreprocessSpec.from_timm(RESNET50_A1_PRETRAINED_CFG, use_test_size=True)
    assert test.geometry == ResizeCenterCrop(288, resize=288, interpolation="bicubic")
    # timm train.py's names, as its argparse Namespace has them (a rsb-a1 style recipe)
    args = {**TIMM_DATA_CONFIGS["resnet50.a1_in1k"], "aa": "rand-m7-mstd0.5-inc1", "reprob": 0.25, "remode": "pixel",
            "recount": 2, "resplit": False, "mixup": 0.1, "cutmix": 1.0, "mixup_mode": "elem", "smoothing": 0.1,
            "color_jitter": 0.4, "hflip": 0.5, "vflip": 0.0, "train_interpolation": "bilinear", "cutmix_minmax": None}
    tr = PreprocessSpec.from_timm(args, train=True)
    assert tr.random_erasing == RandomErasing(prob=0.25, mode="pixel", count=2)
    assert (tr.mixup.mode, tr.mixup.mixup_alpha, tr.mixup.cutmix_alpha, tr.mixup.label_smoothing) == ("elem", 0.1, 1.0,
                                                                                                      0.1)
    assert tr.geometry.interpolation == "bilinear" and tr.color_jitter is None
    assert PreprocessSpec.from_json(tr.to_json()) == tr
    squash = PreprocessSpec.from_timm({**TIMM_DATA_CONFIGS["resnet50.a1_in1k"], "crop_mode": "squash"})
    assert squash.geometry.crop_mode == "squash" and squash.geometry.squash_size == (235, 235)
