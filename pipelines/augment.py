"""Photometric and policy augmentations as batched torch ops with per-sample parameters.

Split as in torchvision ``transforms.v2``: functional kernels (``adjust_*``, ``affine``,
``equalize`` ...) that take a batch and per-sample parameters, and the random sampling
of those parameters (``sample_*``), which draws from a seeded numpy Generator.
Images are NCHW float tensors holding 0..255 values; each op rounds and clamps its
result to whole levels, as the uint8 images torchvision's ops work on.

Ranges and op sets are torchvision's (AutoAugment ImageNet policy, RandAugment,
TrivialAugmentWide); timm's policies and their PIL-exact kernels are in ``timm_augment.py``.
Ops that move pixels fill what they uncover with the mean pixel.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fastload.spec import AutoAugment, ColorJitter, RandAugment, TrivialAugmentWide

GRAY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights


def _q(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0.0, 255.0)


def _per_sample(v, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def blend(a: torch.Tensor, b: torch.Tensor, factor) -> torch.Tensor:
    """factor * a + (1 - factor) * b, rounded to levels; ``b`` may broadcast (one kernel: lerp)."""
    return _q(torch.lerp(b.expand_as(a), a, _per_sample(factor, a)))


# --------------------------------------------------------------------------- kernels
def adjust_brightness(x, factor):
    return _q(x * _per_sample(factor, x))  # blend with black


def adjust_contrast(x, factor):
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return blend(x, grayscale(x), factor)


def adjust_hue(x, hue):
    """torchvision adjust_hue: RGB -> HSV, h += hue (mod 1), HSV -> RGB."""
    rgb = x / 255.0
    maxc = rgb.amax(dim=1)  # (max with indices is ~15x slower on CPU)
    cr = maxc - rgb.amin(dim=1)
    s = cr / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    r, g, b = rgb.unbind(1)
    is_r = r == maxc  # ties go to r, then g: torchvision's order
    is_g = (g == maxc) & ~is_r
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    offset = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    h = (offset + num / torch.where(cr > 0, cr, torch.ones_like(cr))) / 6.0
    h = (h + torch.as_tensor(hue, dtype=x.dtype, device=x.device).view(-1, 1, 1)) % 1.0
    # HSV -> RGB in closed form: channel n (R=5, G=3, B=1) is v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6h) mod 6; one fused pass instead of torchvision's six-way mask
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (n + 6.0 * h.unsqueeze(1)) % 6.0
    c = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    v = maxc.unsqueeze(1)
    out = v - v * s.unsqueeze(1) * c
    return _q(out * 255.0)


def adjust_sharpness(x, factor):
    """torchvision: blend with a 3x3 smoothed copy (borders kept)."""
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13.0
    smooth = F.conv2d(x.reshape(-1, 1, *x.shape[2:]), k.view(1, 1, 3, 3)).reshape(x.shape[0], 3, x.shape[2] - 2,
                                                                                  x.shape[3] - 2)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth.round()
    return blend(x, degenerate, factor)


def posterize(x, bits):
    shift = (8 - torch.as_tensor(bits, device=x.device).view(-1, 1, 1, 1).to(torch.int64))
    v = x.to(torch.int64)
    return ((v >> shift) << shift).to(x.dtype)


def solarize(x, threshold):
    t = _per_sample(threshold, x)
    return torch.where(x >= t, 255.0 - x, x)


def invert(x, _=None):
    return 255.0 - x


def autocontrast(x, _=None):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    eq = hi == lo
    scale = torch.where(eq, torch.ones_like(hi), 255.0 / (hi - lo))
    lo = torch.where(eq, torch.zeros_like(lo), lo)
    return _q((x - lo) * scale)


def equalize(x, _=None):
    """torchvision's per-channel histogram equalization, for all images at once."""
    n, c, h, w = x.shape
    v = x.to(torch.int64).reshape(n * c, h * w)
    offsets = (torch.arange(n * c, device=x.device) * 256).view(-1, 1)
    hist = torch.bincount((v + offsets).reshape(-1), minlength=n * c * 256).reshape(n * c, 256)
    last = 255 - torch.argmax((hist.flip(1) > 0).to(torch.int64), dim=1)  # last non-empty bin
    total = hist.sum(1)
    step = (total - hist.gather(1, last.view(-1, 1)).view(-1)) // 255
    safe = torch.where(step == 0, torch.ones_like(step), step).view(-1, 1)
    lut = (torch.cumsum(hist, 1) + (safe // 2)) // safe
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0, 255)
    out = lut.gather(1, v)
    out = torch.where((step == 0).view(-1, 1), v, out)
    return out.reshape(n, c, h, w).to(x.dtype)


def affine(x, matrices, fill):
    """Inverse-mapped affine warp, nearest neighbour, like PIL ``Image.transform(AFFINE)``:
    output pixel centre (u, v) samples input (a u + b v + c, d u + e v + f)."""
    n, _, h, w = x.shape
    m = torch.as_tensor(np.asarray(matrices, np.float64), dtype=x.dtype, device=x.device).view(n, 2, 3)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype) + 0.5,
                            torch.arange(w, device=x.device, dtype=x.dtype) + 0.5, indexing="ij")
    pts = torch.stack((xs, ys, torch.ones_like(xs)), dim=-1).view(1, h * w, 3)
    src = pts @ m.transpose(1, 2)  # (n, h*w, 2) input pixel coordinates
    sx = torch.floor(src[..., 0]).to(torch.int64)
    sy = torch.floor(src[..., 1]).to(torch.int64)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    flat = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).unsqueeze(1).expand(n, 3, h * w)
    out = x.reshape(n, 3, h * w).gather(2, flat)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).view(1, 3, 1)
    out = torch.where(inside.unsqueeze(1), out, fill_t.expand(n, 3, h * w))
    return out.view(n, 3, h, w)


def shear_matrix(shear_x, shear_y):
    return [1.0, shear_x, 0.0, shear_y, 1.0, 0.0]


def translate_matrix(tx, ty):
    return [1.0, 0.0, tx, 0.0, 1.0, ty]


def rotate_matrix(angle_deg, h, w):
    """PIL ``Image.rotate(angle)``: counter-clockwise about the centre (inverse map)."""
    a = -math.radians(angle_deg)
    cx, cy = w / 2.0, h / 2.0
    ca, sa = math.cos(a), math.sin(a)
    # input = R(a) (output - c) + c, with PIL's sign convention
    return [ca, sa, cx - ca * cx - sa * cy, -sa, ca, cy + sa * cx - ca * cy]


# --------------------------------------------------------------------------- op table
def _affine_op(kind):
    def op(x, magnitudes, fill):
        h, w = x.shape[2], x.shape[3]
        if kind == "ShearX":
            mats = [shear_matrix(float(m), 0.0) for m in magnitudes]
        elif kind == "ShearY":
            mats = [shear_matrix(0.0, float(m)) for m in magnitudes]
        elif kind == "TranslateX":
            mats = [translate_matrix(float(int(m)), 0.0) for m in magnitudes]
        elif kind == "TranslateY":
            mats = [translate_matrix(0.0, float(int(m))) for m in magnitudes]
        else:
            mats = [rotate_matrix(float(m), h, w) for m in magnitudes]
        return affine(x, mats, fill)
    return op


OPS = {
    "Identity": lambda x, m, fill: x,
    "ShearX": _affine_op("ShearX"), "ShearY": _affine_op("ShearY"),
    "TranslateX": _affine_op("TranslateX"), "TranslateY": _affine_op("TranslateY"),
    "Rotate": _affine_op("Rotate"),
    "Brightness": lambda x, m, fill: adjust_brightness(x, 1.0 + np.asarray(m)),
    "Color": lambda x, m, fill: adjust_saturation(x, 1.0 + np.asarray(m)),
    "Contrast": lambda x, m, fill: adjust_contrast(x, 1.0 + np.asarray(m)),
    "Sharpness": lambda x, m, fill: adjust_sharpness(x, 1.0 + np.asarray(m)),
    "Posterize": lambda x, m, fill: posterize(x, np.asarray(m, np.int64)),
    "Solarize": lambda x, m, fill: solarize(x, np.asarray(m)),
    "AutoContrast": lambda x, m, fill: autocontrast(x),
    "Equalize": lambda x, m, fill: equalize(x),
    "Invert": lambda x, m, fill: invert(x),
}


def augmentation_space(num_bins: int, h: int, w: int, wide: bool = False) -> dict:
    """torchvision's magnitude bins: op -> (magnitudes[num_bins], signed)."""
    lin = lambda a, b: np.linspace(a, b, num_bins)  # noqa: E731
    if wide:  # TrivialAugmentWide
        return {"Identity": (np.zeros(1), False), "ShearX": (lin(0, 0.99), True), "ShearY": (lin(0, 0.99), True),
                "TranslateX": (lin(0, 32.0), True), "TranslateY": (lin(0, 32.0), True),
                "Rotate": (lin(0, 135.0), True), "Brightness": (lin(0, 0.99), True),
                "Color": (lin(0, 0.99), True), "Contrast": (lin(0, 0.99), True),
                "Sharpness": (lin(0, 0.99), True),
                "Posterize": (8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 6)).astype(int), False),
                "Solarize": (lin(255.0, 0.0), False), "AutoContrast": (np.zeros(1), False),
                "Equalize": (np.zeros(1), False)}
    return {"Identity": (np.zeros(1), False), "ShearX": (lin(0, 0.3), True), "ShearY": (lin(0, 0.3), True),
            "TranslateX": (lin(0, 150.0 / 331.0 * w), True), "TranslateY": (lin(0, 150.0 / 331.0 * h), True),
            "Rotate": (lin(0, 30.0), True), "Brightness": (lin(0, 0.9), True), "Color": (lin(0, 0.9), True),
            "Contrast": (lin(0, 0.9), True), "Sharpness": (lin(0, 0.9), True),
            "Posterize": (8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 4)).astype(int), False),
            "Solarize": (lin(255.0, 0.0), False), "AutoContrast": (np.zeros(1), False),
            "Equalize": (np.zeros(1), False), "Invert": (np.zeros(1), False)}  # Invert: AutoAugment only


IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
RAND_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
            "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")


# --------------------------------------------------------------------------- parameter sampling
def sample_color_jitter(rng: np.random.Generator, cj: ColorJitter, n: int) -> dict:
    """torchvision ColorJitter.get_params for n images: a random order of the 4 ops and their factors."""
    def factor(v):
        return rng.uniform(max(0.0, 1.0 - v), 1.0 + v, size=n) if v > 0 else None
    return {"order": np.argsort(rng.random((n, 4)), axis=1), "brightness": factor(cj.brightness),
            "contrast": factor(cj.contrast), "saturation": factor(cj.saturation),
            "hue": rng.uniform(-cj.hue, cj.hue, size=n) if cj.hue > 0 else None}


def sample_policy_ops(rng: np.random.Generator, policy, n: int, h: int, w: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per op slot: (op name per image, signed magnitude per image); 'Identity' means skipped."""
    slots = []
    if isinstance(policy, AutoAugment):
        space = augmentation_space(10, h, w)
        choice = rng.integers(0, len(IMAGENET_POLICY), size=n)
        for slot in range(2):
            names = np.empty(n, object)
            mags = np.zeros(n)
            applies = rng.random(n)
            signs = rng.random(n) < 0.5
            for i in range(n):
                name, p, level = IMAGENET_POLICY[choice[i]][slot]
                if applies[i] <= p:
                    bins, signed = space[name]
                    m = float(bins[level]) if level is not None and len(bins) > 1 else 0.0
                    names[i] = name
                    mags[i] = -m if (signed and signs[i]) else m
                else:
                    names[i] = "Identity"
            slots.append((names, mags))
    elif isinstance(policy, RandAugment):
        space = augmentation_space(policy.num_magnitude_bins, h, w)
        top = policy.num_magnitude_bins - 1
        for _ in range(policy.num_ops):
            names = np.array(RAND_OPS, object)[rng.integers(0, len(RAND_OPS), size=n)]
            level = np.full(n, float(policy.magnitude))
            if policy.magnitude_std > 0:  # timm: magnitude ~ N(m, mstd), clipped to the scale
                level = rng.normal(level, policy.magnitude_std) if math.isfinite(policy.magnitude_std) \
                    else rng.uniform(0, level)
            level = np.clip(level, 0, top)
            signs = rng.random(n) < 0.5
            mags = np.zeros(n)
            for i in range(n):
                bins, signed = space[names[i]]
                if len(bins) > 1:
                    # fractional levels interpolate between bins (timm's continuous magnitude)
                    m = float(np.interp(level[i], np.arange(len(bins)), bins))
                    if names[i] == "Posterize":
                        m = float(int(m))
                    mags[i] = -m if (signed and signs[i]) else m
            slots.append((names, mags))
    elif isinstance(policy, TrivialAugmentWide):
        space = augmentation_space(policy.num_magnitude_bins, h, w, wide=True)
        ops = list(space)
        names = np.array(ops, object)[rng.integers(0, len(ops), size=n)]
        levels = rng.integers(0, policy.num_magnitude_bins, size=n)
        signs = rng.random(n) < 0.5
        mags = np.zeros(n)
        for i in range(n):
            bins, signed = space[names[i]]
            m = float(bins[levels[i]]) if len(bins) > 1 else 0.0
            mags[i] = -m if (signed and signs[i]) else m
        slots.append((names, mags))
    return slots


# --------------------------------------------------------------------------- applying
def apply_color_jitter(x: torch.Tensor, params: dict) -> torch.Tensor:
    x = x.clone()
    kernels = (("brightness", adjust_brightness), ("contrast", adjust_contrast),
               ("saturation", adjust_saturation), ("hue", adjust_hue))
    order = params["order"]
    for slot in range(4):
        for op_id, (name, kernel) in enumerate(kernels):
            values = params[name]
            if values is None:
                continue
            sel = np.nonzero(order[:, slot] == op_id)[0]
            if len(sel):
                t = torch.from_numpy(sel).to(x.device)
                x[t] = kernel(x[t], values[sel])
    return x


def apply_policy(x: torch.Tensor, slots, fill) -> torch.Tensor:
    x = x.clone()
    for names, mags in slots:
        for name in set(names.tolist()) - {"Identity"}:
            sel = np.nonzero(names == name)[0]
            t = torch.from_numpy(sel).to(x.device)
            x[t] = OPS[name](x[t], mags[sel], fill)
    return x
